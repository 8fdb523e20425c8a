import pytest

from tutorial_moe.book.show import dropdown, markdown_table


def test_markdown_table_is_compact_markdown():
    md = markdown_table([{"regime": "gradual", "acc": 0.91234}], floatfmt=".2f").data
    assert md.splitlines() == ["| regime | acc |", "|---|---|", "| gradual | 0.91 |"]


def test_dropdown_wraps_tables_and_text_in_one_folded_box():
    table = markdown_table([{"seed": 0, "acc": 0.5}])
    md = dropdown("Per-seed results", table, ":::{note}\ninner\n:::").data
    lines = md.splitlines()
    assert lines[0] == "::::{dropdown} Per-seed results" and lines[-1] == "::::"
    # the inner admonition keeps its own (shorter) fence, so it nests
    assert "| seed | acc |" in lines and ":::{note}" in lines


@pytest.mark.parametrize("title", ["", "two\nlines", None])
def test_dropdown_rejects_bad_titles(title):
    with pytest.raises(ValueError, match="title"):
        dropdown(title, "x")


def test_dropdown_rejects_non_markdown_parts():
    with pytest.raises(TypeError, match="part"):
        dropdown("t", 3)

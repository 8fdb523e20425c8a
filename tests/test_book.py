"""The book's sources and build machinery: jupytext pairs, the table of contents, _config.yml,
the README's commands, and the bridge that hands nbval's outputs to the book build."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jupytext
import pytest
import yaml
from jupytext.compare import compare_notebooks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import book_cache  # noqa: E402

CHAPTERS = sorted(
    p for p in (ROOT / "book").glob("*.md")
    if "jupytext" in p.read_text(encoding="utf-8")[:2000]
)


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key) or []:
                    walk(child)

    walk(toc)
    return files


def test_there_are_chapters():
    assert len(CHAPTERS) >= 15, [p.name for p in CHAPTERS]


@pytest.mark.parametrize("md", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_has_an_output_free_ipynb_twin_with_the_same_cells(md):
    ipynb = md.with_suffix(".ipynb")
    assert ipynb.exists(), f"{md.name} has no .ipynb twin: run `jupytext --to ipynb {md}`"
    raw = json.loads(ipynb.read_text(encoding="utf-8"))
    with_outputs = [i for i, cell in enumerate(raw["cells"])
                    if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count"))]
    assert not with_outputs, f"{ipynb.name}: code cells {with_outputs} carry outputs; clear them"
    # Raises NotebookDifference naming the first differing cell.
    compare_notebooks(jupytext.read(ipynb), jupytext.read(md), fmt="md:myst", compare_outputs=False)


@pytest.mark.parametrize("md", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_is_a_myst_notebook_paired_with_ipynb(md):
    header = jupytext.read(md).metadata
    assert header["jupytext"]["formats"] == "ipynb,md:myst"
    assert header["kernelspec"]["name"] == "python3"


def test_toc_lists_every_chapter_and_only_existing_files():
    listed = toc_files()
    missing = [f for f in listed if not list(ROOT.glob(f + ".*"))]
    assert not missing, f"_toc.yml lists files that do not exist: {missing}"
    unlisted = [p.stem for p in CHAPTERS if f"book/{p.stem}" not in listed]
    assert not unlisted, f"chapters missing from _toc.yml: {unlisted}"
    assert len(listed) == len(set(listed)), "a page is listed twice in _toc.yml"


def test_config_keeps_non_chapters_out_and_builds_offline():
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    assert config["only_build_toc_files"] is True
    for pattern in ["**.ipynb", ".venv", "venv", "tests", "tutorial_moe", "_build"]:
        assert pattern in config["exclude_patterns"], pattern
    assert config["execute"]["execute_notebooks"] == "cache"
    assert config["execute"]["timeout"] >= 300
    sphinx = config.get("sphinx", {})
    extensions = list(sphinx.get("extra_extensions") or []) + list(sphinx.get("local_extensions") or {})
    assert not any("intersphinx" in e for e in extensions), "intersphinx needs the network"
    launch = config["launch_buttons"]
    assert launch["binderhub_url"] and launch["colab_url"] and launch["thebe"] is True
    assert config["repository"]["url"].startswith("https://")


def test_ci_runs_exactly_the_readme_test_command():
    # The same reading as the project's before-stop hook: the last line that is a command.
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not re.match(r"\s*(#|set |cd |export )", line)]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert commands and commands[-1] in readme, commands[-1:]
    assert "make book" in readme


# ------------------------------------------------------------------------------------------------
# The nbval -> jupyter-cache bridge (scripts/book_cache.py, used by the root conftest.py).
CHAPTER = """\
---
jupytext:
  formats: ipynb,md:myst
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3 (ipykernel)
  language: python
  name: python3
---

# A chapter

```{code-cell} ipython3
:tags: [remove-input]

print("executed by the build")
```

Some prose with $x^2$.

```{code-cell} ipython3
1 + 1
```
"""


def executed_cells():
    return [
        ('print("executed by the build")',
         [{"output_type": "stream", "name": "stdout", "text": "from the nbval run\n"}]),
        ("1 + 1", [{"output_type": "execute_result", "execution_count": 7, "metadata": {},
                    "data": {"text/plain": "2"}}]),
    ]


def test_bridge_stores_outputs_under_the_key_the_book_build_looks_up(tmp_path):
    md = tmp_path / "ch.md"
    md.write_text(CHAPTER, encoding="utf-8")
    cache = tmp_path / "cache"
    assert not book_cache.is_cached(md, cache)
    book_cache.store_executed(md, executed_cells(), 3.25, cache_dir=cache)
    assert book_cache.is_cached(md, cache)
    # Editing a code cell changes the key: stale outputs are never reused.
    md.write_text(CHAPTER.replace("1 + 1", "1 + 2"), encoding="utf-8")
    assert not book_cache.is_cached(md, cache)


def test_forget_drops_a_chapter_from_the_cache(tmp_path):
    md = tmp_path / "ch.md"
    md.write_text(CHAPTER, encoding="utf-8")
    book_cache.store_executed(md, executed_cells(), 1.0, cache_dir=tmp_path / "cache")
    book_cache.forget(md, tmp_path / "cache")
    assert not book_cache.is_cached(md, tmp_path / "cache")
    book_cache.forget(md, tmp_path / "cache")  # forgetting twice is fine


def test_myst_nb_renders_the_cached_outputs_without_executing(tmp_path):
    """The real consumer: myst-nb in cache mode renders what the bridge stored. The stored
    output differs from what running the cell would print, so executing would show."""
    from docutils.core import publish_string
    from myst_nb.docutils_ import Parser

    md = tmp_path / "ch.md"
    md.write_text(CHAPTER, encoding="utf-8")
    book_cache.store_executed(md, executed_cells(), 1.0, cache_dir=tmp_path / "cache")
    html = publish_string(
        CHAPTER, source_path=str(md), parser=Parser(), writer_name="html",
        settings_overrides={"nb_read_as_md": True, "nb_execution_mode": "cache",
                            "nb_execution_cache_path": str(tmp_path / "cache"),
                            "nb_output_folder": str(tmp_path / "build"),
                            "output_encoding": "unicode", "report_level": 2},
    )
    assert "from the nbval run" in html
    assert "executed by the build" not in html  # remove-input hides the source; no run
    records = __import__("jupyter_cache").get_cache(str(tmp_path / "cache")).list_cache_records()
    assert [r.data["executed_by"] for r in records] == ["nbval"]
    assert records[0].data["execution_seconds"] == 1.0


def test_bridge_refuses_outputs_of_other_code(tmp_path):
    md = tmp_path / "ch.md"
    md.write_text(CHAPTER, encoding="utf-8")
    cells = executed_cells()
    with pytest.raises(ValueError, match="2 code cells|1 executed code cells"):
        book_cache.store_executed(md, cells[:1], 1.0, cache_dir=tmp_path / "cache")
    cells[1] = ("1 + 3", cells[1][1])
    with pytest.raises(ValueError, match="code cell 2 differs"):
        book_cache.store_executed(md, cells, 1.0, cache_dir=tmp_path / "cache")


def test_widget_state_is_saved_the_way_nbclient_saves_it():
    states = {"abc": {"_model_name": "IntSliderModel", "_model_module": "@jupyter-widgets/controls",
                      "_model_module_version": "2.0.0", "value": 3},
              "no-model": {"value": 1}}
    meta = book_cache.widget_state_metadata(states, {})
    state = meta[book_cache.WIDGET_STATE_MIMETYPE]
    assert state["version_major"] == 2 and list(state["state"]) == ["abc"]
    assert state["state"]["abc"]["model_name"] == "IntSliderModel"
    assert book_cache.widget_state_metadata({}, {}) == {}


@pytest.mark.parametrize("md", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_follows_the_template(md):
    """Issue 9's navigation: what you will learn, the seed; a closing summary. (No typed
    runtime line: the appendix generates the times, tests/test_pages.py checks.)"""
    text = md.read_text(encoding="utf-8")
    if "This chapter is being written" in text:
        pytest.skip("stub chapter")
    for marker in ("What you will learn", "Source"):
        assert re.search(rf"^\**{marker}", text, re.M | re.I), f"{md.name}: no '{marker}' line"
    assert re.search(r"^#+ What we found", text, re.M), f"{md.name}: no 'What we found' section"
    assert re.search(r"save_results\(", text) or md.stem == "17_verdicts", f"{md.name}: no save_results"


def test_prints_stay_where_they_were_printed():
    out = book_cache.merge_consecutive_streams([
        {"output_type": "stream", "name": "stdout", "text": "epoch 1\n"},
        {"output_type": "stream", "name": "stdout", "text": "10%\r100%\n"},
        {"output_type": "display_data", "data": {"text/plain": "<Figure>"}, "metadata": {}},
        {"output_type": "stream", "name": "stdout", "text": "after the figure\n"},
    ])
    assert [o["output_type"] for o in out] == ["stream", "display_data", "stream"]
    assert out[0]["text"] == "epoch 1\n100%\n" and out[2]["text"] == "after the figure\n"


def test_kernel_transcript_routes_widget_captured_output_into_the_widget():
    import importlib.util

    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    root_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root_conftest)
    t = root_conftest._KernelTranscript()

    def msg(kind, parent, **content):
        return {"msg_type": kind, "header": {"msg_type": kind}, "parent_header": {"msg_id": parent},
                "content": content}

    t.observe(msg("execute_input", "cell1", code="..."))
    t.observe(msg("comm_open", "cell1", comm_id="w", data={"state": {
        "_model_name": "OutputModel", "_model_module": "@jupyter-widgets/output",
        "_model_module_version": "1.0.0", "outputs": [], "msg_id": ""}}))
    t.observe(msg("comm_msg", "cell1", comm_id="w", data={"state": {"msg_id": "cell1"}}))
    t.observe(msg("stream", "cell1", name="stdout", text="inside the widget\n"))
    t.observe(msg("comm_msg", "cell1", comm_id="w", data={"state": {"msg_id": ""}}))
    t.observe(msg("stream", "cell1", name="stdout", text="old\n"))
    t.observe(msg("clear_output", "cell1", wait=True))
    t.observe(msg("display_data", "cell1", data={"text/plain": "shown"}, metadata={},
                  transient={"display_id": "d1"}))
    t.observe(msg("update_display_data", "cell1", data={"text/plain": "updated"}, metadata={},
                  transient={"display_id": "d1"}))
    outputs = t.cell_outputs("cell1")
    assert [o["data"]["text/plain"] for o in outputs] == ["updated"]
    assert t.widgets["w"]["outputs"] == [{"output_type": "stream", "name": "stdout",
                                          "text": "inside the widget\n"}]


@pytest.mark.parametrize("value", ["1", "0", "true", "", "yes", "no"])
def test_cache_mode_follows_the_package_full_mode(monkeypatch, value):
    from tutorial_moe.runtime import full_mode

    monkeypatch.setenv("TUTORIAL_MOE_FULL", value)
    assert book_cache.full_mode() == full_mode()
    assert (book_cache.cache_dir_for_mode() == book_cache.FULL_CACHE_DIR) == full_mode()

"""The "other engines" table and the torchtitan tables of chapter 16 (tutorial_moe.book.engines)."""
import pytest

from tutorial_moe.book import engines


def _report(ep=True):
    diffs = {q: 0.5 for q in ("output", "input_grad", "router_grad", "w_gate_grad", "w_up_grad", "w_down_grad")}
    report = {"defaults": {"score_func": "sigmoid", "route_norm": False, "top_k": 1, "route_scale": 1.0,
                           "load_balance_coeff": 1e-3, "shared_experts": None, "expert_dtype": "bfloat16"},
              "equivalence": {"float32": {"absolute": dict(diffs)}, "float64": {"absolute": dict(diffs, output=0.25)}},
              "expert_parallel": {"absolute": dict(diffs), "world_size": 2} if ep else None}
    return report


def test_every_engine_row_has_every_column_and_a_source():
    names = [row["engine"] for row in engines.ENGINES]
    assert len(names) == len(set(names)) == 4
    for row in engines.ENGINES:
        assert set(engines.ENGINE_COLUMNS) | {"source"} == set(row)
        assert all(isinstance(v, str) and v.strip() for v in row.values()), row["engine"]
        assert any(ch.isdigit() for ch in row["version"]), f"{row['engine']}: cite a version"


def test_engines_table_renders_one_line_per_engine():
    text = engines.engines_table().data
    assert len(text.splitlines()) == 2 + len(engines.ENGINES)
    with pytest.raises(ValueError, match="columns"):
        engines.engines_table(columns=("engine", "price"))


def test_torchtitan_rows_cover_each_quantity_and_run():
    rows = engines.torchtitan_rows(_report())
    assert len(rows) == 6
    assert set(rows[0]) == {"max abs difference in", "float32", "float64", "2 gloo ranks (EP), float32"}
    assert rows[0]["float64"] == "2.5e-01"
    assert len(engines.torchtitan_rows(_report(ep=False))[0]) == 3
    saved = engines.torchtitan_max_abs_diff(_report())
    assert set(saved) == {"float32", "float64", "expert_parallel_gloo"} and saved["float64"]["output"] == 0.25


def test_defaults_rows_say_what_the_peer_is_set_to():
    rows = engines.defaults_rows(_report())
    assert [r["setting"] for r in rows][:2] == ["score_func", "route_norm"]
    assert rows[0]["torchtitan default"] == "'sigmoid'" and rows[0]["set to (as MoELayer)"] == "softmax"


def test_a_report_of_the_wrong_kind_is_refused():
    for fn in (engines.torchtitan_rows, engines.defaults_rows, engines.torchtitan_max_abs_diff):
        with pytest.raises(ValueError, match="torchtitan_report"):
            fn({"nothing": 1})

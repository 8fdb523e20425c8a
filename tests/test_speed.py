"""The live timing helpers of the "Making MoE fast" chapter (experiments.speed)."""
import pytest
import torch

from tutorial_moe.experiments import speed


def test_time_interleaved_keeps_per_round_times_paired():
    calls = []
    res = speed.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                 repeats=4, warmup=1)
    # warm-up once each, then 4 rounds in which a and b alternate
    assert calls == ["a", "b"] * 5
    for r in res.values():
        assert len(r["ms"]) == 4 and all(t >= 0 for t in r["ms"])
        assert r["min_ms"] == min(r["ms"]) and r["max_ms"] == max(r["ms"])
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]


def test_time_topk_inference_times_both_variants():
    res = speed.time_topk_inference(k=1, num_experts=2, hidden=16, batch=8, repeats=2)
    assert set(res) == {"top-k", "all", "macs_ratio"}
    assert res["macs_ratio"] == pytest.approx(0.5)
    assert len(res["top-k"]["ms"]) == len(res["all"]["ms"]) == 2


def test_time_topk_inference_rejects_bad_k():
    with pytest.raises(ValueError, match="num_experts"):
        speed.time_topk_inference(k=3, num_experts=2)
    with pytest.raises(ValueError, match="k"):
        speed.time_topk_inference(k=0)


@pytest.mark.parametrize("expert", ["mlp", "swiglu"])
def test_the_timed_stages_are_the_whole_layer(expert):
    from tutorial_moe import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 2, expert=expert, losses={})
    x = torch.randn(32, 8, requires_grad=True)
    torch.testing.assert_close(speed.stage_output(layer, x), layer(x))


def test_time_breakdown_times_every_stage_with_the_limit():
    res = speed.time_breakdown(8, 16, 4, 2, tokens=32, repeats=2, warmup=0)
    for key in (*speed.STAGES, "layer", "active-dense"):
        assert res[key] > 0, key
    assert res["sum of stages"] == pytest.approx(sum(res[s] for s in speed.STAGES))
    assert res["experts / active-dense"] == pytest.approx(res["experts"] / res["active-dense"])
    assert res["mode"] in ("sorted", "grouped")


def test_time_breakdown_refuses_bad_sizes():
    with pytest.raises(ValueError, match="tokens"):
        speed.time_breakdown(8, 16, 4, 2, tokens=0)


def test_machine_load_and_allocator_helpers_report():
    load = speed.machine_load()
    assert load["load_1min"] >= 0 and load["cpus"] >= 1
    assert isinstance(speed.tune_allocator(), bool)

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

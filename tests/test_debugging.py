"""Collapse detection, instability, gradient norms, router gradient sources, profiling."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tutorial_moe import MoELayer, OracleRouter, TopKRouter
from tutorial_moe.blocks import TokenRegressor
from tutorial_moe.experiments.debugging import (
    GradientMonitor,
    detect_collapse,
    expert_gradient_norms,
    instability_summary,
    profile_training,
    router_gradient_norm,
    router_gradient_sources,
)
from tutorial_moe.train import fit


def _recs(utils):
    return [{"step": i, "utilization": u, "changes": None if i == 0 else 0.5 / (i + 1)} for i, u in enumerate(utils)]


FAIR = [0.25] * 4
ONE = [0.97, 0.01, 0.01, 0.01]
HALF_DEAD = [0.5, 0.49, 0.005, 0.005]


def test_collapse_alarm_after_patience_collapsed_probes():
    rep = detect_collapse(_recs([FAIR, FAIR, ONE, ONE, ONE, ONE]), patience=3)
    assert rep["collapsed"] and rep["alarm_step"] == 4
    assert rep["dominant"] == [0] and rep["dead"] == [1, 2, 3]
    assert rep["collapsed_share"] == pytest.approx(4 / 6)


def test_half_the_experts_dead_counts_as_collapse():
    assert detect_collapse(_recs([HALF_DEAD] * 3), patience=3)["collapsed"]


def test_healthy_and_transient_runs_stay_quiet():
    assert not detect_collapse(_recs([FAIR] * 10))["collapsed"]
    blip = detect_collapse(_recs([FAIR, ONE, ONE, FAIR, ONE, FAIR]), patience=3)
    assert not blip["collapsed"] and blip["alarm_step"] is None
    mild = [0.4, 0.3, 0.2, 0.1]  # unbalanced, nobody dead or dominant
    assert not detect_collapse(_recs([mild] * 5))["collapsed"]


def test_detector_rejects_empty_and_bad_input():
    with pytest.raises(ValueError, match="no utilisation"):
        detect_collapse([{"step": 0}])
    with pytest.raises(TypeError):
        detect_collapse("records")
    with pytest.raises(ValueError, match="patience"):
        detect_collapse(_recs([FAIR]), patience=0)


def test_instability_summary_early_late():
    s = instability_summary(_recs([FAIR] * 9), fraction=0.25)
    vals = [0.5 / (i + 1) for i in range(1, 9)]
    assert s["probes"] == 8
    assert s["early"] == pytest.approx(sum(vals[:2]) / 2) and s["late"] == pytest.approx(sum(vals[-2:]) / 2)
    assert s["mean"] == pytest.approx(sum(vals) / 8)
    with pytest.raises(ValueError, match="no 'changes'"):
        instability_summary([{"step": 0, "changes": None}])


def _oracle_model(assignment):
    return TokenRegressor(3, 6, 2, MoELayer(6, 8, 4, 1, router=OracleRouter(4, assignment), losses={}))


def test_expert_gradient_norms_are_zero_for_experts_without_tokens_and_match_manual():
    model = _oracle_model([0, 2, 0, 2])  # labels 0..3 -> experts 0 and 2 only
    x, ids = torch.randn(16, 3), torch.arange(16) % 4
    F.mse_loss(model(x, ids), torch.randn(16, 2)).backward()
    norms = expert_gradient_norms(model)
    assert norms[1] == 0 and norms[3] == 0 and norms[0] > 0 and norms[2] > 0
    bank = model.ffn.experts
    manual = math.sqrt(sum(float(p.grad[2].pow(2).sum()) for p in bank.parameters()))
    assert float(norms[2]) == pytest.approx(manual, rel=1e-5)


def test_expert_gradient_norms_needs_a_backward_first():
    with pytest.raises(ValueError, match="backward"):
        expert_gradient_norms(_oracle_model(None))


def test_top1_with_renormalised_weights_gives_the_router_no_task_gradient():
    x, y = torch.randn(32, 3), torch.randn(32, 2)
    renorm = TokenRegressor(3, 6, 2, MoELayer(6, 8, 4, 1, router=TopKRouter(6, 4, 1, normalize=True)))
    raw = TokenRegressor(3, 6, 2, MoELayer(6, 8, 4, 1, router=TopKRouter(6, 4, 1, normalize=False)))
    a = router_gradient_sources(renorm, (x, y), F.mse_loss)
    b = router_gradient_sources(raw, (x, y), F.mse_loss)
    # p / p = 1 has zero derivative; what is left is float rounding, ~1e-8 against ~1e-1.
    assert a["task"] < 1e-6 * b["task"] and a["aux"] > 0  # only the balance loss reaches the gate
    assert b["task"] > 1e-3
    assert all(p.grad is None for p in renorm.parameters())  # .grad untouched


def test_gradient_monitor_records_during_fit():
    x, y = torch.randn(32, 3), torch.randn(32, 2)
    model = TokenRegressor(3, 6, 2, MoELayer(6, 8, 4, 2))
    gm = GradientMonitor(every=2)
    fit(model, (x, y), epochs=1, batch_size=8, loss_fn=F.mse_loss, callback=gm, show_progress=False)
    assert [r["step"] for r in gm.records] == [0, 2]
    assert all(len(r["experts"]) == 4 and r["router"] > 0 for r in gm.records)
    assert router_gradient_norm(model) > 0  # the last step's gradient is still there after fit


def test_profile_training_reports_stages_and_ops():
    x, y = torch.randn(64, 3), torch.randn(64, 2)
    model = TokenRegressor(3, 6, 2, MoELayer(6, 8, 4, 2))
    prof = profile_training(model, (x, y), F.mse_loss, steps=3, batch_size=32, warmup=1)
    stages = {r["stage"]: r for r in prof.stages}
    assert {"forward", "backward", "optimizer", "moe.router", "moe.dispatch"} <= set(stages)
    assert stages["moe.router"]["ms_per_step"] <= stages["forward"]["ms_per_step"]
    assert sum(stages[s]["share"] for s in ("forward", "backward", "optimizer")) == pytest.approx(1.0)
    assert prof.ops and all(r["op"].startswith("aten::") for r in prof.ops)
    assert "Self CPU" in prof.table and prof.steps == 3

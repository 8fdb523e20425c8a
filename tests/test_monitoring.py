"""Routing summaries, the probe monitor, and compute per token."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tutorial_moe import ExpertChoiceRouter, HashRouter, MoELayer, OracleRouter, SoftMoELayer, SoftmaxRouter
from tutorial_moe.blocks import TokenGroups, TokenRegressor
from tutorial_moe.monitoring import RoutingMonitor, compute_per_token, routing_summary, top_expert_mask
from tutorial_moe.routing import Routing
from tutorial_moe.train import collect_routing, fit


def _routing(weights, dropped=None):
    T, E = weights.shape
    mask = weights > 0
    dropped = torch.zeros(T, dtype=torch.bool) if dropped is None else dropped
    return Routing(weights.clamp_min(1e-9).log(), weights, weights, mask, dropped)


def test_top_expert_mask_picks_the_heaviest_and_skips_dropped():
    w = torch.tensor([[0.7, 0.3, 0.0], [0.1, 0.2, 0.7], [0.0, 0.0, 0.0]])
    r = _routing(w, dropped=torch.tensor([False, False, True]))
    m = top_expert_mask(r)
    assert m.tolist() == [[True, False, False], [False, False, True], [False, False, False]]


def test_summary_of_oracle_routing_is_perfectly_specialised():
    labels = torch.arange(40) % 4
    layer = MoELayer(6, 8, 4, 1, router=OracleRouter(4), losses={})
    layer(torch.randn(40, 6), labels)
    s = routing_summary(layer.last_routing, labels)
    assert s["specialization"] == pytest.approx(1.0)
    assert s["load_imbalance"] == pytest.approx(1.0)
    assert s["entropy"] == pytest.approx(0.0, abs=1e-6)
    assert s["dropped"] == 0.0 and s["experts_per_token"] == 1.0
    assert s["utilization"] == pytest.approx([0.25] * 4)


def test_hash_routing_ignores_labels():
    labels = torch.arange(4000) % 4
    layer = MoELayer(6, 8, 4, 1, router=HashRouter(4), losses={})
    layer(torch.randn(4000, 6), torch.randperm(4000))
    assert routing_summary(layer.last_routing, labels)["specialization"] < 0.01


def test_softmax_router_is_scored_by_its_heaviest_expert():
    layer = MoELayer(6, 8, 4, 4, router=SoftmaxRouter(6, 4), losses={})
    layer(torch.randn(30, 6))
    s = routing_summary(layer.last_routing, torch.arange(30) % 3)
    assert s["experts_per_token"] == 4.0 and s["load_imbalance"] == pytest.approx(1.0)
    assert 0.0 <= s["specialization"] <= 1.0
    assert 0 < s["entropy"] <= math.log(4) + 1e-6


def test_summary_rejects_bad_labels():
    r = _routing(torch.eye(3))
    with pytest.raises(ValueError, match="labels must have shape"):
        routing_summary(r, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="Routing"):
        routing_summary(torch.eye(3))


def test_monitor_records_every_n_steps_during_fit():
    x, y = torch.randn(96, 4), torch.randn(96, 2)
    labels = torch.arange(32) % 4
    model = TokenRegressor(4, 8, 2, MoELayer(8, 8, 4, 2, capacity_factor=1.0))
    mon = RoutingMonitor(x[:32], labels, every=2)
    fit(model, (x, y), epochs=2, batch_size=16, loss_fn=F.mse_loss, callback=mon, show_progress=False)
    assert [r["step"] for r in mon.records] == list(range(0, 12, 2))
    assert mon.records[0]["changes"] is None
    assert all(0.0 <= r["changes"] <= 1.0 for r in mon.records[1:])
    assert all(r["train_dropped"] is not None and r["task"] is not None for r in mon.records)
    assert len(mon.series("entropy")) == 6
    # The monitor leaves the model in training mode and does not disturb training.
    assert model.training


def test_monitor_changes_match_routing_changes_of_consecutive_probes():
    model = TokenRegressor(4, 8, 2, MoELayer(8, 8, 4, 1))
    x = torch.randn(50, 4)
    mon = RoutingMonitor(x, every=1)
    mon.observe(model, 0)
    first = collect_routing(model, x).mask
    with torch.no_grad():
        model.ffn.router.gate.weight.mul_(-1)  # reverse every preference
    mon.observe(model, 1)
    second = collect_routing(model, x).mask
    assert mon.records[1]["changes"] == pytest.approx(float((first != second).any(1).float().mean()))


def test_monitor_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="labels has 3 rows"):
        RoutingMonitor(torch.randn(5, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="every"):
        RoutingMonitor(torch.randn(5, 2), every=0)


def test_compute_per_token_counts_expert_evaluations_and_flops():
    d, h, E = 8, 16, 4
    x = torch.randn(64, d)
    topk = MoELayer(d, h, E, 2)
    topk(x)
    c = compute_per_token(topk, topk.last_routing)
    assert c["expert_evals"] == pytest.approx(2.0)
    assert c["flops"] == pytest.approx(2 * (2 * d * h * 2) + 2 * d * E)
    ec = MoELayer(d, h, E, 1, router=ExpertChoiceRouter(d, E, capacity_factor=1.5), losses={})
    ec(x)
    assert compute_per_token(ec, ec.last_routing)["expert_evals"] == pytest.approx(E * math.ceil(1.5 * 64 / E) / 64)
    soft = TokenGroups(SoftMoELayer(d, h, E, slots_per_expert=2), 16)
    soft(x)
    assert compute_per_token(soft, soft.layer.last_routing)["expert_evals"] == pytest.approx(E * 2 / 16)
    hashed = MoELayer(d, h, E, 1, router=HashRouter(E), losses={})
    hashed(x, torch.arange(64))
    assert compute_per_token(hashed, hashed.last_routing)["router_flops"] == 0
    with pytest.raises(TypeError, match="MoELayer or TokenGroups"):
        compute_per_token(torch.nn.Linear(2, 2), topk.last_routing)

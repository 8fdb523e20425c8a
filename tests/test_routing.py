"""Router behaviour: what each router promises beyond matching the oracle (tests/test_dispatch.py)."""
from __future__ import annotations

import math

import pytest
import torch

from tutorial_moe import (
    ConvGate,
    ExpertChoiceRouter,
    HashRouter,
    HierarchicalRouter,
    OracleRouter,
    SoftmaxRouter,
    ThresholdRouter,
    TopKRouter,
)
from tutorial_moe.losses import entropy, load_loss
from tutorial_moe.routing import apply_capacity, capacity

D, E, T = 8, 4, 16


def _skewed_topk(k=1, u=0.1, T=T):
    """A router whose scores prefer expert 0 for every token (and 1 over 2 over 3)."""
    r = TopKRouter(D, E, k, bias_update_rate=u)
    with torch.no_grad():
        r.gate.weight.zero_()
    x = torch.randn(T, D)
    # a constant feature the gate reads: score_e = (3 - e) * x[:, 0]; x[:, 0] > 0
    x[:, 0] = x[:, 0].abs() + 1.0
    with torch.no_grad():
        r.gate.weight[:, 0] = torch.tensor([3.0, 2.0, 1.0, 0.0])
    return r, x


# ------------------------------------------------------------------ softmax / top-k basics
def test_softmax_router_weights_every_expert():
    r = SoftmaxRouter(D, E, temperature=2.0)
    x = torch.randn(T, D)
    routing = r(x)
    assert routing.mask.all() and not routing.dropped.any()
    assert torch.allclose(routing.weights, routing.probs)
    assert torch.allclose(routing.probs, (r.gate(x) / 2.0).softmax(-1))


def test_topk_indices_best_first_and_weights_renormalised():
    r = TopKRouter(D, E, 3)
    routing = r(torch.randn(T, D))
    chosen_probs = routing.probs.gather(1, routing.indices)
    assert (chosen_probs[:, :-1] >= chosen_probs[:, 1:]).all()
    assert torch.allclose(routing.weights.gather(1, routing.indices), chosen_probs / chosen_probs.sum(-1, keepdim=True))
    assert torch.equal(routing.mask.sum(-1), torch.full((T,), 3))
    assert (routing.weights[~routing.mask] == 0).all()


def test_topk_without_normalize_keeps_raw_probabilities():
    r = TopKRouter(D, E, 2, normalize=False)
    routing = r(torch.randn(T, D))
    assert torch.allclose(routing.weights, routing.probs * routing.mask)
    assert (routing.weights.sum(-1) < 1).all()


def test_k_and_temperature_are_settable_between_forwards():
    r = TopKRouter(D, E, 1)
    x = torch.randn(T, D)
    h_cold = entropy(r(x).probs).mean()
    r.k, r.temperature = 3, 10.0
    routing = r(x)
    assert (routing.mask.sum(-1) == 3).all()
    assert entropy(routing.probs).mean() > h_cold  # a hotter softmax is flatter


# ------------------------------------------------------------------ capacity
def test_capacity_formula():
    assert capacity(1.0, 16, 4, 1) == 4
    assert capacity(1.25, 16, 4, 2) == 10  # ceil(1.25 * 16 * 2 / 4)
    assert capacity(0.01, 16, 4, 1) == 1  # at least one slot


def test_apply_capacity_priority_by_hand():
    # 4 tokens, 2 experts, capacity 2. First choices: 0,0,0,1; second choices: 1,1,1,0.
    idx = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    keep = apply_capacity(idx, 2, 2)
    # expert 0 takes tokens 0,1 (first choices); token 2's first choice overflows.
    # expert 1 takes token 3 (first choice) then token 0's second choice; all else overflow.
    expected = torch.tensor([[True, True], [True, False], [False, False], [True, False]])
    assert torch.equal(keep, expected)


def test_topk_capacity_drops_and_records():
    r, x = _skewed_topk(k=1, u=0.0)
    r.capacity_factor = 1.0  # 4 slots per expert, all 16 tokens want expert 0
    routing = r(x)
    assert routing.mask[:, 0].sum() == 4 and routing.mask.sum() == 4
    assert routing.dropped.sum() == 12
    assert torch.equal(routing.dropped, ~routing.mask.any(-1))
    assert torch.equal(routing.mask[:4, 0], torch.ones(4, dtype=torch.bool))  # earlier tokens first
    assert (routing.weights[routing.dropped] == 0).all()


# ------------------------------------------------------------------ noisy top-k
def test_noisy_topk_noise_only_in_training():
    r = TopKRouter(D, E, 2, noisy=True)
    with torch.no_grad():
        r.noise.weight.normal_()
    x = torch.randn(T, D)
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mask, b.mask)
    assert torch.allclose(a.logits, r.gate(x))  # no noise at all
    assert "load" not in a.aux
    r.train()
    c, d = r(x), r(x)
    assert not torch.equal(c.logits, d.logits)
    assert not torch.allclose(c.logits, a.logits)


def test_noisy_topk_load_is_differentiable():
    r = TopKRouter(D, E, 2, noisy=True)
    with torch.no_grad():
        r.gate.weight.normal_()
    r.train()
    routing = r(torch.randn(64, D))
    load = routing.aux["load"]
    assert load.shape == (E,) and load.requires_grad
    # each entry is a sum of 64 probabilities; the total estimates the T * k assignments (it is
    # not exactly T * k: each probability holds the other experts' noise fixed)
    assert (load.detach() >= 0).all() and (load.detach() <= 64).all()
    assert abs(float(load.detach().sum()) - 128) < 0.25 * 128
    load_loss(load).backward()
    assert r.gate.weight.grad.abs().sum() > 0
    assert r.noise.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ auxiliary-loss-free bias
def test_bias_moves_toward_underloaded_experts_by_the_sign_rule():
    u = 0.1
    r, x = _skewed_topk(k=1, u=u)
    r.train()
    first = r(x)
    load = first.mask.sum(0).float()
    assert torch.equal(load, torch.tensor([16.0, 0, 0, 0]))  # before any update the bias is 0
    assert torch.equal(r.expert_bias, torch.zeros(E))  # forward only counts
    assert torch.equal(r.expert_load, load)
    r.update_expert_bias()
    expected = u * torch.sign(load.mean() - load)
    assert torch.allclose(r.expert_bias, expected - expected.mean())  # centred
    assert r.expert_bias[0] < 0 and (r.expert_bias[1:] > 0).all()
    assert torch.equal(r.expert_load, torch.zeros(E))  # the count restarts
    # keep training steps going: the overloaded expert sheds tokens
    for _ in range(60):
        routing = r(x)
        r.update_expert_bias()
    assert routing.mask[:, 0].sum() < 16
    assert routing.mask.sum(0).max() < 16


def test_bias_changes_selection_not_weights():
    r, x = _skewed_topk(k=2, u=0.5)
    r.train()
    for _ in range(10):
        r(x)
        r.update_expert_bias()
    bias_used = r.expert_bias.clone()
    routing = r(x)
    assert torch.equal(r.expert_bias, bias_used)  # forward leaves the bias alone
    assert bias_used.abs().sum() > 0
    selected = (r.gate(x) + bias_used).topk(2).indices
    assert torch.equal(routing.indices.sort(-1).values, selected.sort(-1).values)
    assert not torch.equal(routing.indices.sort(-1).values, r.gate(x).topk(2).indices.sort(-1).values)
    # weighted by the unbiased probabilities, renormalised over the chosen experts
    chosen = routing.probs.gather(1, routing.indices)
    assert torch.allclose(routing.weights.gather(1, routing.indices), chosen / chosen.sum(-1, keepdim=True))
    assert torch.allclose(routing.probs, r.gate(x).softmax(-1))


def test_bias_frozen_in_eval_and_saved_in_state_dict():
    r, x = _skewed_topk(k=1, u=0.1)
    r.eval()
    r(x)
    assert torch.equal(r.expert_bias, torch.zeros(E))
    assert "expert_bias" in r.state_dict()


# ------------------------------------------------------------------ expert choice
def test_expert_choice_each_expert_takes_its_top_tokens():
    r = ExpertChoiceRouter(D, E, capacity_factor=1.0)
    routing = r(torch.randn(T, D))
    C = math.ceil(1.0 * T / E)
    assert torch.equal(routing.mask.sum(0), torch.full((E,), C))
    for e in range(E):
        taken = routing.probs[routing.mask[:, e], e]
        left = routing.probs[~routing.mask[:, e], e]
        assert taken.min() >= left.max()
    assert torch.allclose(routing.weights, routing.probs * routing.mask)
    assert torch.equal(routing.dropped, ~routing.mask.any(-1))


def test_expert_choice_capacity_is_capped_by_tokens():
    r = ExpertChoiceRouter(D, E, capacity_factor=8.0)
    routing = r(torch.randn(5, D))
    assert routing.mask.all()  # C = min(T, ceil(8 * 5 / 4)) = 5


# ------------------------------------------------------------------ threshold, hierarchical
def test_threshold_router_falls_back_to_best_and_learns_thresholds():
    r = ThresholdRouter(D, E, init_threshold=0.999)  # nothing clears the bar
    x = torch.randn(T, D)
    routing = r(x)
    assert torch.equal(routing.mask.sum(-1), torch.ones(T, dtype=torch.long))
    assert torch.equal(routing.mask.float().argmax(-1), routing.probs.argmax(-1))
    r2 = ThresholdRouter(D, E, init_threshold=0.01)  # everything clears it
    routing2 = r2(x)
    assert routing2.mask.all()
    routing2.weights.sum().backward()
    assert r2.theta.grad.abs().sum() > 0
    assert 0 < float(routing2.aux["active"].detach()) <= E


def test_hierarchical_router_chooses_inside_chosen_groups():
    r = HierarchicalRouter(D, num_groups=3, experts_per_group=4, k=2, group_k=1)
    with torch.no_grad():
        r.gate.weight.normal_(); r.group_gate.weight.normal_()
    x = torch.randn(T, D)
    routing = r(x)
    assert routing.num_experts == 12
    assert torch.allclose(routing.probs.sum(-1), torch.ones(T), atol=1e-6)
    assert torch.equal(routing.mask.sum(-1), torch.full((T,), 2))
    best_group = (r.group_gate(x)).argmax(-1)
    assert torch.equal(routing.indices // 4, best_group.unsqueeze(1).expand(-1, 2))
    assert torch.allclose(routing.weights.sum(-1), torch.ones(T), atol=1e-6)


# ------------------------------------------------------------------ fixed routers
def test_hash_router_is_fixed_balanced_and_seeded():
    ids = torch.arange(4000)
    r = HashRouter(E, seed=0)
    x = torch.zeros(4000, 3)
    a, b = r(x, ids), r(x, ids)
    assert torch.equal(a.mask, b.mask)
    counts = a.mask.sum(0).float()
    assert (counts - 1000).abs().max() < 100  # ~3 sigma of a binomial(4000, 1/4) is ~82
    assert not torch.equal(HashRouter(E, seed=1)(x, ids).mask, a.mask)
    assert torch.equal(a.weights, a.mask.float()) and torch.allclose(a.probs.sum(-1), torch.ones(4000))


def test_oracle_router_follows_the_assignment():
    r = OracleRouter(3, assignment=[2, 2, 0, 1])
    labels = torch.tensor([0, 1, 2, 3, 3])
    routing = r(torch.zeros(5, 7), labels)
    assert torch.equal(routing.mask.float().argmax(-1), torch.tensor([2, 2, 0, 1, 1]))
    assert torch.equal(OracleRouter(4)(torch.zeros(4, 2), torch.arange(4)).mask, torch.eye(4, dtype=torch.bool))


def test_custom_gate_routes_images():
    gate = ConvGate(num_experts=3, width=4, fc=8, image_size=8)
    r = TopKRouter(None, 3, 1, gate=gate)
    routing = r(torch.rand(5, 1, 8, 8))
    assert routing.mask.shape == (5, 3) and (routing.mask.sum(-1) == 1).all()


def test_routing_assignments_and_detach():
    routing = TopKRouter(D, E, 2)(torch.randn(T, D))
    t_idx, e_idx = routing.assignments()
    assert len(t_idx) == 2 * T
    assert (e_idx[1:] >= e_idx[:-1]).all()  # sorted by expert
    same = e_idx[1:] == e_idx[:-1]
    assert (t_idx[1:][same] > t_idx[:-1][same]).all()  # then by token
    assert routing.mask[t_idx, e_idx].all()
    det = routing.detach()
    assert not det.weights.requires_grad and torch.equal(det.weights, routing.weights.detach())


@pytest.mark.parametrize("router", [
    SoftmaxRouter(D, E), TopKRouter(D, E, 2), ExpertChoiceRouter(D, E, 1.0), ThresholdRouter(D, E),
    HierarchicalRouter(D, 2, 2),
])
def test_router_routing_shapes(router):
    routing = router(torch.randn(T, D))
    for name in ("logits", "probs", "weights", "mask"):
        assert getattr(routing, name).shape == (T, E), name
    assert routing.mask.dtype == torch.bool and routing.dropped.shape == (T,)

"""Routing and balancing as the papers define them (issue 14): each test here fails on the
behaviour the issue reported, and passes on the fixed package.

* the load every balance signal reads is the router's choice *before* capacity drops anything;
* renormalisation follows the current k; capacity is exact; empty batches give zero losses;
* every dispatch mode follows autocast; the aux-loss-free bias moves only in ``update_expert_bias``;
* settings that cannot work are refused; float64 gradcheck of every custom autograd node.
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import oracle
from tutorial_moe import (
    ExpertChoiceRouter,
    HashRouter,
    HierarchicalRouter,
    MLPExpert,
    MoE,
    MoELayer,
    OracleRouter,
    SoftmaxRouter,
    SoftMoELayer,
    ThresholdRouter,
    TopKRouter,
    set_finite_checks,
)
from tutorial_moe import dispatch as dispatch_mod
from tutorial_moe.blocks import TokenGroups
from tutorial_moe.dispatch import DISPATCH_MODES, combine_pairs, grouped_mm_available, sorted_pairs
from tutorial_moe.losses import LOSSES, switch_balance_loss
from tutorial_moe.parallel import routed_counts
from tutorial_moe.routing import apply_capacity, capacity, update_expert_biases
from tutorial_moe.train import fit

D, H, E = 8, 12, 4
GROUPED64 = grouped_mm_available("cpu", torch.float64)


def _full_router(**kw):
    """Top-1, E=4, capacity 1 slot per expert for 16 tokens; the router's choices are [2, 2, 5, 7]."""
    torch.manual_seed(1)
    r = TopKRouter(D, E, 1, capacity_factor=0.25, normalize=False, **kw)
    with torch.no_grad():
        r.gate.weight.normal_(0, 1.0)
    return r, torch.randn(16, D)


# ------------------------------------------------------------------ 1. pre-capacity load
def test_every_expert_full_the_kept_load_is_uniform_but_the_chosen_one_is_not():
    r, x = _full_router()
    routing = r(x)
    assert routing.mask.sum(0).tolist() == [1, 1, 1, 1]
    assert routing.chosen_mask.sum(0).tolist() == [2, 2, 5, 7]
    assert torch.equal(routing.chosen_mask.sum(0), torch.bincount(routing.indices[:, 0], minlength=E))


def test_switch_loss_reads_the_chosen_load_with_every_expert_full():
    r, x = _full_router()
    routing = r(x)
    loss = LOSSES["switch"](routing, None)
    f = torch.tensor([2.0, 2, 5, 7]) / 16  # chosen counts over T * k
    assert torch.allclose(loss, E * (f * routing.probs.mean(0)).sum())
    (grad,) = torch.autograd.grad(loss, r.gate.weight)
    assert grad.norm() > 1e-2  # the kept (uniform) load gave ~3e-8 here
    # ... and the busiest expert's probability is pushed down
    probs = r(x).probs.detach().requires_grad_(True)
    switch_balance_loss(probs, routing.chosen_mask, 1).backward()
    assert probs.grad.mean(0).argmax() == 3


def test_switch_f_is_normalised_by_tokens_times_k():
    probs = torch.full((4, 4), 0.25)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:, 0] = True  # as if capacity had kept only the first of k=2 choices
    assert float(switch_balance_loss(probs, mask, k=2)) == pytest.approx(0.5)
    assert float(switch_balance_loss(probs, mask)) == pytest.approx(1.0)  # normalised by the mask's count


def test_importance_loss_reads_the_weights_before_capacity():
    r, x = _full_router()
    routing = r(x)
    before = routing.gates.sum(0)
    assert torch.allclose(LOSSES["importance"](routing, None), before.var(unbiased=False) / before.mean() ** 2, atol=1e-6)
    assert not torch.allclose(routing.gates, routing.weights)


def test_bias_reads_the_chosen_load_with_every_expert_full():
    r, x = _full_router(bias_update_rate=0.1)
    r.train()
    r(x)
    assert r.expert_load.tolist() == [2, 2, 5, 7]
    step = r.update_expert_bias()
    assert step.tolist() == pytest.approx([0.1, 0.1, -0.1, -0.1])  # the kept load [1,1,1,1] gave 0


# ------------------------------------------------------------------ 2. renormalisation follows k
@pytest.mark.parametrize("path", [(2, 1), (1, 2), (1, 4), (4, 1), (2, 4, 1)])
def test_changing_k_keeps_a_task_gradient_for_the_router(path):
    torch.manual_seed(0)
    layer = MoELayer(D, H, E, path[0], losses={}, dispatch="sorted")
    x = torch.randn(32, D)
    for k in path:
        layer.router.k = k
        layer.router.zero_grad()
        layer(x).pow(2).sum().backward()
        assert layer.router.gate.weight.grad.norm() > 1e-3, f"k={k} after {path}"
        w = layer.last_routing.weights.sum(-1)
        if k == 1:
            assert (w < 1).all()  # the raw probability, as Switch
        else:
            assert torch.allclose(w, torch.ones_like(w))


def test_default_top1_router_is_not_dead():
    torch.manual_seed(0)
    r = TopKRouter(D, E, 1)
    layer = MoELayer(D, H, E, 1, router=r, losses={})
    layer(torch.randn(32, D)).pow(2).sum().backward()
    assert r.gate.weight.grad.norm() > 1e-3  # was 1.7e-6: every weight exactly 1.0


def test_explicit_normalize_true_at_k1_is_honoured():
    r = TopKRouter(D, E, 1, normalize=True)
    w = r(torch.randn(8, D)).weights.sum(-1)
    assert torch.equal(w, torch.ones_like(w))


# ------------------------------------------------------------------ 3. exact capacity
def _exact(cf, T, E_, k):
    return max(1, math.ceil(Fraction(str(cf)) * T * k / E_))


def test_capacity_is_exact_on_a_sweep():
    assert capacity(1.1, 100, 2, 1) == 55
    factors = [0.1, 0.25, 0.3, 0.5, 0.6, 0.7, 0.75, 0.9, 1.0, 1.1, 1.2, 1.25, 1.3, 1.4, 1.5, 2.0, 3.0]
    tokens = [1, 2, 3, 7, 10, 16, 50, 64, 100, 128, 200, 500, 1000, 1024, 4096]
    bad = [(cf, T, e, k) for cf in factors for T in tokens for e in (1, 2, 3, 4, 8, 16, 64) for k in (1, 2, 4)
           if capacity(cf, T, e, k) != _exact(cf, T, e, k)]
    assert not bad, bad[:5]


@given(st.integers(1, 400), st.integers(1, 40), st.integers(1, 10_000), st.integers(1, 4))
def test_capacity_matches_fraction_for_decimal_factors(hundredths, E_, T, k):
    cf = hundredths / 100
    assert capacity(cf, T, E_, k) == max(1, math.ceil(Fraction(hundredths, 100) * T * k / E_))


# ------------------------------------------------------------------ 4. grouped capability probe
def test_grouped_probe_does_not_depend_on_the_callers_context():
    dispatch_mod.grouped_mm_available.cache_clear()
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            first = grouped_mm_available("cpu", torch.float32)
        dispatch_mod.grouped_mm_available.cache_clear()
        plain = grouped_mm_available("cpu", torch.float32)
        assert first == plain
        with torch.inference_mode():
            dispatch_mod.grouped_mm_available.cache_clear()
            assert grouped_mm_available("cpu", torch.float32) == plain
    finally:
        dispatch_mod.grouped_mm_available.cache_clear()


# ------------------------------------------------------------------ 5. autocast
MODES = [m for m in DISPATCH_MODES if m != "grouped" or grouped_mm_available("cpu", torch.bfloat16)]


@pytest.mark.parametrize("expert", ["mlp", "swiglu"])
def test_every_mode_runs_under_autocast_and_agrees_with_dense(expert):
    torch.manual_seed(0)
    layer = MoELayer(D, 16, E, 2, expert=expert, dispatch="dense", losses={"switch": 0.01, "z": 0.001})
    x = torch.randn(24, D, requires_grad=True)
    results = {}
    for mode in MODES:
        layer.dispatch = mode
        layer.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
            assert layer.last_routing.probs.dtype == torch.float32  # the router stays float32
        (out.float().pow(2).sum() + layer.aux_loss).backward()
        results[mode] = (out.detach().float(), out.dtype, x.grad.clone(), layer.experts.w_down.grad.clone()
                         if expert == "swiglu" else layer.experts.w2.grad.clone())
    ref = results["dense"]
    for mode, (out, dtype, gx, gw) in results.items():
        assert dtype == torch.bfloat16, mode
        scale = ref[0].abs().max()
        assert (out - ref[0]).abs().max() <= 2e-2 * scale, mode
        assert (gx - ref[2]).abs().max() <= 3e-2 * ref[2].abs().max(), mode
        assert (gw - ref[3]).abs().max() <= 3e-2 * ref[3].abs().max(), mode


def test_router_of_a_bf16_module_keeps_float32_softmax():
    r = TopKRouter(D, E, 2).bfloat16()
    routing = r(torch.randn(8, D, dtype=torch.bfloat16))
    assert routing.probs.dtype == torch.float32 and routing.logits.dtype == torch.float32


# ------------------------------------------------------------------ 6. the aux-loss-free bias
def test_forward_only_counts_and_update_moves_the_bias():
    r, x = _full_router(bias_update_rate=0.05)
    r.capacity_factor = None
    r.train()
    for _ in range(3):  # three micro-batches (gradient accumulation): one step
        r(x)
    assert torch.equal(r.expert_bias, torch.zeros(E))
    counted = r.expert_load.clone()
    step = r.update_expert_bias()
    assert torch.allclose(step, 0.05 * torch.sign(counted.mean() - counted))
    assert float(r.expert_bias.sum()) == pytest.approx(0.0, abs=1e-7)  # centred
    assert torch.equal(r.expert_load, torch.zeros(E))
    # the same rate per step whether the step saw one micro-batch or three
    r2, _ = _full_router(bias_update_rate=0.05)
    r2.capacity_factor = None
    r2.train()
    r2(x)
    r2.update_expert_bias()
    assert torch.allclose(r.expert_bias, r2.expert_bias)


def test_eval_and_no_count_leave_the_bias_alone():
    r, x = _full_router(bias_update_rate=0.05)
    r.eval()
    r(x)
    assert torch.equal(r.expert_load, torch.zeros(E))
    assert torch.equal(r.update_expert_bias(), torch.zeros(E))
    assert TopKRouter(D, E, 1).update_expert_bias() is None  # no bias balancing configured


@pytest.mark.parametrize("cast", ["bfloat16", "half", "double"])
def test_bias_stays_float32_after_a_cast_and_small_steps_still_move_it(cast):
    r = TopKRouter(D, E, 1, bias_update_rate=1e-3)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([1.0, -1.0, 0.5, -0.5]))
    getattr(r, cast)()
    assert r.expert_bias.dtype == torch.float32 and r.expert_load.dtype == torch.float32
    assert r.expert_bias.tolist() == [1.0, -1.0, 0.5, -0.5]  # not rounded by the cast
    dtype = {"bfloat16": torch.bfloat16, "half": torch.float16, "double": torch.float64}[cast]
    r.train()
    before = r.expert_bias.clone()
    r(torch.randn(16, D, dtype=dtype))
    r.update_expert_bias()
    assert (r.expert_bias - before).abs().max() >= 5e-4


def test_bias_is_for_selection_only():
    r, x = _full_router(bias_update_rate=0.5)
    r.capacity_factor = None
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([50.0, 50.0, -50.0, -50.0]))
    routing = r(x)
    assert set(routing.indices[:, 0].tolist()) <= {0, 1}
    assert torch.allclose(routing.weights.gather(1, routing.indices), routing.probs.gather(1, routing.indices))
    assert torch.allclose(routing.probs, r.gate(x).softmax(-1))


def test_fit_applies_one_bias_step_per_optimiser_step():
    torch.manual_seed(0)
    model = MoELayer(D, H, E, 1, router=TopKRouter(D, E, 1, bias_update_rate=0.01), losses={})
    x, y = torch.randn(64, D), torch.randn(64, D)
    seen = []
    fit(model, (x, y), epochs=1, batch_size=16, loss_fn=F.mse_loss, show_progress=False,
        callback=lambda row, m: seen.append(m.router.expert_bias.clone()), device="cpu")
    assert len(seen) == 4
    steps = [seen[0]] + [b - a for a, b in zip(seen, seen[1:])]
    for s in steps:  # each optimiser step moved every bias by exactly one sign step (then centred)
        assert s.abs().max() <= 0.02 + 1e-6 and s.abs().max() > 0
    assert torch.equal(model.router.expert_load, torch.zeros(E))
    assert update_expert_biases(model) == 1


def test_routed_counts_changes_nothing():
    r, x = _full_router(bias_update_rate=0.1)
    r.train()
    state = {k: v.clone() for k, v in r.state_dict().items()}
    counts = routed_counts(r, x, [8, 8])
    assert counts.shape == (2, E)
    assert torch.equal(r.expert_load, torch.zeros(E)) and r.training
    assert all(torch.equal(v, r.state_dict()[k]) for k, v in state.items())


# ------------------------------------------------------------------ 7. empty batches
@pytest.mark.parametrize("mode", DISPATCH_MODES)
def test_empty_batch_gives_zero_losses_with_a_graph(mode):
    layer = MoELayer(D, H, E, 2, dispatch=mode, capacity_factor=1.0,
                     losses={"switch": 1.0, "z": 1.0, "importance": 1.0, "batch_entropy": 1.0, "sample_entropy": 1.0,
                             "batch_variance": 1.0, "sample_variance": 1.0})
    out = layer(torch.randn(0, D))
    assert out.shape == (0, D)
    for name, v in layer.aux_losses.items():
        assert torch.isfinite(v) and float(v.detach()) == 0.0, name
    assert layer.aux_loss.requires_grad
    (out.sum() + layer.aux_loss).backward()


def test_empty_batch_whole_network_and_soft_moe():
    moe = MoE([MLPExpert(D, 5, 3) for _ in range(3)], TopKRouter(D, 3, 2), dispatch="loop", combine="probs",
              losses={"switch": 1.0, "z": 1.0})
    out = moe(torch.randn(0, D))
    assert out.shape[0] == 0 and all(float(v.detach()) == 0 for v in moe.aux_losses.values())
    soft = SoftMoELayer(D, H, E, losses={"batch_entropy": 1.0})
    assert soft(torch.randn(2, 0, D)).shape == (2, 0, D)
    assert torch.isfinite(soft.aux_loss)


# ------------------------------------------------------------------ 8. / 11. refused settings
@pytest.mark.parametrize("build, arg", [
    (lambda: MoELayer(D, H, E, 1, router=HierarchicalRouter(D, 2, 2), losses={"z": 1.0}), "losses"),
    (lambda: SoftMoELayer(D, H, E, losses={"z": 1.0}), "losses"),
    (lambda: SoftMoELayer(D, H, E, losses={"switch": 1.0}), "losses"),
    (lambda: MoELayer(D, H, E, 1, router=HashRouter(E), losses={"z": 1.0}), "losses"),
    (lambda: MoE([MLPExpert(D, 5, 3) for _ in range(2)], OracleRouter(2), losses={"z": 1.0}), "losses"),
    (lambda: MoE([MLPExpert(D, 5, 3) for _ in range(2)], SoftmaxRouter(D, 2), losses={"switch": 1.0}), "losses"),
    (lambda: MoELayer(D, H, E, E, router=SoftmaxRouter(D, E), losses={"switch": 0.01}), "losses"),
    (lambda: MoELayer(D, H, E, 1, router=ExpertChoiceRouter(D, E, 1.0), losses={"switch": 0.01}), "losses"),
    (lambda: MoELayer(D, H, E, 1, losses={"load": 1.0}), "losses"),
    (lambda: MoELayer(D, H, E, 1, router=ThresholdRouter(D, E), losses={"load": 1.0}), "losses"),
    (lambda: MoELayer(D, H, E, 3, router=TopKRouter(D, E, 1)), "k=3"),
    (lambda: MoELayer(D, H, E, 1, noisy=True, router=TopKRouter(D, E, 1)), "noisy"),
    (lambda: MoELayer(D, H, E, 1, temperature=5, router=TopKRouter(D, E, 1)), "temperature"),
    (lambda: MoELayer(D, H, E, 1, capacity_factor=1.0, router=TopKRouter(D, E, 1)), "capacity_factor"),
    (lambda: TopKRouter(D, E, 1, priority="random"), "priority"),
])
def test_settings_that_cannot_work_are_refused(build, arg):
    with pytest.raises(ValueError, match=arg):
        build()


def test_what_can_work_is_still_accepted():
    MoELayer(D, H, E, 1, noisy=True, losses={"load": 1.0})
    MoELayer(D, H, E, E, router=SoftmaxRouter(D, E))  # the default losses skip 'switch' for a dense router
    MoELayer(D, H, E, 1, router=ExpertChoiceRouter(D, E, 1.0), losses={"z": 1.0, "importance": 0.01})
    assert MoELayer(D, H, E, 1, router=ExpertChoiceRouter(D, E, 1.0)).losses == {}
    MoELayer(D, H, E, 2, router=TopKRouter(D, E, 2), losses={"z": 1.0})


def test_z_loss_refuses_a_routing_without_scores_at_forward():
    r = HierarchicalRouter(D, 2, 2)
    with pytest.raises(ValueError, match="z loss"):
        LOSSES["z"](r(torch.randn(4, D)), None)


# ------------------------------------------------------------------ 9. TokenGroups
def test_token_groups_weight_groups_by_their_tokens():
    torch.manual_seed(0)
    tg = TokenGroups(SoftMoELayer(D, H, E, losses={"sample_entropy": 1.0}), 8)
    x = torch.randn(17, D)
    tg(x[:16])
    full = float(tg.layer.aux_loss.detach())
    tg(x[16:])
    short = float(tg.layer.aux_loss.detach())
    tg(x)
    assert float(tg.layer.aux_loss.detach()) == pytest.approx(16 / 17 * full + 1 / 17 * short, rel=1e-5)
    assert float(tg.layer.aux_losses["sample_entropy"].detach()) == pytest.approx(float(tg.layer.aux_loss.detach()), rel=1e-6)
    assert tg.layer.last_routing.num_tokens == 17


# ------------------------------------------------------------------ 10. combine="probs"
@pytest.mark.parametrize("router", [
    lambda: TopKRouter(D, 4, 2, normalize=False),
    lambda: TopKRouter(D, 4, 1),
    lambda: TopKRouter(D, 4, 2, capacity_factor=0.5),
])
@pytest.mark.parametrize("mode", ["dense", "loop", "auto"])
def test_probs_combine_returns_log_probabilities(router, mode):
    torch.manual_seed(0)
    moe = MoE([MLPExpert(D, 6, 5) for _ in range(4)], router(), dispatch=mode, combine="probs")
    with torch.no_grad():
        out = moe(torch.randn(12, D))
    assert torch.allclose(out.exp().sum(-1), torch.ones(12), atol=1e-5)
    dropped = moe.last_routing.weights.sum(-1) == 0
    assert torch.allclose(out[dropped], torch.full_like(out[dropped], -math.log(5)))


# ------------------------------------------------------------------ drop priority
def test_default_priority_drops_later_rows():
    idx = torch.zeros(6, 1, dtype=torch.long)
    assert apply_capacity(idx, 2, 2)[:, 0].tolist() == [True, True, False, False, False, False]


def test_score_priority_drops_the_lowest_scores_first():
    idx = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    scores = torch.tensor([0.3, 0.9, 0.5, 0.1])
    keep = apply_capacity(idx, 2, 2, scores)
    # first choices in score order: token 1 (e0), 2 (e0), 0 (e0: full), 3 (e1); then second
    # choices in the same order: token 1 (e1), 2 (e1: full), 0 (e1: full), 3 (e0: full)
    assert keep.tolist() == [[False, False], [True, True], [True, False], [True, False]]
    # by position instead, the later rows lose: token 2's first choice is dropped, not token 0's
    assert apply_capacity(idx, 2, 2).tolist() == [[True, True], [True, False], [False, False], [True, False]]


def test_router_score_priority_against_a_sorted_oracle():
    torch.manual_seed(0)
    r = TopKRouter(D, E, 2, capacity_factor=0.5, priority="score")
    with torch.no_grad():
        r.gate.weight.normal_()
    x = torch.randn(10, D)
    routing = r(x)
    top = routing.probs.gather(1, routing.indices)
    top = top / top.sum(-1, keepdim=True)
    order = torch.argsort(top[:, 0], descending=True, stable=True)
    cap = capacity(0.5, 10, E, 2)
    used, keep = [0] * E, torch.zeros(10, 2, dtype=torch.bool)
    for rank in range(2):
        for t in order.tolist():
            e = int(routing.indices[t, rank])
            if used[e] < cap:
                used[e] += 1
                keep[t, rank] = True
    assert torch.equal(routing.mask.gather(1, routing.indices), keep)
    assert routing.chosen_mask.sum() == 20 and routing.mask.sum() < 20


# ------------------------------------------------------------------ finite checks
def test_nan_input_still_raises_on_cpu_and_checks_can_be_turned_off():
    r = TopKRouter(D, E, 1)
    x = torch.randn(4, D)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        r(x)
    previous = set_finite_checks("off")
    try:
        r(x)
    finally:
        set_finite_checks(previous)
    with pytest.raises(ValueError, match="mode"):
        set_finite_checks("sometimes")


# ------------------------------------------------------------------ float64 gradcheck
def _routing64(T=7, k=2, capacity_factor=None):
    torch.manual_seed(0)
    r = TopKRouter(D, E, k, capacity_factor=capacity_factor).double()
    with torch.no_grad():
        r.gate.weight.normal_()
    return r, r(torch.randn(T, D, dtype=torch.float64))


def test_gradcheck_combine_pairs():
    _, routing = _routing64()
    t_idx, _, w, _ = sorted_pairs(routing)
    y = torch.randn(len(t_idx), 3, dtype=torch.float64, requires_grad=True)
    w = w.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y, w: combine_pairs(y, w, t_idx, 7), (y, w))


@pytest.mark.parametrize("expert", ["mlp", "swiglu"])
def test_gradcheck_sorted_nodes(expert):
    from tutorial_moe.experts import ExpertBank

    torch.manual_seed(0)
    bank = ExpertBank(E, 4, 6, kind=expert).double()
    xs = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    counts = (3, 0, 4, 2)
    names = ("w1", "b1", "w2", "b2") if expert == "mlp" else ("w_gate", "w_up", "w_down")
    node = dispatch_mod._SortedMLP if expert == "mlp" else dispatch_mod._SortedSwiGLU
    weights = [getattr(bank, n).detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(lambda xs, *ws: node.apply(xs, counts, *ws), (xs, *weights))


@pytest.mark.skipif(not GROUPED64, reason="torch._grouped_mm has no float64 kernel here")
def test_gradcheck_grouped_nodes():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 4, 2])
    e_idx = torch.repeat_interleave(torch.arange(4), counts)
    offs = counts.cumsum(0).to(torch.int32)
    a = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 4, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b, bias: dispatch_mod._gmm(a, b, offs, bias, tuple(counts.tolist()), e_idx)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b, bias))
    assert torch.autograd.gradcheck(lambda a, b: dispatch_mod._gmm(a, b, offs), (a, b))


FLOAT64_MODES = [m for m in DISPATCH_MODES if m != "grouped" or GROUPED64]


@pytest.mark.parametrize("expert", ["mlp", "swiglu"])
@pytest.mark.parametrize("mode", FLOAT64_MODES)
def test_gradcheck_moe_layer(mode, expert):
    torch.manual_seed(0)
    layer = MoELayer(4, 8, E, 2, expert=expert, dispatch=mode, capacity_factor=0.75,
                     losses={"switch": 0.1, "z": 0.01, "importance": 0.1}).double()
    with torch.no_grad():
        layer.router.gate.weight.normal_()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    params = [layer.router.gate.weight] + list(layer.experts.parameters())

    def f(x, *ps):
        out = layer(x)
        return out, layer.aux_loss

    # The routing is piecewise constant in x; gradcheck's small steps stay on one piece.
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-7, atol=1e-5)


def test_gradcheck_grouped_helper_nodes():
    """The grouped path's own nodes (bias add in place, contiguous gradient) in float64, without
    torch._grouped_mm (whose CPU kernel has no float64)."""
    torch.manual_seed(0)
    counts = (3, 0, 4, 2)
    e_idx = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    h = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    # h * 1 makes a fresh non-leaf tensor, as the grouped matmul's output is, for the in-place add.
    assert torch.autograd.gradcheck(lambda h, b: dispatch_mod._AddExpertBias.apply(h * 1, b, counts, e_idx), (h, bias))
    assert torch.autograd.gradcheck(lambda h: dispatch_mod._ContiguousGrad.apply(h).expand(2, 9, 5), (h,))

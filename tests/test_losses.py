"""Auxiliary losses at points where the answer is known, and the direction each one pushes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from tutorial_moe import MoELayer, TopKRouter, total_aux_loss
from tutorial_moe.losses import (
    LOSSES,
    batch_entropy_loss,
    batch_variance_loss,
    cross_sample_variance,
    cv_squared,
    diversity_loss,
    entropy,
    importance_loss,
    load_loss,
    sample_entropy_loss,
    sample_variance_loss,
    switch_balance_loss,
    z_loss,
)

E = 4


def _balanced(T=8, E=E):
    """Uniform probabilities and a mask that gives every expert the same number of tokens."""
    probs = torch.full((T, E), 1.0 / E)
    mask = torch.nn.functional.one_hot(torch.arange(T) % E, E).bool()
    return probs, mask


def _collapsed(T=8, E=E):
    probs = torch.zeros(T, E)
    probs[:, 0] = 1
    return probs, probs.bool()


# ------------------------------------------------------------------ known values
def test_switch_loss_is_one_when_balanced_and_E_when_collapsed():
    assert switch_balance_loss(*_balanced()).item() == pytest.approx(1.0, abs=1e-6)
    assert switch_balance_loss(*_collapsed()).item() == pytest.approx(E, abs=1e-6)


def test_switch_loss_counts_assignments_for_top2():
    probs, _ = _balanced()
    mask = torch.zeros(8, E, dtype=torch.bool)
    mask[:, :2] = True  # every token on experts 0 and 1: f = (1/2, 1/2, 0, 0)
    assert switch_balance_loss(probs, mask).item() == pytest.approx(E * (0.5 * 0.25 * 2), abs=1e-6)


def test_switch_loss_gradient_flows_through_probs_only():
    logits = torch.randn(8, E, requires_grad=True)
    probs = logits.softmax(-1)
    loss = switch_balance_loss(probs, probs.detach() > 0.25)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_z_loss_of_zero_logits_is_ln_E_squared():
    assert z_loss(torch.zeros(5, E)).item() == pytest.approx(math.log(E) ** 2, rel=1e-6)
    logits = torch.full((3, E), 2.0, requires_grad=True)
    z_loss(logits).backward()
    assert (logits.grad > 0).all()  # descending shrinks the logits


def test_importance_cv2():
    probs, _ = _balanced()
    assert importance_loss(probs).item() == pytest.approx(0.0, abs=1e-9)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # importance (1, 3): var 1, mean 2
    assert importance_loss(w).item() == pytest.approx(0.25, rel=1e-6)
    assert cv_squared(torch.tensor([5.0, 5.0, 5.0])).item() == 0.0


def test_load_loss():
    assert load_loss(torch.tensor([2.0, 2.0])).item() == pytest.approx(0.0, abs=1e-9)
    assert load_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(0.25, rel=1e-6)


def test_entropy_losses_at_known_points():
    probs, _ = _balanced()
    assert batch_entropy_loss(probs).item() == pytest.approx(-math.log(E), rel=1e-6)
    assert sample_entropy_loss(probs).item() == pytest.approx(math.log(E), rel=1e-6)
    onehot, _ = _collapsed()
    assert sample_entropy_loss(onehot).item() == pytest.approx(0.0, abs=1e-9)
    assert batch_entropy_loss(onehot).item() == pytest.approx(0.0, abs=1e-9)
    # a batch of one-hot gates spread evenly: every sample decisive, the batch balanced
    spread = torch.eye(E)
    assert sample_entropy_loss(spread).item() == pytest.approx(0.0, abs=1e-9)
    assert batch_entropy_loss(spread).item() == pytest.approx(-math.log(E), rel=1e-6)


def test_entropy_zero_log_zero_is_zero_with_finite_gradient():
    p = torch.tensor([1.0, 0.0, 0.0], requires_grad=True)
    h = entropy(p)
    assert h.item() == 0.0
    h.backward()
    assert torch.isfinite(p.grad).all()
    # through a softmax that underflows to exact zeros
    logits = torch.tensor([[200.0, 0.0, -200.0]], requires_grad=True)
    sample_entropy_loss(logits.softmax(-1)).backward()
    assert torch.isfinite(logits.grad).all()


def test_variance_losses_at_known_points():
    probs, _ = _balanced()
    assert batch_variance_loss(probs).item() == pytest.approx(0.0, abs=1e-9)
    assert sample_variance_loss(probs).item() == pytest.approx(0.0, abs=1e-9)
    onehot, _ = _collapsed()
    var_onehot = torch.tensor([1.0, 0, 0, 0]).var(unbiased=False).item()
    assert batch_variance_loss(onehot).item() == pytest.approx(var_onehot, rel=1e-6)
    assert sample_variance_loss(onehot).item() == pytest.approx(-var_onehot, rel=1e-6)


def test_cross_sample_variance_at_known_points():
    """0 for any batch whose samples share one gate (balanced or collapsed), 1/4 for two experts
    when half the batch goes wholly to each, and the slow per-expert formula otherwise."""
    probs, _ = _balanced()
    assert cross_sample_variance(probs).item() == 0.0
    assert cross_sample_variance(_collapsed()[0]).item() == 0.0
    halves = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    assert cross_sample_variance(halves).item() == 0.25
    g = torch.softmax(torch.randn(7, 3, dtype=torch.float64), -1)
    slow = sum(sum((g[t, e] - g[:, e].mean()) ** 2 for t in range(7)) / 7 for e in range(3)) / 3
    assert cross_sample_variance(g).item() == pytest.approx(float(slow), rel=1e-12)
    empty = torch.zeros(0, 2, requires_grad=True)
    assert cross_sample_variance(empty).item() == 0.0
    assert LOSSES["neg_cross_sample_variance"](type("R", (), {"probs": halves})(), None).item() == -0.25


def test_maximising_cross_sample_variance_routes_samples_apart():
    """One step on -cross_sample_variance moves every sample's gate away from the batch's mean gate."""
    logits = torch.randn(16, 2) * 0.3
    after = _step(lambda p: -cross_sample_variance(p), logits)
    before_p, after_p = logits.softmax(-1)[:, 0], after.softmax(-1)[:, 0]
    assert cross_sample_variance(after.softmax(-1)) > cross_sample_variance(logits.softmax(-1))
    away = torch.sign(after_p - before_p) == torch.sign(before_p - before_p.mean())
    assert away.all()


def _step(loss_fn, logits, lr=0.5):
    logits = logits.clone().requires_grad_(True)
    loss_fn(logits.softmax(-1)).backward()
    return (logits - lr * logits.grad).detach()


def test_minimising_batch_variance_balances():
    logits = torch.randn(16, E)
    logits[:, 0] += 2.0  # the batch leans on expert 0
    after = _step(batch_variance_loss, logits)
    before_use, after_use = logits.softmax(-1).mean(0), after.softmax(-1).mean(0)
    assert entropy(after_use) > entropy(before_use)  # closer to uniform use
    assert after_use[0] < before_use[0]


def test_minimising_sample_variance_sharpens():
    logits = torch.randn(16, E) * 0.5
    after = _step(sample_variance_loss, logits)
    assert entropy(after.softmax(-1)).mean() < entropy(logits.softmax(-1)).mean()
    assert (after.softmax(-1).max(-1).values >= logits.softmax(-1).max(-1).values - 1e-7).all()


def test_minimising_entropy_losses_pushes_as_documented():
    logits = torch.randn(16, E)
    logits[:, 0] += 2.0
    after = _step(batch_entropy_loss, logits)
    assert entropy(after.softmax(-1).mean(0)) > entropy(logits.softmax(-1).mean(0))
    after = _step(sample_entropy_loss, logits)
    assert entropy(after.softmax(-1)).mean() < entropy(logits.softmax(-1)).mean()


def test_diversity_loss_identical_and_orthogonal():
    y = torch.randn(1, 6, 5)
    assert diversity_loss(y.expand(3, 6, 5)).item() == pytest.approx(1.0, abs=1e-6)
    eye = torch.eye(4)  # expert e outputs basis vector e for every token
    ortho = eye[:, None, :].expand(4, 6, 4)
    assert diversity_loss(ortho).item() == pytest.approx(0.0, abs=1e-6)
    assert diversity_loss(torch.randn(1, 6, 5)).item() == 0.0  # one expert: nothing to compare


def test_diversity_loss_is_used_by_the_layer():
    layer = MoELayer(8, 8, E, 2, losses={"diversity": 0.5})
    x = torch.randn(6, 8)
    layer(x)
    expected = 0.5 * diversity_loss(layer.experts.forward_all(x))
    assert torch.allclose(layer.aux_losses["diversity"], expected)
    # a mean of cosines: at most 1, at least -1 / (E - 1) (E unit vectors cannot all oppose)
    assert -1 / (E - 1) - 1e-6 <= expected.item() / 0.5 <= 1
    layer.aux_loss.backward()
    assert layer.experts.w2.grad.abs().sum() > 0


# ------------------------------------------------------------------ wiring into layers
def test_layer_aux_losses_are_weighted_and_summed():
    weights = {"switch": 0.5, "z": 0.1, "importance": 2.0, "batch_entropy": 1.0, "sample_entropy": 0.3,
               "batch_variance": 1.0, "sample_variance": 1.0}
    layer = MoELayer(8, 8, E, 2, losses=weights)
    x = torch.randn(12, 8)
    layer(x)
    r = layer.last_routing
    expected = {
        "switch": 0.5 * switch_balance_loss(r.probs, r.mask),
        "z": 0.1 * z_loss(r.logits),
        "importance": 2.0 * importance_loss(r.weights),
        "batch_entropy": batch_entropy_loss(r.probs),
        "sample_entropy": 0.3 * sample_entropy_loss(r.probs),
        "batch_variance": batch_variance_loss(r.probs),
        "sample_variance": sample_variance_loss(r.probs),
    }
    assert set(layer.aux_losses) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(layer.aux_losses[name], value), name
    assert torch.allclose(layer.aux_loss, torch.stack(list(expected.values())).sum())


def test_zero_weight_losses_are_skipped_and_default_is_switch():
    layer = MoELayer(8, 8, E, 2, losses={"switch": 0.0, "z": 1e-3})
    layer(torch.randn(4, 8))
    assert list(layer.aux_losses) == ["z"]
    default = MoELayer(8, 8, E, 2)
    default(torch.randn(4, 8))
    assert list(default.aux_losses) == ["switch"]


def test_noisy_layer_load_loss_and_threshold_loss_names_exist():
    assert set(LOSSES) >= {"switch", "z", "importance", "load", "batch_entropy", "sample_entropy",
                           "batch_variance", "sample_variance", "diversity", "threshold"}
    layer = MoELayer(8, 8, E, 2, noisy=True, losses={"load": 1.0})
    layer.train()
    layer(torch.randn(16, 8))
    assert layer.aux_losses["load"].requires_grad


def test_total_aux_loss_sums_every_moe_module():
    model = nn.Sequential(MoELayer(8, 8, E, 2), nn.GELU(), MoELayer(8, 8, E, 1, losses={"z": 1.0}))
    model(torch.randn(4, 8))
    total = total_aux_loss(model)
    assert torch.allclose(total, model[0].aux_loss + model[2].aux_loss)


# ------------------------------------------------------------------ gradients reach the router
@pytest.mark.parametrize("k,normalize", [(2, True), (1, False), (3, True)])
def test_task_loss_alone_reaches_the_router_through_combine_weights(k, normalize):
    router = TopKRouter(8, E, k, normalize=normalize)
    layer = MoELayer(8, 8, E, k, router=router, losses={})
    x = torch.randn(12, 8)
    target = torch.randn(12, 8)
    loss = (layer(x) - target).pow(2).mean()
    assert layer.aux_loss.item() == 0.0
    loss.backward()
    assert router.gate.weight.grad is not None
    assert router.gate.weight.grad.abs().max() > 1e-6

"""Expert surgery (prune, split, switch off, gradient scaling) and the mixture-density head."""
import math

import pytest
import torch

from tutorial_moe import MoELayer
from tutorial_moe.mixture_density import MixtureDensityNetwork, mixture_nll
from tutorial_moe.surgery import (
    nonfinite_experts,
    prune_experts,
    scale_expert_gradients,
    split_expert,
    switch_off_experts,
)


def _layer(E=6, k=2, seed=0):
    torch.manual_seed(seed)
    return MoELayer(8, 16, E, k, losses={})


def test_pruning_an_unchosen_expert_leaves_top2_outputs_unchanged():
    layer = _layer()
    x = torch.randn(40, 8).abs()  # positive inputs, so the signs below fix every score's sign
    with torch.no_grad():
        layer.router.gate.weight.abs_()
        layer.router.gate.weight[5].neg_()  # expert 5 scores below every other expert
    y = layer(x)
    assert not layer.last_routing.mask[:, 5].any()
    pruned = prune_experts(layer, [0, 1, 2, 3, 4])
    assert pruned.num_experts == 5 and pruned.experts.w1.shape[0] == 5
    # Renormalised top-2 weights: dropping an expert outside every top 2 changes nothing.
    torch.testing.assert_close(pruned(x), y)


def test_split_copies_the_expert_and_its_gate_row():
    layer = _layer()
    grown = split_expert(layer, 2, noise=0.0)
    assert grown.num_experts == 7
    torch.testing.assert_close(grown.experts.w1[6], layer.experts.w1[2])
    torch.testing.assert_close(grown.router.gate.weight[6], layer.router.gate.weight[2])
    noisy = split_expert(layer, 2, noise=0.1)
    assert not torch.equal(noisy.router.gate.weight[6], layer.router.gate.weight[2])
    assert noisy(torch.randn(5, 8)).shape == (5, 8)


def test_switched_off_expert_is_never_chosen_and_can_come_back():
    layer = _layer(k=1)
    x = torch.randn(200, 8)
    layer(x)
    busiest = int(layer.last_routing.mask.sum(0).argmax())
    handle = switch_off_experts(layer, [busiest])
    layer(x)
    assert not layer.last_routing.mask[:, busiest].any()
    handle.remove()
    layer(x)
    assert layer.last_routing.mask[:, busiest].any()


def test_nonfinite_experts_finds_the_poisoned_one():
    layer = _layer()
    with torch.no_grad():
        layer.experts.b2[3, 0] = float("inf")
    assert nonfinite_experts(layer, torch.randn(4, 8)) == [3]


def test_gradient_scaling_multiplies_by_mean_over_own_load():
    layer = _layer(k=1)
    x = torch.randn(64, 8)
    ref = _layer(k=1)
    ref.load_state_dict(layer.state_dict())
    ref(x).sum().backward()
    handles = scale_expert_gradients(layer, max_scale=1e6)
    layer(x).sum().backward()
    load = layer.last_routing.mask.sum(0).float()
    for e in range(6):
        if load[e] > 0:
            s = load.mean() / load[e]
            torch.testing.assert_close(layer.experts.w1.grad[e], ref.experts.w1.grad[e] * s)
    for h in handles:
        h.remove()


def test_bad_input_is_refused():
    layer = _layer()
    with pytest.raises(ValueError, match="keep"):
        prune_experts(layer, [])
    with pytest.raises(ValueError, match="expert"):
        split_expert(layer, 9)
    with pytest.raises(ValueError, match="k="):
        switch_off_experts(layer, range(6))
    with pytest.raises(TypeError, match="MoELayer"):
        prune_experts(torch.nn.Linear(2, 2), [0])


def test_mixture_nll_matches_torch_distributions():
    torch.manual_seed(0)
    N, E, d = 7, 3, 2
    logits, mu, log_sigma, y = torch.randn(N, E), torch.randn(N, E, d), torch.randn(N, E, d) * 0.3, torch.randn(N, d)
    D = torch.distributions
    mix = D.MixtureSameFamily(D.Categorical(logits=logits),
                              D.Independent(D.Normal(mu, log_sigma.exp()), 1))
    ours = mixture_nll(logits.log_softmax(-1), mu, log_sigma, y)
    torch.testing.assert_close(ours, -mix.log_prob(y).mean())


def test_mdn_gradcheck_and_shapes():
    net = MixtureDensityNetwork(1, 1, 3, d_hidden=4).double()
    x, y = torch.randn(5, 1, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    log_pi, mu, log_sigma = net(x)
    assert log_pi.shape == (5, 3) and mu.shape == (5, 3, 1)
    torch.testing.assert_close(log_pi.exp().sum(1), torch.ones(5, dtype=torch.float64))
    mu_in = mu.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda m: mixture_nll(log_pi.detach(), m, log_sigma.detach(), y), (mu_in,))
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(5, 2, dtype=torch.float64))
    assert math.isfinite(net.nll(x, y).item())

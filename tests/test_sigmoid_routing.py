"""Sigmoid scoring with a selection-only bias (DeepSeek-V3, arXiv 2412.19437) in TopKRouter."""
from __future__ import annotations

import pytest
import torch

from tutorial_moe import MoELayer, TopKRouter
from tutorial_moe.losses import switch_balance_loss

D, E, T = 8, 6, 20


def _oracle(x, weight, bias, k, normalize=True):
    """DeepSeek-V3 eqs. 15-17 written out: s = sigmoid(x W^T); top-k of s + b; g = s / sum s."""
    s = torch.sigmoid(x @ weight.t())
    idx = (s + bias).topk(k, dim=-1).indices
    g = s.gather(1, idx)
    if normalize:
        g = g / g.sum(-1, keepdim=True)
    weights = torch.zeros_like(s).scatter(1, idx, g)
    return s, idx, weights


@pytest.mark.parametrize("k", [2, 3])
def test_sigmoid_router_matches_the_written_out_oracle(k):
    torch.manual_seed(0)
    r = TopKRouter(D, E, k, scoring="sigmoid", bias_update_rate=0.01).double()
    with torch.no_grad():
        r.expert_bias.copy_(torch.linspace(-0.3, 0.3, E))
    x = torch.randn(T, D, dtype=torch.float64)
    routing = r(x)
    s, idx, weights = _oracle(x, r.gate.weight, r.expert_bias.double(), k)
    torch.testing.assert_close(routing.weights, weights)
    torch.testing.assert_close(routing.probs, s / s.sum(-1, keepdim=True))
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(T, dtype=torch.float64))
    assert torch.equal(routing.mask, weights > 0)
    assert set(map(tuple, routing.indices.sort(-1).values.tolist())) == set(
        map(tuple, idx.sort(-1).values.tolist()))
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(T, dtype=torch.float64))


def test_normalize_false_keeps_the_raw_affinity_and_allows_k1():
    torch.manual_seed(1)
    r = TopKRouter(D, E, 1, scoring="sigmoid", normalize=False)
    x = torch.randn(T, D)
    routing = r(x)
    s = torch.sigmoid(r.gate(x))
    torch.testing.assert_close(routing.weights.sum(-1), s.max(-1).values)


def test_bias_chooses_but_never_weighs():
    torch.manual_seed(2)
    r = TopKRouter(D, E, 2, scoring="sigmoid", bias_update_rate=0.01)
    x = torch.randn(T, D)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0]))  # forces experts 0 and 1
    routing = r(x)
    assert routing.mask[:, :2].all() and not routing.mask[:, 2:].any()
    s = torch.sigmoid(r.gate(x))[:, :2]
    torch.testing.assert_close(routing.weights[:, :2], s / s.sum(-1, keepdim=True))


def test_bias_update_moves_toward_underloaded_experts_with_sigmoid():
    r = TopKRouter(D, E, 2, scoring="sigmoid", bias_update_rate=0.1)
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[:, 0] = torch.linspace(2, -2, E)  # experts 0, 1 preferred
    x = torch.randn(T, D)
    x[:, 0] = x[:, 0].abs() + 1
    r.train()
    r(x)
    step = r.update_expert_bias()
    assert step[0] < 0 and step[1] < 0 and (step[2:] > 0).all()


def test_sigmoid_gradients_float64_gradcheck():
    torch.manual_seed(3)
    r = TopKRouter(D, E, 2, scoring="sigmoid").double()
    x = torch.randn(6, D, dtype=torch.float64)
    w0 = r.gate.weight.detach().clone()

    def weights_of(w):
        # the selection is piecewise constant: gradcheck's tiny steps do not cross a boundary
        s = torch.sigmoid(x @ w.t())
        idx = r(x).indices
        g = s.gather(1, idx)
        return g / g.sum(-1, keepdim=True)

    torch.autograd.gradcheck(weights_of, (w0.requires_grad_(),))
    # and the package's weights carry the same gradient as the oracle's
    r.gate.weight.grad = None
    probe = torch.randn(6, E, dtype=torch.float64)
    (r(x).weights * probe).sum().backward()
    w = w0.detach().clone().requires_grad_()
    _, _, ref = _oracle(x, w, torch.zeros(E, dtype=torch.float64), 2)
    (ref * probe).sum().backward()
    torch.testing.assert_close(r.gate.weight.grad, w.grad)
    assert r.gate.weight.grad.abs().sum() > 0


def test_switch_loss_on_sigmoid_routing_is_meaningful():
    torch.manual_seed(4)
    layer = MoELayer(D, 16, E, 2, router=TopKRouter(D, E, 2, scoring="sigmoid"), losses={"switch": 1.0})
    x = torch.randn(T, D)
    layer(x).sum().backward()
    routing = layer.last_routing
    loss = switch_balance_loss(routing.probs, routing.chosen_mask)
    # E * sum f_i P_i with rows of P summing to 1 lies in [min over experts, E]; > 0 here.
    assert torch.isfinite(loss) and 0 < loss <= E
    torch.testing.assert_close(layer.aux_losses["switch"], loss)
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_softmax_default_unchanged():
    torch.manual_seed(5)
    x = torch.randn(T, D)
    a = TopKRouter(D, E, 2)
    b = TopKRouter(D, E, 2, scoring="softmax")
    b.load_state_dict(a.state_dict())
    ra, rb = a(x), b(x)
    torch.testing.assert_close(ra.weights, rb.weights)
    torch.testing.assert_close(ra.probs, a.gate(x).softmax(-1))


def test_bad_scoring_input_is_refused():
    with pytest.raises(ValueError, match="scoring"):
        TopKRouter(D, E, 2, scoring="tanh")
    with pytest.raises(ValueError, match="k=1"):
        TopKRouter(D, E, 1, scoring="sigmoid")
    with pytest.raises(ValueError, match="noisy"):
        TopKRouter(D, E, 2, scoring="sigmoid", noisy=True)
    r = TopKRouter(D, E, 2, scoring="sigmoid")
    with pytest.raises(ValueError, match="k=1"):
        r.k = 1
    assert r.k == 2

"""Sparse upcycling (arXiv 2212.05055): the upcycled layer computes the dense block exactly at
initialisation, its gradients add up to the dense ones, and bad blocks are refused."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tutorial_moe import MoELayer, moe_modules
from tutorial_moe.upcycle import dense_ffn_parts, max_abs_diff, upcycle, upcycle_model


def _ffn(d=6, h=10, act=None, dtype=torch.float64, bias=True):
    return nn.Sequential(nn.Linear(d, h, bias=bias), act or nn.GELU(), nn.Linear(h, d, bias=bias)).to(dtype)


class FC12(nn.Module):
    """The shape of the chapter-11 language model's dense block: fc2(gelu(fc1(x)))."""

    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x, ids=None):
        return self.fc2(F.gelu(self.fc1(x)))


@pytest.mark.parametrize("num_experts,k", [(4, 1), (4, 2), (6, 3), (5, 5)])
@pytest.mark.parametrize("dispatch", ["dense", "loop", "sorted"])
def test_upcycled_layer_equals_dense_block_float64(num_experts, k, dispatch):
    ffn = _ffn()
    moe = upcycle(ffn, num_experts, k, dispatch=dispatch, router_std=0.5)  # a spread-out router
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    assert max_abs_diff(ffn, moe, x) <= 1e-14
    # The routing really is sparse and varied (not everyone on experts 0..k-1).
    assert int(moe.last_routing.mask.sum()) == 21 * k
    if k < num_experts:
        assert int(moe.last_routing.mask.any(0).sum()) > k


def test_upcycled_layer_equals_dense_block_float32():
    ffn = _ffn(16, 32, dtype=torch.float32)
    moe = upcycle(ffn, 8, 2)
    x = torch.randn(64, 16)
    y = ffn(x).detach()
    assert max_abs_diff(ffn, moe, x) <= 4 * torch.finfo(torch.float32).eps * float(y.abs().max())


def test_zero_router_combines_exactly_when_weights_are_powers_of_two():
    ffn = _ffn()
    moe = upcycle(ffn, 8, 2, router_std=0.0, dispatch="loop")
    x = torch.randn(10, 6, dtype=torch.float64)
    # Weights 1/2 + 1/2 on two identical expert outputs: the combine adds no rounding at all.
    bank = moe.experts
    with torch.no_grad():
        assert torch.equal(moe(x), bank.apply_expert(bank.expert_params()[0], x))
    # Against the dense block only the matmul kernels differ (the expert multiplies by its
    # stored weight, nn.Linear by the transpose), which some CPUs round differently: a few ulp.
    scale = float(ffn(x).detach().abs().max())
    assert max_abs_diff(ffn, moe, x) <= 8 * torch.finfo(torch.float64).eps * scale
    # Ties go to the lowest ids: every token on experts 0 and 1, weights 1/2 each.
    assert moe.last_routing.mask[:, :2].all() and not moe.last_routing.mask[:, 2:].any()
    torch.testing.assert_close(moe.last_routing.weights[:, :2], torch.full((10, 2), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("form", ["pair", "fc12", "no_bias", "relu", "silu"])
def test_every_accepted_form_upcycles_exactly(form):
    torch.manual_seed(1)
    if form == "pair":
        fc_in, fc_out = nn.Linear(6, 9).double(), nn.Linear(9, 6).double()
        ffn, dense = (fc_in, fc_out), (lambda x: fc_out(F.gelu(fc_in(x))))
    elif form == "fc12":
        ffn = dense = FC12(6, 9).double()
    elif form == "no_bias":
        ffn = dense = _ffn(bias=False)
    else:
        ffn = dense = _ffn(act=nn.ReLU() if form == "relu" else nn.SiLU())
    moe = upcycle(ffn, 4, 2)
    assert max_abs_diff(dense, moe, torch.randn(12, 6, dtype=torch.float64)) <= 1e-14


def test_experts_are_copies_not_shared_tensors():
    ffn = _ffn()
    before = [p.detach().clone() for p in ffn.parameters()]
    moe = upcycle(ffn, 3, 2)
    bank = moe.experts
    for e in range(3):
        assert torch.equal(bank.w1[e], ffn[0].weight.t()) and torch.equal(bank.b1[e], ffn[0].bias)
        assert torch.equal(bank.w2[e], ffn[2].weight.t()) and torch.equal(bank.b2[e], ffn[2].bias)
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(1.0)
    for p, b in zip(ffn.parameters(), before):
        assert torch.equal(p, b)


def test_gradients_of_the_copies_add_up_to_the_dense_gradient():
    # At initialisation d loss / d W_e = sum over tokens on e of w_e(t) * (dense grad of token t);
    # the weights of a token sum to 1, so summing over experts gives the dense gradient.
    ffn = _ffn()
    moe = upcycle(ffn, 5, 2, router_std=0.5, dispatch="loop", losses={})
    x = torch.randn(20, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randn(20, 6, dtype=torch.float64)
    ((ffn(x) - target) ** 2).sum().backward()
    dense_grads = [p.grad.clone() for p in ffn.parameters()]
    gx_dense = x.grad.clone()
    x.grad = None
    ((moe(x) - target) ** 2).sum().backward()
    bank = moe.experts
    torch.testing.assert_close(bank.w1.grad.sum(0), dense_grads[0].t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bank.b1.grad.sum(0), dense_grads[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bank.w2.grad.sum(0), dense_grads[2].t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bank.b2.grad.sum(0), dense_grads[3], rtol=1e-12, atol=1e-12)
    # The input gradient is the dense one (the router's path contributes 0: identical experts).
    torch.testing.assert_close(x.grad, gx_dense, rtol=1e-12, atol=1e-12)
    # Identical experts make the output independent of the router: its task gradient is 0.
    assert float(moe.router.gate.weight.grad.abs().max()) <= 1e-12


def test_jitter_breaks_the_symmetry_and_the_exactness():
    ffn = _ffn()
    g = torch.Generator().manual_seed(0)
    moe = upcycle(ffn, 4, 2, jitter=0.01, generator=g)
    assert not torch.equal(moe.experts.w1[0], moe.experts.w1[1])
    assert max_abs_diff(ffn, moe, torch.randn(8, 6, dtype=torch.float64)) > 1e-6


def test_generator_makes_the_router_reproducible():
    ffn = _ffn()
    a = upcycle(ffn, 4, 2, generator=torch.Generator().manual_seed(3))
    b = upcycle(ffn, 4, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.router.gate.weight, b.router.gate.weight)
    assert a.router.gate.weight.dtype == torch.float64


def test_upcycle_model_replaces_selected_blocks_and_keeps_the_output():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(6)
            self.ffn = FC12(6, 8)

        def forward(self, x, ids=None):
            return x + self.ffn(self.ln(x), ids)

    model = nn.Sequential(Block(), Block(), nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 6))).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    names = upcycle_model(model, 4, 2, select=lambda name, m: isinstance(m, (FC12, nn.Sequential)) and name != "")
    assert names == ["0.ffn", "1.ffn", "2"]
    assert all(isinstance(m, MoELayer) for m in (model[0].ffn, model[1].ffn, model[2]))
    assert len(moe_modules(model)) == 3
    with torch.no_grad():
        after = model(x)
    assert float((after - before).abs().max()) <= 1e-13


def test_upcycle_model_leaves_the_model_alone_when_a_block_is_bad():
    model = nn.Sequential(_ffn(), nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)))
    with pytest.raises(ValueError, match="d -> h -> d"):
        upcycle_model(model, 4, 2, select=lambda name, m: name in ("0", "1"))
    assert isinstance(model[0], nn.Sequential)


@pytest.mark.parametrize("ffn,kwargs,exc,match", [
    (nn.Sequential(nn.Linear(6, 8), nn.GELU()), {}, ValueError, "Sequential"),
    (nn.Sequential(nn.Linear(6, 8), nn.GELU(approximate="tanh"), nn.Linear(8, 6)), {}, ValueError, "approximate"),
    (nn.Sequential(nn.Linear(6, 8), nn.Softplus(), nn.Linear(8, 6)), {}, ValueError, "Softplus"),
    (nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6)), {"activation": "gelu"}, ValueError, "contradicts"),
    ((nn.Linear(6, 8), nn.Linear(8, 5)), {}, ValueError, "d -> h -> d"),
    ((nn.Linear(6, 8),), {}, TypeError, "pair"),
    (nn.LayerNorm(6), {}, TypeError, "fc1/fc2"),
    ("ffn", {}, TypeError, "nn.Sequential"),
    (None, {"activation": "swish"}, ValueError, "activation"),
])
def test_bad_blocks_are_refused(ffn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        upcycle(_ffn() if ffn is None else ffn, 4, 2, **kwargs)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((0, 1), {}, ValueError, "num_experts"),
    ((4, 5), {}, ValueError, "k=5"),
    ((4, 2.0), {}, TypeError, "k must be an int"),
    ((4, 2), {"router_std": -1.0}, ValueError, "router_std"),
    ((4, 2), {"jitter": float("nan")}, ValueError, "jitter"),
    ((4, 2), {"generator": 3}, TypeError, "generator"),
    ((4, 2), {"dispatch": "fast"}, ValueError, "dispatch"),
])
def test_bad_arguments_are_refused(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        upcycle(_ffn(), *args, **kwargs)


def test_bad_model_arguments_are_refused():
    with pytest.raises(TypeError, match="model must be"):
        upcycle_model("m", 4, 2, select=lambda n, m: True)
    with pytest.raises(TypeError, match="select"):
        upcycle_model(_ffn(), 4, 2, select=None)
    with pytest.raises(ValueError, match="matched no submodule"):
        upcycle_model(_ffn(), 4, 2, select=lambda n, m: False)
    with pytest.raises(ValueError, match="shape"):
        max_abs_diff(nn.Identity(), nn.Linear(6, 3), torch.randn(2, 6))


def test_dense_ffn_parts_reads_the_activation():
    fc_in, act, fc_out = dense_ffn_parts(_ffn(act=nn.Tanh()))
    assert act == "tanh" and fc_in.out_features == 10 and fc_out.in_features == 10


def test_the_chapter_11_language_model_upcycles_exactly():
    from tutorial_moe.experiments.lm import DenseFFN, LMConfig, TinyLM

    model = TinyLM(LMConfig(context=8, d_model=16, n_layers=2, n_heads=2, d_hidden=24)).double()
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 8))
    with torch.no_grad():
        before = model(tokens)
    names = upcycle_model(model, 4, 2, select=lambda name, m: isinstance(m, DenseFFN))
    assert names == ["blocks.0.ffn", "blocks.1.ffn"]
    with torch.no_grad():
        after = model(tokens)
    assert float((after - before).abs().max()) <= 1e-12

"""Shared experts (DeepSeekMoE / Qwen-MoE) against a token-by-token oracle, and fine-grained
configurations (DeepSeekMoE, arXiv 2401.06066) with exact compute bookkeeping."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from oracle import expert_on_token
from tutorial_moe import MoELayer, moe_modules, total_aux_loss
from tutorial_moe.shared_experts import SharedExpertMoE, expert_macs, expert_params, fine_grained


def _routes(layer: MoELayer, x):
    """Top-k of softmax(x . W_gate), renormalised over the k chosen (k > 1), one token at a time."""
    W = layer.router.gate.weight
    routes = []
    for t in range(x.shape[0]):
        scores = [(x[t] * W[e]).sum() for e in range(W.shape[0])]
        m = max(float(s.detach()) for s in scores)
        ex = [torch.exp(s - m) for s in scores]
        probs = [v / sum(ex) for v in ex]
        order = sorted(range(len(probs)), key=lambda e: -float(probs[e].detach()))[: layer.k]
        total = sum(probs[e] for e in order)
        routes.append([(e, probs[e] / total) for e in order])
    return routes


def _oracle(layer: SharedExpertMoE, x):
    rows = []
    for t, route in enumerate(_routes(layer.moe, x)):
        out = sum(w * expert_on_token(layer.moe.experts, e, x[t]) for e, w in route)
        shared = sum(expert_on_token(layer.shared, s, x[t]) for s in range(layer.num_shared))
        g = 1.0 if layer.shared_gate is None else torch.sigmoid((x[t] * layer.shared_gate).sum())
        rows.append(out + g * shared)
    return torch.stack(rows)


@pytest.mark.parametrize("dispatch", ["dense", "loop", "sorted"])
@pytest.mark.parametrize("num_shared,gate,kind", [(1, False, "mlp"), (2, True, "mlp"), (1, True, "swiglu")])
def test_layer_matches_the_slow_loop_in_outputs_and_gradients(dispatch, num_shared, gate, kind):
    layer = SharedExpertMoE(5, 7, 4, 2, num_shared=num_shared, shared_hidden=3, shared_gate=gate, expert=kind,
                            dispatch=dispatch, losses={}).double()
    if gate:
        with torch.no_grad():
            layer.shared_gate.normal_()  # away from the symmetric start, so a wrong gate shows
    with torch.no_grad():
        layer.moe.router.gate.weight.normal_()
    x = torch.randn(9, 5, dtype=torch.float64)
    out = layer(x)
    ref = _oracle(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    r = torch.randn_like(out)
    params = [p for p in layer.parameters()]
    g_layer = torch.autograd.grad((out * r).sum(), params)
    g_ref = torch.autograd.grad((ref * r).sum(), params)
    for p, a, b in zip(params, g_layer, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if gate:
        assert layer.last_shared_gate.shape == (9,)
    else:
        assert layer.last_shared_gate is None


def test_leading_dimensions_and_ids_pass_through():
    layer = SharedExpertMoE(6, 8, 4, 2, shared_gate=True, dispatch="dense").double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    out = layer(x)
    assert out.shape == x.shape and layer.last_shared_gate.shape == (2, 3)
    torch.testing.assert_close(out.reshape(6, 6), layer(x.reshape(6, 6)), rtol=1e-12, atol=1e-12)


def test_shared_part_is_added_to_the_plain_layer():
    layer = SharedExpertMoE(6, 8, 4, 2, dispatch="loop").double()
    x = torch.randn(10, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x) - layer.moe(x), layer.shared_output(x), rtol=1e-12, atol=1e-12)


def test_moe_modules_finds_the_routed_layer_once():
    layer = SharedExpertMoE(6, 8, 4, 2, losses={"switch": 0.1})
    layer(torch.randn(12, 6))
    assert moe_modules(layer) == [layer.moe]
    assert torch.equal(total_aux_loss(layer), layer.moe.aux_loss)


def test_active_parameters_count_shared_and_k_routed_experts():
    layer = SharedExpertMoE(6, 8, 5, 2, num_shared=2, shared_hidden=4)
    shared = 2 * expert_params(6, 4)
    routed = 2 * expert_params(6, 8)
    assert layer.active_params_per_token() == shared + routed


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"num_shared": 0}, ValueError, "num_shared"),
    ({"shared_hidden": 0}, ValueError, "shared_hidden"),
    ({"shared_gate": 1}, TypeError, "shared_gate"),
    ({"expert": "conv"}, ValueError, "expert"),
    ({"dispatch": "fast"}, ValueError, "dispatch"),
])
def test_bad_layer_arguments_are_refused(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SharedExpertMoE(6, 8, 4, 2, **kwargs)


def test_bad_input_is_refused():
    layer = SharedExpertMoE(6, 8, 4, 2)
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(3, 5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[0.0] * 6])


# ---------------------------------------------------------------- fine-grained configurations
@given(d=st.integers(1, 16), f=st.integers(1, 12), E=st.integers(1, 8), k=st.integers(1, 8),
       m=st.sampled_from([1, 2, 3, 4]), kind=st.sampled_from(["mlp", "swiglu"]), data=st.data())
def test_fine_grained_keeps_active_multiply_adds(d, f, E, k, m, kind, data):
    k = min(k, E)
    h = f * m
    s = data.draw(st.integers(0, m * k - 1))
    coarse = fine_grained(d, h, E, k, 1, expert=kind)
    fine = fine_grained(d, h, E, k, m, num_shared=s, expert=kind)
    assert fine.active_macs == coarse.active_macs == k * expert_macs(d, h, kind)
    assert fine.num_experts + fine.num_shared == m * E and fine.k + fine.num_shared == m * k
    assert fine.d_hidden * m == h
    # Stored parameters: equal for swiglu; mlp adds one output bias per extra fine expert.
    extra = (m - 1) * E * d if kind == "mlp" else 0
    assert fine.total_params == coarse.total_params + extra
    assert fine.combinations == math.comb(m * E - s, m * k - s)


@pytest.mark.parametrize("m,s", [(1, 0), (2, 0), (4, 0), (2, 1), (4, 2)])
def test_fine_grained_counts_match_the_built_layer(m, s):
    cfg = fine_grained(6, 16, 4, 2, m, num_shared=s)
    layer = cfg.build(dispatch="loop")
    if s:
        experts = list(layer.moe.experts.parameters()) + list(layer.shared.parameters())
        active = layer.active_params_per_token()
        router = layer.moe.router.gate.weight.numel()
    else:
        assert isinstance(layer, MoELayer)
        experts = list(layer.experts.parameters())
        active = layer.experts.active_params_per_token(layer.k)
        router = layer.router.gate.weight.numel()
    assert sum(p.numel() for p in experts) == cfg.total_params
    assert active == cfg.active_params
    assert router == cfg.router_params
    out = layer(torch.randn(5, 6))
    assert out.shape == (5, 6)


def test_fine_grained_kwargs_build_matching_layers():
    cfg = fine_grained(6, 16, 4, 2, 4)
    assert cfg.moe_kwargs() == dict(d_model=6, d_hidden=4, num_experts=16, k=8, expert="mlp")
    with pytest.raises(ValueError, match="num_shared=0"):
        cfg.layer_kwargs()
    shared = fine_grained(6, 16, 4, 2, 4, num_shared=2)
    assert shared.layer_kwargs()["num_shared"] == 2 and shared.layer_kwargs()["k"] == 6
    with pytest.raises(ValueError, match="SharedExpertMoE"):
        shared.moe_kwargs()


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((6, 10, 4, 2, 4), {}, ValueError, "not divisible"),
    ((6, 16, 4, 2, 0), {}, ValueError, "granularity"),
    ((6, 16, 4, 5, 2), {}, ValueError, "k=5"),
    ((6, 16, 4, 2, 2), {"num_shared": 4}, ValueError, "num_shared"),
    ((6, 16, 4, 2, 2), {"num_shared": -1}, ValueError, "num_shared"),
    ((6, 16, 4, 2, 2), {"expert": "conv"}, ValueError, "expert"),
    ((6, 16.0, 4, 2, 2), {}, TypeError, "d_hidden"),
])
def test_bad_fine_grained_arguments_are_refused(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fine_grained(*args, **kwargs)


def test_counting_helpers_refuse_unknown_kinds():
    with pytest.raises(ValueError, match="kind"):
        expert_macs(4, 4, "conv")
    with pytest.raises(ValueError, match="kind"):
        expert_params(4, 4, "conv")

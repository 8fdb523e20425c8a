"""Property tests (hypothesis): routing invariants over many small random shapes.

Shapes stay tiny and examples few (the profile in conftest.py), so the whole file runs in seconds.
"""
from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from tutorial_moe import (
    ExpertChoiceRouter,
    HierarchicalRouter,
    MoELayer,
    SoftmaxRouter,
    ThresholdRouter,
    TopKRouter,
)
from tutorial_moe.dispatch import DISPATCH_MODES, grouped_mm_available
from tutorial_moe.routing import capacity

D = 4  # a multiple of 4, so grouped dispatch (16-byte strides in fp32) is valid too


@st.composite
def topk_setup(draw, with_capacity):
    E = draw(st.integers(1, 6))
    k = draw(st.integers(1, E))
    T = draw(st.integers(1, 24))
    cf = draw(st.floats(0.1, 2.0)) if with_capacity else None
    normalize = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return E, k, T, cf, normalize, seed


def _make_topk(E, k, T, cf, normalize, seed):
    torch.manual_seed(seed)
    router = TopKRouter(D, E, k, capacity_factor=cf, normalize=normalize)
    with torch.no_grad():
        router.gate.weight.normal_()
    return router, torch.randn(T, D)


@given(topk_setup(with_capacity=False))
def test_exactly_k_experts_per_token_without_capacity(setup):
    E, k, T, _, normalize, seed = setup
    router, x = _make_topk(*setup)
    r = router(x)
    assert torch.equal(r.mask.sum(-1), torch.full((T,), k))
    assert not r.dropped.any()
    assert (r.weights[~r.mask] == 0).all() and (r.weights[r.mask] > 0).all()
    if normalize:
        assert torch.allclose(r.weights.sum(-1), torch.ones(T), atol=1e-5)


@given(topk_setup(with_capacity=True))
def test_capacity_is_respected_in_priority_order(setup):
    E, k, T, cf, normalize, seed = setup
    router, x = _make_topk(*setup)
    r = router(x)
    cap = capacity(cf, T, E, k)
    assert cap == max(1, math.ceil(cf * T * k / E))
    load = r.mask.sum(0)
    assert (load <= cap).all()
    # Priority: walk the (rank, token) queue; an expert refuses a choice only when already full,
    # and once full it refuses everything after. So the kept choices are exactly a greedy fill.
    used = [0] * E
    for rank in range(k):
        for t in range(T):
            e = int(r.indices[t, rank])
            kept = bool(r.mask[t, e])
            assert kept == (used[e] < cap), (rank, t, e)
            used[e] += kept
    # every first choice is served before any second choice of the same expert
    first_dropped = [bool(~r.mask[t, int(r.indices[t, 0])]) for t in range(T)]
    for t in range(T):
        for rank in range(1, k):
            e = int(r.indices[t, rank])
            if r.mask[t, e]:
                assert not any(first_dropped[u] and int(r.indices[u, 0]) == e for u in range(T))
    assert torch.equal(r.dropped, ~r.mask.any(-1))
    # a token that kept all its choices has weights summing to 1 (when normalised)
    full = r.mask.sum(-1) == k
    if normalize and full.any():
        assert torch.allclose(r.weights[full].sum(-1), torch.ones(int(full.sum())), atol=1e-5)


@given(st.integers(1, 6), st.integers(1, 24), st.floats(0.1, 3.0), st.integers(0, 2**16))
def test_expert_choice_gives_each_expert_exactly_C_tokens(E, T, cf, seed):
    torch.manual_seed(seed)
    router = ExpertChoiceRouter(D, E, capacity_factor=cf)
    r = router(torch.randn(T, D))
    C = min(T, max(1, math.ceil(cf * T / E)))
    assert torch.equal(r.mask.sum(0), torch.full((E,), C))
    assert torch.equal(r.dropped, ~r.mask.any(-1))


@given(st.sampled_from(["softmax", "topk", "noisy", "expert_choice", "threshold", "hierarchical"]),
       st.integers(1, 16), st.floats(0.2, 5.0), st.integers(0, 2**16))
def test_probs_rows_sum_to_one(kind, T, temperature, seed):
    torch.manual_seed(seed)
    router = {
        "softmax": lambda: SoftmaxRouter(D, 3, temperature=temperature),
        "topk": lambda: TopKRouter(D, 5, 2, temperature=temperature),
        "noisy": lambda: TopKRouter(D, 5, 2, noisy=True, temperature=temperature).train(),
        "expert_choice": lambda: ExpertChoiceRouter(D, 4, 1.0, temperature=temperature),
        "threshold": lambda: ThresholdRouter(D, 4, temperature=temperature),
        "hierarchical": lambda: HierarchicalRouter(D, 2, 3, temperature=temperature),
    }[kind]()
    r = router(torch.randn(T, D) * 3)
    assert torch.allclose(r.probs.sum(-1), torch.ones(T), atol=1e-5)
    assert (r.probs >= 0).all()


@given(topk_setup(with_capacity=True), st.sampled_from(["dense", "loop", "sorted", "auto"]))
def test_dropped_tokens_contribute_zero(setup, mode):
    E, k, T, cf, normalize, seed = setup
    torch.manual_seed(seed)
    layer = MoELayer(D, 4, E, k, dispatch=mode, capacity_factor=cf)
    with torch.no_grad():
        layer.router.gate.weight.normal_()
    x = torch.randn(T, D)
    out = layer(x)
    dropped = layer.last_routing.dropped
    assert torch.equal(out[dropped], torch.zeros_like(out[dropped]))
    # and a token's output only has the experts it kept: recompute from the kept pairs alone
    y_all = layer.experts.forward_all(x)
    ref = torch.einsum("te,etd->td", layer.last_routing.weights * layer.last_routing.mask, y_all)
    assert torch.allclose(out, ref, atol=1e-5)


_MODES = [m for m in DISPATCH_MODES if m != "grouped" or grouped_mm_available("cpu", torch.float32)]


@given(topk_setup(with_capacity=False), st.sampled_from(_MODES), st.randoms(use_true_random=False))
def test_output_is_permutation_equivariant_without_capacity(setup, mode, rnd):
    E, k, T, _, normalize, seed = setup
    torch.manual_seed(seed)
    layer = MoELayer(D, 4, E, k, dispatch=mode)
    x = torch.randn(T, D)
    order = list(range(T))
    rnd.shuffle(order)
    perm = torch.tensor(order)
    assert torch.allclose(layer(x[perm]), layer(x)[perm], atol=1e-5)


@given(T=st.integers(1, 20), E=st.integers(1, 9), k=st.integers(1, 3), seed=st.integers(0, 2**16),
       ties=st.booleans(), neg_inf=st.booleans())
def test_top_indices_agrees_with_topk(T, E, k, seed, ties, neg_inf):
    """The argmax fast path picks the same top-k scores as topk, best first, k distinct columns."""
    from tutorial_moe.routing import top_indices

    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (T, E), generator=g).float() if ties else torch.randn(T, E, generator=g)
    if neg_inf:  # whole rows of -inf but one column: the second pick must still be a new column
        scores[:, 1:] = float("-inf")
    idx = top_indices(scores, k)
    assert idx.shape == (T, k)
    assert all(len(set(row)) == k for row in idx.tolist())
    picked = scores.gather(1, idx)
    ref = scores.topk(k, dim=-1).values
    assert torch.equal(picked, ref)  # same values in the same (descending) order

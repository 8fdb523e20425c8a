"""Inference: routing traces from generation, distinct experts per batch (formula vs Monte
Carlo), and expert caches (LRU/LFU against brute force, Belady against the exhaustive optimum)."""
import functools
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from tutorial_moe import MoELayer
from tutorial_moe.offload import (
    CacheResult,
    RoutingRecorder,
    RoutingTrace,
    decode_bytes_per_token,
    distinct_experts,
    expected_distinct_experts,
    hit_rate_curve,
    module_bytes,
    simulate_cache,
    simulate_requests,
    trace_generation,
)
from tutorial_moe.offload import _simulate
from tutorial_moe.shared_experts import SharedExpertMoE


# ---------------------------------------------------------------- brute-force caches
def lru_oracle(seq, C, demand=None):
    """On a miss with a full cache, evict the resident item whose latest use (scanning the whole
    history, prefetches included) is oldest. ``demand[i]`` False marks a prefetch: it loads a
    missing item like a miss but is not counted as a hit or a miss. Returns (hits, prefetch loads)."""
    demand = [True] * len(seq) if demand is None else demand
    cache, hits, loads = [], 0, 0
    for i, key in enumerate(seq):
        if key in cache:
            hits += demand[i]
            continue
        if C == 0:
            continue
        loads += not demand[i]
        if len(cache) == C:
            last = {r: max(j for j in range(i) if seq[j] == r) for r in cache}
            cache.remove(min(cache, key=lambda r: last[r]))
        cache.append(key)
    return hits, loads


def lfu_oracle(seq, C):
    """Evict the resident item used least often in the history (this use included), then the
    least recently used among those."""
    cache, hits = [], 0
    for i, key in enumerate(seq):
        if key in cache:
            hits += 1
            continue
        if C == 0:
            continue
        if len(cache) == C:
            uses = {r: sum(1 for j in range(i + 1) if seq[j] == r) for r in cache}
            last = {r: max(j for j in range(i) if seq[j] == r) for r in cache}
            cache.remove(min(cache, key=lambda r: (uses[r], last[r])))
        cache.append(key)
    return hits


def optimal_hits(seq, C):
    """The most hits any eviction choice can give (exhaustive search with memoisation)."""
    @functools.lru_cache(maxsize=None)
    def best(i, cache):
        if i == len(seq):
            return 0
        key = seq[i]
        if key in cache:
            return 1 + best(i + 1, cache)
        if len(cache) < C:
            return best(i + 1, tuple(sorted(cache + (key,))))
        # The requested expert must be loaded (it computes this token): try every victim.
        return max(best(i + 1, tuple(sorted([r for r in cache if r != victim] + [key]))) for victim in cache)

    return best(0, ()) if C > 0 else 0


sequences = st.lists(st.integers(0, 5), min_size=0, max_size=40)


@given(seq=sequences, C=st.integers(0, 7))
def test_lru_matches_brute_force(seq, C):
    assert simulate_requests(seq, C, "lru") == lru_oracle(seq, C)[0]


@given(events=st.lists(st.tuples(st.integers(0, 5), st.booleans()), max_size=40), C=st.integers(0, 7))
def test_lru_with_prefetches_matches_brute_force(events, C):
    seq, demand = [k for k, _ in events], [d for _, d in events]
    hits, demands, loads = _simulate(events, C, "lru", "cold")
    assert (hits, loads) == lru_oracle(seq, C, demand)
    assert demands == sum(demand)


@given(seq=sequences, C=st.integers(0, 7))
def test_lfu_matches_brute_force(seq, C):
    assert simulate_requests(seq, C, "lfu") == lfu_oracle(seq, C)


@given(seq=st.lists(st.integers(0, 4), max_size=12), C=st.integers(1, 4))
def test_belady_is_optimal(seq, C):
    assert simulate_requests(seq, C, "belady") == optimal_hits(tuple(seq), C)


@given(seq=sequences, C=st.integers(0, 7), start=st.sampled_from(["cold", "full"]))
def test_belady_never_worse_than_lru_or_lfu(seq, C, start):
    b = simulate_requests(seq, C, "belady", start)
    assert b >= simulate_requests(seq, C, "lru", start)
    assert b >= simulate_requests(seq, C, "lfu", start)


@given(seq=sequences, C=st.integers(0, 6), policy=st.sampled_from(["lru", "belady"]))
def test_a_bigger_cache_never_hits_less(seq, C, policy):
    # LRU and MIN are stack algorithms (Mattson et al. 1970): no Belady anomaly.
    assert simulate_requests(seq, C + 1, policy) >= simulate_requests(seq, C, policy)


@given(seq=sequences, policy=st.sampled_from(["lru", "lfu", "belady"]))
def test_a_cache_holding_everything_misses_only_first_uses(seq, policy):
    distinct = len(set(seq))
    C = max(distinct, 1)
    assert simulate_requests(seq, C, policy, "cold") == len(seq) - distinct
    assert simulate_requests(seq, C, policy, "full") == len(seq)


def test_a_known_sequence_by_hand():
    seq = [0, 1, 2, 0, 3, 0, 1]
    # C=2 LRU: m m m(ev 0) m(ev 1) m(ev 2) h m(ev 3) -> 1 hit; MIN keeps 0: m m m(ev 1) h m(ev 2) h m -> 2.
    assert simulate_requests(seq, 2, "lru") == 1
    assert simulate_requests(seq, 2, "belady") == 2


# ---------------------------------------------------------------- distinct experts
@pytest.mark.parametrize("E,k,B", [(8, 2, 1), (8, 2, 4), (16, 2, 8), (8, 1, 32), (6, 3, 3)])
def test_formula_matches_monte_carlo(E, k, B):
    g = torch.Generator().manual_seed(0)
    n = 4000
    # The first k of a uniform random permutation: a uniform k-subset, independently per token.
    chosen = torch.rand(n * B, E, generator=g).argsort(-1)[:, :k]
    mask = torch.zeros(n * B, E, dtype=torch.bool).scatter(1, chosen, True)
    counts = distinct_experts(mask, B, sample="consecutive")
    assert counts.shape == (n,)
    se = float(counts.std()) / math.sqrt(n)
    assert abs(float(counts.mean()) - expected_distinct_experts(E, k, B)) <= 4 * se + 1e-9


def test_formula_edge_cases():
    assert expected_distinct_experts(8, 2, 1) == 2.0
    assert expected_distinct_experts(8, 8, 5) == 8.0
    assert expected_distinct_experts(8, 2, 0) == 0.0
    assert expected_distinct_experts(64, 8, 10_000) == pytest.approx(64.0)


def test_distinct_experts_random_batches_are_reproducible_and_bounded():
    mask = torch.zeros(50, 6, dtype=torch.bool)
    mask[torch.arange(50), torch.arange(50) % 3] = True  # only experts 0..2 used
    a = distinct_experts(mask, 10, num_batches=7, seed=1)
    assert torch.equal(a, distinct_experts(mask, 10, num_batches=7, seed=1))
    assert a.shape == (7,) and bool((a <= 3).all()) and bool((a >= 1).all())
    assert torch.equal(distinct_experts(mask, 1), torch.ones(50))


def test_decode_bytes_per_token():
    # B = 1: the token reads its k experts and the dense weights.
    assert decode_bytes_per_token(8, 2, 1, 100.0, dense_bytes=50.0) == 250.0
    # Large B: every expert is read once and shared by the batch.
    assert decode_bytes_per_token(8, 2, 1000, 100.0) == pytest.approx(800.0 / 1000)
    assert decode_bytes_per_token(8, 2, 4, 100.0, distinct=3.0) == 75.0
    layer = nn.Linear(3, 2)
    assert module_bytes(layer) == 8 * 4 and module_bytes(layer, 2) == 16.0


@pytest.mark.parametrize("call,exc,match", [
    (lambda: expected_distinct_experts(4, 5, 1), ValueError, "k=5"),
    (lambda: expected_distinct_experts(4, 2, -1), ValueError, "batch_size"),
    (lambda: distinct_experts(torch.zeros(4, 3), 2), TypeError, "bool"),
    (lambda: distinct_experts(torch.zeros(4, 3, dtype=torch.bool), 5), ValueError, "batch_size"),
    (lambda: distinct_experts(torch.zeros(4, 3, dtype=torch.bool), 2, sample="all"), ValueError, "sample"),
    (lambda: decode_bytes_per_token(4, 2, 0, 1.0), ValueError, "batch_size"),
    (lambda: decode_bytes_per_token(4, 2, 1, -1.0), ValueError, "expert_bytes"),
    (lambda: decode_bytes_per_token(4, 2, 1, 1.0, distinct=5.0), ValueError, "distinct"),
    (lambda: module_bytes("m"), TypeError, "nn.Module"),
    (lambda: module_bytes(nn.Linear(2, 2), 0), ValueError, "bytes_per_param"),
    (lambda: simulate_requests([1, 2], 1, "fifo"), ValueError, "policy"),
    (lambda: simulate_requests([1, 2], -1), ValueError, "capacity"),
    (lambda: simulate_requests([1, 2], 1, start="warm"), ValueError, "start"),
])
def test_bad_arguments_are_refused(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------- traces from generation
class TinyModel(nn.Module):
    """Embedding, two MoE layers (the second with a shared expert), a head: (1, L) ids -> logits."""

    def __init__(self, vocab=11, d=8, E=4, k=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.l1 = MoELayer(d, 12, E, k, dispatch="loop")
        self.l2 = SharedExpertMoE(d, 12, E, k, dispatch="loop")
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.l1(h)
        h = h + self.l2(h)
        return self.head(h)


def _generate(model, steps, prompt=(1, 2, 3)):
    tokens = list(prompt)

    def step(i):
        logits = model(torch.tensor([tokens]))
        tokens.append(int(logits[0, -1].argmax()))

    return tokens, step


def test_trace_records_the_new_token_of_every_step_and_layer():
    model = TinyModel()
    model.train()
    tokens, step = _generate(model, 5)
    trace = trace_generation(model, step, 5)
    assert model.training  # restored
    assert trace.num_steps == 5 and trace.num_layers == 2 and trace.num_experts == [4, 4]
    assert trace.num_tokens == 5
    # Replay: step s saw tokens[: 3 + s]; its last position's routing must be what was recorded.
    model.eval()
    with torch.no_grad():
        for s in range(5):
            model(torch.tensor([tokens[: 3 + s]]))
            assert torch.equal(trace.masks[s][0], model.l1.last_routing.mask[-1:])
            assert torch.equal(trace.masks[s][1], model.l2.moe.last_routing.mask[-1:])
    for s in range(5):
        for l in range(2):
            assert int(trace.masks[s][l].sum()) == 2


def test_positions_all_keeps_every_row_and_hooks_are_removed():
    model = TinyModel().eval()
    with RoutingRecorder(model, positions="all") as rec, torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))
        model(torch.tensor([[1, 2], [3, 4]]))
    trace = rec.trace()
    assert [m[0].shape[0] for m in trace.masks] == [4, 4]
    assert all(not m._forward_hooks for m in (model.l1, model.l2.moe))
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(torch.tensor([[1, 2], [3, 4], [5, 6]]))  # batch of 3 sequences: 3 new tokens
    assert rec.trace().masks[0][0].shape == (3, 4)


def test_requests_and_cache_simulation_over_a_trace():
    masks = [[torch.tensor([[1, 1, 0, 0]], dtype=torch.bool), torch.tensor([[0, 0, 1, 1]], dtype=torch.bool)],
             [torch.tensor([[1, 0, 1, 0]], dtype=torch.bool), torch.tensor([[0, 1, 0, 1]], dtype=torch.bool)]]
    trace = RoutingTrace(masks, [4, 4])
    assert trace.requests("layer") == [[0, 1, 0, 2], [2, 3, 1, 3]]
    assert trace.requests("global") == [[(0, 0), (0, 1), (1, 2), (1, 3), (0, 0), (0, 2), (1, 1), (1, 3)]]
    assert trace.step_experts(1, 0) == [0, 2]
    torch.testing.assert_close(trace.layer_masks(1), torch.cat([masks[0][1], masks[1][1]]))
    r = simulate_cache(trace, 2, "lru", expert_bytes=10.0)
    # layer 0: 0 m, 1 m, 0 h, 2 m(ev 1) -> 1 hit; layer 1: 2 m, 3 m, 1 m(ev 2), 3 h -> 1 hit
    assert (r.accesses, r.hits, r.misses) == (8, 2, 6)
    assert r.bytes_moved == 60.0 and r.bytes_per_token == 30.0 and r.hit_rate == 0.25
    assert simulate_cache(trace, 4, "lru", start="full").hit_rate == 1.0
    assert simulate_cache(trace, 8, "belady", scope="global", start="full").hit_rate == 1.0
    assert simulate_cache(trace, 4, "lfu", scope="global").hits == 2
    curve = hit_rate_curve(trace, [0, 2, 4], "lru")
    assert curve[0] == 0.0 and curve[2] == 0.25 and curve[4] == 0.25


def test_cache_over_a_generated_trace_orders_policies():
    torch.manual_seed(3)
    model = TinyModel(E=8, k=2)
    with torch.no_grad():
        for layer in (model.l1, model.l2.moe):
            layer.router.gate.weight.normal_()
    _, step = _generate(model, 30)
    trace = trace_generation(model, step, 30)
    for C in (2, 4, 6):
        lru, opt = (simulate_cache(trace, C, p) for p in ("lru", "belady"))
        assert opt.hits >= lru.hits
    assert simulate_cache(trace, 8, "lru", start="full").hit_rate == 1.0


def test_trace_errors():
    with pytest.raises(ValueError, match="no MoE module"):
        RoutingRecorder(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        RoutingRecorder("model")
    model = TinyModel()
    with pytest.raises(ValueError, match="positions"):
        RoutingRecorder(model, positions="first")
    with pytest.raises(ValueError, match="no forward"):
        RoutingRecorder(model).trace()
    with pytest.raises(TypeError, match="step"):
        trace_generation(model, None, 3)
    with pytest.raises(ValueError, match="num_steps"):
        trace_generation(model, lambda i: None, 0)
    with pytest.raises(TypeError, match="RoutingTrace"):
        simulate_cache([[0, 1]], 2)
    with pytest.raises(ValueError, match="expert_bytes"):
        simulate_cache(RoutingTrace([], [4]), 2, expert_bytes=-1)
    with pytest.raises(ValueError, match="scope"):
        RoutingTrace([], [4]).requests("rank")


def test_cache_result_without_bytes():
    r = CacheResult("lru", 2, "layer", 0, 0)
    assert r.hit_rate == 1.0 and r.bytes_moved is None and r.bytes_per_token is None


# ---------------------------------------------------------------- next-layer prediction (prefetch)
def test_predictions_are_the_next_router_on_the_previous_input():
    model = TinyModel().eval()
    tokens, step = _generate(model, 4)
    trace = trace_generation(model, step, 4, predict_next=True)
    assert all(p[0] is None for p in trace.predicted)
    with torch.no_grad():
        for s in range(4):
            h = model.emb(torch.tensor([tokens[: 3 + s]]))  # l1's input
            guess = model.l2.moe.router(h[:, -1]).mask
            assert torch.equal(trace.predicted[s][1], guess)
    assert 0.0 <= trace.prediction_recall(1) <= 1.0


def _synthetic(predicted_same: bool):
    g = torch.Generator().manual_seed(0)
    masks, predicted = [], []
    for _ in range(20):
        step, guess = [], [None]
        for l in range(3):
            m = torch.zeros(1, 8, dtype=torch.bool)
            m[0, torch.randperm(8, generator=g)[:2]] = True
            step.append(m)
        masks.append(step)
        for l in range(1, 3):
            guess.append(step[l].clone() if predicted_same else ~step[l])
        predicted.append(guess)
    return RoutingTrace(masks, [8, 8, 8], predicted)


def test_a_perfect_prediction_makes_every_predicted_layer_hit():
    trace = _synthetic(True)
    plain = simulate_cache(trace, 2, "lru")
    pre = simulate_cache(trace, 2, "lru", prefetch=True, expert_bytes=1.0)
    assert trace.prediction_recall(1) == 1.0 and trace.prediction_recall(2) == 1.0
    # Layers 1 and 2 always hit; layer 0 (no prediction) behaves as without prefetching.
    layer0 = simulate_requests(trace.requests("layer")[0], 2, "lru")
    assert pre.hits == layer0 + 2 * 2 * 20
    assert pre.hits > plain.hits
    # A perfect guess, loaded just before its layer, moves exactly what the misses moved without
    # prefetching: the same bytes, now off the critical path.
    assert pre.misses + pre.prefetched == plain.misses
    assert pre.bytes_moved == plain.misses * 1.0


def test_a_wrong_prediction_costs_transfers_and_helps_nothing():
    trace = _synthetic(False)
    assert trace.prediction_recall(1) == 0.0
    pre = simulate_cache(trace, 8, "lru", prefetch=True, expert_bytes=2.0)
    assert pre.prefetched > 0 and pre.bytes_moved == 2.0 * (pre.misses + pre.prefetched)


def test_prefetch_errors():
    trace = _synthetic(True)
    with pytest.raises(ValueError, match="belady"):
        simulate_cache(trace, 2, "belady", prefetch=True)
    with pytest.raises(ValueError, match="predict_next=True"):
        simulate_cache(RoutingTrace(trace.masks, [8, 8, 8]), 2, prefetch=True)
    with pytest.raises(TypeError, match="prefetch"):
        simulate_cache(trace, 2, prefetch=1)
    with pytest.raises(TypeError, match="predict_next"):
        RoutingRecorder(TinyModel(), predict_next="yes")
    with pytest.raises(ValueError, match="layer"):
        trace.prediction_recall(0)


def test_next_layer_prediction_counts_nothing_for_the_bias():
    # The look-ahead runs the next router; it must not add to that router's load counter.
    import torch.nn as nn

    from tutorial_moe import MoELayer
    from tutorial_moe.offload import RoutingRecorder
    from tutorial_moe.routing import TopKRouter

    torch.manual_seed(0)
    layers = nn.Sequential(*[MoELayer(8, 16, 4, 2, router=TopKRouter(8, 4, 2, bias_update_rate=0.1))
                             for _ in range(2)])
    layers.train()
    with RoutingRecorder(layers, predict_next=True):
        layers(torch.randn(5, 8))
    # Each router counted exactly its own forward: 5 tokens x k=2 choices.
    assert [float(m.router.expert_load.sum()) for m in layers] == [10.0, 10.0]

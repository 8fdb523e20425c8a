"""MoE inference: routing traces, why decoding is memory-bound, and expert offloading.

Three pieces, all reading only what an MoE module leaves after a forward (``last_routing``):

1. **Routing traces from generation.** :class:`RoutingRecorder` hooks every MoE module of a model
   (``tutorial_moe.moe.moe_modules``) and records, for each forward, which experts each *new*
   token chose in each layer; :func:`trace_generation` runs any token-by-token loop (a callable
   ``step(i)``) under a recorder. Nothing here knows the model: it works with any model whose MoE
   layers set ``last_routing``.

2. **Distinct experts per batch.** At decode time a batch holds B tokens (one per sequence); the
   expert weights a layer must read are those of the union of the experts they chose. Under
   independent uniform top-k routing a token misses a given expert with probability 1 - k/E, so

       E[distinct experts] = E * (1 - (1 - k/E)^B)          (:func:`expected_distinct_experts`)

   which grows like k*B for small B and saturates at E. Weight bytes read per token are
   ``(dense bytes + distinct * expert bytes) / B`` (:func:`decode_bytes_per_token`): at B = 1 a
   token reads k experts' weights to do k experts' work, and the weights, not the arithmetic,
   bound the speed. :func:`distinct_experts` measures the same count from real routing.

3. **Expert offloading.** Keep only C experts in fast memory (GPU), the rest in slow memory (CPU
   RAM or disk), and load a missing expert when a token needs it: Eliseev and Mazur (arXiv
   2312.17238) run Mixtral this way with an LRU cache per layer plus speculative loading; llama.cpp's
   ``--n-cpu-moe N`` keeps the experts of N layers in CPU memory (a static split rather than a
   cache). :func:`simulate_cache` replays a trace against a cache of C experts per layer
   (``scope="layer"``, as Eliseev and Mazur) or C experts shared by all layers (``scope="global"``)
   under a policy:

   * ``"lru"``: evict the expert used least recently;
   * ``"lfu"``: evict the expert the router has chosen least often so far (all past uses count,
     also those from before it was last evicted; ties go to the least recently used);
   * ``"belady"``: evict the expert whose next use is farthest in the future (Belady's MIN, an
     offline policy that needs the future: no real system can run it, but no policy that loads an
     expert only when a token needs it misses less, so it bounds their hit rate at that cache
     size; prefetching can score higher hits because its transfers come before the need).

   Experts a layer needs at one step are requested one after another, in increasing id order.

   With ``prefetch=True`` (LRU or LFU) the cache also loads, before each layer runs, the experts
   that layer's router picks when it reads the *previous* MoE layer's input (recorded with
   ``RoutingRecorder(..., predict_next=True)``): Eliseev and Mazur's speculative loading, which
   works because the residual stream changes little from one layer to the next. A prefetch that
   was already resident only refreshes its recency; a wrong guess still costs a transfer, counted
   in ``bytes_moved`` (though off the critical path when it overlaps the previous layer's work).

Cache contents start empty (``start="cold"``: the first use of every expert is a miss) or filled
with the first C distinct experts the trace uses (``start="full"``).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch
import torch.nn as nn

from ._validate import check_choice, check_int
from .moe import moe_modules

__all__ = [
    "RoutingTrace", "RoutingRecorder", "trace_generation",
    "expected_distinct_experts", "distinct_experts", "decode_bytes_per_token", "module_bytes",
    "POLICIES", "CacheResult", "simulate_requests", "simulate_cache", "hit_rate_curve",
]

POLICIES = ("lru", "lfu", "belady")


# ---------------------------------------------------------------- 1. traces
@dataclass
class RoutingTrace:
    """Which experts the new tokens of each generation step chose, per MoE layer.

    ``masks[s][l]`` is a (B_s, E_l) bool tensor: row b says which experts of layer l token b of step
    s went to (B_s tokens per step, usually the batch size). ``num_experts[l]`` is E_l.
    ``predicted[s][l]`` (optional, same shapes; None for layer 0) is the guess for layer l made
    from layer l-1's input (see :class:`RoutingRecorder`'s ``predict_next``).
    """

    masks: list[list[torch.Tensor]]
    num_experts: list[int]
    predicted: list[list[torch.Tensor | None]] | None = None

    @property
    def num_steps(self) -> int:
        return len(self.masks)

    @property
    def num_layers(self) -> int:
        return len(self.num_experts)

    @property
    def num_tokens(self) -> int:
        """Tokens generated over the trace (sum over steps of the tokens per step)."""
        return sum(int(step[0].shape[0]) for step in self.masks) if self.masks else 0

    def layer_masks(self, layer: int) -> torch.Tensor:
        """(tokens, E) bool: every recorded token's choices in ``layer``, steps in order."""
        check_int("layer", layer, low=0, high=self.num_layers - 1, where="RoutingTrace.layer_masks")
        if not self.masks:
            return torch.zeros(0, self.num_experts[layer], dtype=torch.bool)
        return torch.cat([step[layer] for step in self.masks])

    def step_experts(self, step: int, layer: int) -> list[int]:
        """Sorted ids of the experts of ``layer`` used by any token of ``step`` (the union)."""
        return self.masks[step][layer].any(0).nonzero().flatten().tolist()

    def requests(self, scope: str = "layer") -> list[list[Hashable]]:
        """The expert loads this trace asks of a cache, as sequences of keys in time order.

        ``scope="layer"``: one sequence per layer, of expert ids (each layer has its own cache);
        ``scope="global"``: one sequence of ``(layer, expert)`` keys, layers in order within a step.
        """
        return [[key for key, demand in seq] for seq in self.events(scope, prefetch=False)]

    def events(self, scope: str = "layer", prefetch: bool = False) -> list[list[tuple[Hashable, bool]]]:
        """Like :meth:`requests`, as ``(key, demand)`` pairs; with ``prefetch`` each layer's predicted
        experts come first at every step as ``(key, False)`` (needs ``predicted``)."""
        where = "RoutingTrace.events"
        check_choice("scope", scope, ("layer", "global"), where=where)
        if prefetch and self.predicted is None:
            raise ValueError(f"{where}: prefetch=True needs a trace with predictions; record it with "
                             f"RoutingRecorder(model, predict_next=True)")
        per_layer: list[list[list[tuple[Hashable, bool]]]] = [[] for _ in range(self.num_layers)]
        for s in range(self.num_steps):
            for l in range(self.num_layers):
                key = (lambda e: e) if scope == "layer" else (lambda e, l=l: (l, e))
                ev = []
                guess = self.predicted[s][l] if prefetch else None
                if guess is not None:
                    ev += [(key(e), False) for e in guess.any(0).nonzero().flatten().tolist()]
                ev += [(key(e), True) for e in self.step_experts(s, l)]
                per_layer[l].append(ev)
        if scope == "layer":
            return [[e for step in layer for e in step] for layer in per_layer]
        return [[e for s in range(self.num_steps) for l in range(self.num_layers) for e in per_layer[l][s]]]

    def prediction_recall(self, layer: int) -> float:
        """Share of the experts ``layer`` used (per step, union over the step's tokens) that its
        prediction from the previous layer's input had named."""
        where = "RoutingTrace.prediction_recall"
        check_int("layer", layer, low=1, high=max(self.num_layers - 1, 1), where=where)
        if self.predicted is None or layer >= self.num_layers:
            raise ValueError(f"{where}: this trace has no prediction for layer {layer}")
        used = hit = 0
        for s in range(self.num_steps):
            actual = self.masks[s][layer].any(0)
            guess = self.predicted[s][layer].any(0)
            used += int(actual.sum())
            hit += int((actual & guess).sum())
        return hit / used if used else 1.0


class RoutingRecorder:
    """Context manager that records the routing of every forward of a model's MoE modules.

    ``positions="last"``: for an MoE input of shape (B, L, d) only position L-1 of each sequence is
    kept (the new token when a generate loop re-runs the whole window each step, and the only
    token when it feeds one token with a key-value cache); a 2-D input (T, d) keeps all rows.
    ``positions="all"`` keeps every row. After the ``with`` block, :meth:`trace` returns the
    :class:`RoutingTrace`; one step per forward of the model.

    ``predict_next=True`` also applies each MoE module's ``router`` to the *previous* MoE module's
    input (same rows) and records the experts it picks as that layer's prediction (Eliseev and
    Mazur's speculative expert loading, arXiv 2312.17238). Run it in eval mode: a router in
    training mode may update its state (noise, load counts) on these extra calls.

    The modules must set ``last_routing`` (a :class:`~tutorial_moe.routing.Routing`) in their
    forward, as every MoE module of this package does.
    """

    def __init__(self, model: nn.Module, positions: str = "last", predict_next: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"RoutingRecorder: model must be an nn.Module, got {type(model).__name__}")
        self.positions = check_choice("positions", positions, ("last", "all"), where="RoutingRecorder")
        if not isinstance(predict_next, bool):
            raise TypeError(f"RoutingRecorder: predict_next must be a bool, got {type(predict_next).__name__} "
                            f"{predict_next!r}")
        self.predict_next = predict_next
        self.modules = moe_modules(model)
        if not self.modules:
            raise ValueError("RoutingRecorder: model has no MoE module (nothing with last_routing); nothing to record")
        if predict_next:
            bad = [i for i, m in enumerate(self.modules[1:], 1) if not isinstance(getattr(m, "router", None), nn.Module)]
            if bad:
                raise ValueError(f"RoutingRecorder: predict_next=True needs a router module on every MoE module after "
                                 f"the first; modules {bad} have none")
        self._handles: list = []
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._steps: list[list[torch.Tensor]] = []
        self._predicted: list[list[torch.Tensor | None]] = []
        self._num_experts: list[int | None] = [None] * len(self.modules)

    def _hook(self, index: int):
        def hook(module, args, output):
            routing = module.last_routing
            if routing is None:
                raise RuntimeError(f"RoutingRecorder: MoE module {index} ({type(module).__name__}) ran without setting "
                                   f"last_routing")
            mask = routing.mask.detach()
            x = args[0] if args else None
            rows = None
            if isinstance(x, torch.Tensor) and x.dim() >= 2:
                rows = x.detach()[..., -1, :] if self.positions == "last" and x.dim() >= 3 else x.detach()
                rows = rows.reshape(-1, x.shape[-1])
            if self.positions == "last" and isinstance(x, torch.Tensor) and x.dim() >= 3:
                length = x.shape[-2]
                mask = mask.reshape(-1, length, mask.shape[-1])[:, -1]
            self._num_experts[index] = mask.shape[-1]
            if index in self._pending:
                raise RuntimeError(f"RoutingRecorder: MoE module {index} ran twice before module "
                                   f"{len(self.modules) - 1}; a model must call each MoE module once per forward")
            guess = None
            if self.predict_next and index + 1 < len(self.modules):
                if rows is None:
                    raise RuntimeError(f"RoutingRecorder: predict_next=True needs MoE module {index}'s input as its "
                                       f"first positional argument")
                # A look-ahead, not a routing decision: eval mode, so a noisy router adds no noise
                # and a bias-balancing router counts nothing towards its next update.
                router = self.modules[index + 1].router
                was_training = router.training
                router.eval()
                try:
                    with torch.no_grad():
                        guess = router(rows).mask.detach().cpu()
                finally:
                    router.train(was_training)
            self._pending[index] = (mask.cpu(), guess)
            if len(self._pending) == len(self.modules):
                n = len(self.modules)
                self._steps.append([self._pending[i][0] for i in range(n)])
                self._predicted.append([None] + [self._pending[i][1] for i in range(n - 1)])
                self._pending = {}
        return hook

    def __enter__(self) -> "RoutingRecorder":
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def trace(self) -> RoutingTrace:
        if self._pending:
            raise RuntimeError(f"RoutingRecorder: a forward stopped after {len(self._pending)} of "
                               f"{len(self.modules)} MoE modules; the last step is incomplete")
        if not self._steps:
            raise ValueError("RoutingRecorder: no forward was recorded")
        return RoutingTrace(list(self._steps), [int(e) for e in self._num_experts],
                            [list(p) for p in self._predicted] if self.predict_next else None)


@torch.no_grad()
def trace_generation(model: nn.Module, step: Callable[[int], object], num_steps: int, *,
                     positions: str = "last", predict_next: bool = False) -> RoutingTrace:
    """Run ``step(i)`` for i = 0..num_steps-1 (each runs one forward of ``model`` and feeds its
    sampled token back, however the caller likes) and return the routing trace of those forwards.

    The model is put in eval mode for the loop and restored afterwards. Example with a model that
    takes (1, L) token ids: ``step = lambda i: tokens.append(model(tensor([tokens]))[0, -1].argmax())``.
    """
    if not callable(step):
        raise TypeError(f"trace_generation: step must be a callable step(i), got {type(step).__name__}")
    check_int("num_steps", num_steps, low=1, where="trace_generation")
    was_training = model.training if isinstance(model, nn.Module) else False
    recorder = RoutingRecorder(model, positions, predict_next)
    model.eval()
    try:
        with recorder:
            for i in range(num_steps):
                step(i)
    finally:
        model.train(was_training)
    return recorder.trace()


# ---------------------------------------------------------------- 2. distinct experts, bytes
def expected_distinct_experts(num_experts: int, k: int, batch_size: int) -> float:
    """E * (1 - (1 - k/E)^B): expected number of distinct experts B tokens touch when each picks k
    of E experts uniformly at random without replacement, independently of the others."""
    where = "expected_distinct_experts"
    E = check_int("num_experts", num_experts, low=1, where=where)
    check_int("k", k, low=1, high=E, where=where)
    B = check_int("batch_size", batch_size, low=0, where=where)
    return E * (1.0 - (1.0 - k / E) ** B)


def distinct_experts(mask: torch.Tensor, batch_size: int, *, num_batches: int | None = None, seed: int = 0,
                     sample: str = "random") -> torch.Tensor:
    """Distinct experts touched by batches of ``batch_size`` tokens, measured from routing.

    ``mask``: (T, E) bool, which experts each token chose (``Routing.mask`` or a trace's
    ``layer_masks``). ``sample="random"``: ``num_batches`` batches (default T // batch_size, at
    least 1) of tokens drawn without replacement within a batch (``seed`` fixes the draw), as if B
    independent sequences were decoded together; ``"consecutive"``: rows [0, B), [B, 2B), ...
    (whole batches only). Returns a float tensor with one count per batch.
    """
    where = "distinct_experts"
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.dtype != torch.bool:
        raise TypeError(f"{where}: mask must be a (tokens, experts) bool tensor, got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    T = mask.shape[0]
    B = check_int("batch_size", batch_size, low=1, high=max(T, 1), where=where)
    if T == 0:
        raise ValueError(f"{where}: mask has no tokens")
    check_choice("sample", sample, ("random", "consecutive"), where=where)
    if sample == "consecutive":
        n = T // B
        if num_batches is not None:
            n = min(n, check_int("num_batches", num_batches, low=1, where=where))
        return mask[: n * B].reshape(n, B, -1).any(1).sum(-1).float()
    n = max(1, T // B) if num_batches is None else check_int("num_batches", num_batches, low=1, where=where)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(T, generator=gen)[:B] for _ in range(n)])  # (n, B)
    return mask.cpu()[rows].any(1).sum(-1).float()


def module_bytes(module: nn.Module, bytes_per_param: float | None = None) -> float:
    """Bytes of ``module``'s parameters: their own element sizes, or ``bytes_per_param`` each
    (2 for bf16, 1 for int8, 0.5 for 4-bit)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module_bytes: module must be an nn.Module, got {type(module).__name__}")
    if bytes_per_param is None:
        return float(sum(p.numel() * p.element_size() for p in module.parameters()))
    if isinstance(bytes_per_param, bool) or not isinstance(bytes_per_param, (int, float)) or not bytes_per_param > 0:
        raise ValueError(f"module_bytes: bytes_per_param={bytes_per_param!r} must be a number > 0")
    return float(sum(p.numel() for p in module.parameters()) * bytes_per_param)


def decode_bytes_per_token(num_experts: int, k: int, batch_size: int, expert_bytes: float, *,
                           dense_bytes: float = 0.0, distinct: float | None = None) -> float:
    """Weight bytes one MoE layer reads per generated token at decode batch size B:
    ``(dense_bytes + distinct * expert_bytes) / B``.

    ``distinct`` is the number of distinct experts the batch touches (measured, e.g. the mean of
    :func:`distinct_experts`); None uses :func:`expected_distinct_experts` (uniform routing).
    ``dense_bytes`` are weights every token reads (router, shared experts, attention).
    """
    where = "decode_bytes_per_token"
    B = check_int("batch_size", batch_size, low=1, where=where)
    for name, v in (("expert_bytes", expert_bytes), ("dense_bytes", dense_bytes)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{where}: {name}={v!r} must be a finite number >= 0")
    if distinct is None:
        distinct = expected_distinct_experts(num_experts, k, B)
    else:
        check_int("num_experts", num_experts, low=1, where=where)
        if isinstance(distinct, bool) or not isinstance(distinct, (int, float)) or not 0 <= distinct <= num_experts:
            raise ValueError(f"{where}: distinct={distinct!r} must be a number in [0, num_experts={num_experts}]")
    return (dense_bytes + distinct * expert_bytes) / B


# ---------------------------------------------------------------- 3. caches
@dataclass(frozen=True)
class CacheResult:
    """One cache simulation: ``accesses`` expert loads the tokens needed, ``hits`` served from the
    cache, ``misses`` = accesses - hits (each a transfer of one expert on the critical path),
    ``prefetched`` speculative transfers (prefetch only). ``bytes_moved`` = (misses + prefetched)
    * expert_bytes; ``bytes_per_token`` divides it by the tokens generated (None when no
    ``expert_bytes`` or tokens were given)."""

    policy: str
    capacity: int
    scope: str
    accesses: int
    hits: int
    tokens: int | None = None
    expert_bytes: float | None = None
    prefetched: int = 0

    @property
    def misses(self) -> int:
        return self.accesses - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 1.0

    @property
    def bytes_moved(self) -> float | None:
        return None if self.expert_bytes is None else (self.misses + self.prefetched) * self.expert_bytes

    @property
    def bytes_per_token(self) -> float | None:
        if self.expert_bytes is None or not self.tokens:
            return None
        return self.bytes_moved / self.tokens


def _next_uses(events: Sequence[tuple[Hashable, bool]]) -> list[float]:
    """For each position i, the next position j > i that *needs* the same key (inf if none)."""
    nxt, last = [math.inf] * len(events), {}
    for i in range(len(events) - 1, -1, -1):
        key, demand = events[i]
        nxt[i] = last.get(key, math.inf)
        if demand:
            last[key] = i
    return nxt


def _simulate(events: Sequence[tuple[Hashable, bool]], capacity: int, policy: str, start: str) -> tuple[int, int, int]:
    """(hits, demand accesses, prefetch loads) of a cache serving ``events`` of ``(key, demand)``:
    a demand that misses loads the key; a prefetch (demand False) loads it if absent, else only
    refreshes its recency; a full cache first evicts the ``policy``'s victim."""
    demands = sum(1 for _, d in events if d)
    if capacity == 0:
        return 0, demands, 0
    resident: OrderedDict = OrderedDict()  # key -> None, least recently used first
    if start == "full":
        for key, demand in events:
            if len(resident) == capacity:
                break
            if demand:
                resident.setdefault(key, None)
    counts: dict = {}
    next_of: dict = {}  # belady: key -> position of its next demand
    nxt = None
    if policy == "belady":
        nxt = _next_uses(events)
        first: dict = {}
        for i, (key, demand) in enumerate(events):
            if demand:
                first.setdefault(key, i)
        next_of = {key: first.get(key, math.inf) for key in resident}
    hits = prefetched = 0
    for i, (key, demand) in enumerate(events):
        if demand:
            counts[key] = counts.get(key, 0) + 1
        if key in resident:
            hits += demand
            resident.move_to_end(key)
        else:
            prefetched += not demand
            if len(resident) >= capacity:
                if policy == "lru":
                    victim = next(iter(resident))
                elif policy == "lfu":
                    # min count; iteration order is recency, so the first minimum is the least recent
                    victim = min(resident, key=lambda r: counts.get(r, 0))
                else:
                    victim = max(resident, key=lambda r: next_of[r])
                del resident[victim]
                next_of.pop(victim, None)
            resident[key] = None
        if nxt is not None:
            next_of[key] = nxt[i]
    return hits, demands, prefetched


def simulate_requests(seq: Sequence[Hashable], capacity: int, policy: str = "lru", start: str = "cold") -> int:
    """Hits of a cache of ``capacity`` items serving the request sequence ``seq`` (one item per
    request; a miss loads the item, evicting one chosen by ``policy`` when the cache is full)."""
    where = "simulate_requests"
    check_int("capacity", capacity, low=0, where=where)
    check_choice("policy", policy, POLICIES, where=where)
    check_choice("start", start, ("cold", "full"), where=where)
    return _simulate([(key, True) for key in seq], capacity, policy, start)[0]


def simulate_cache(trace: RoutingTrace, capacity: int, policy: str = "lru", *, scope: str = "layer",
                   start: str = "cold", expert_bytes: float | None = None, prefetch: bool = False) -> CacheResult:
    """Replay ``trace`` against an expert cache (see the module docstring).

    ``capacity``: experts held per layer (``scope="layer"``) or in total (``"global"``).
    ``expert_bytes``: bytes of one expert's weights, for ``bytes_moved`` and ``bytes_per_token``.
    ``prefetch``: also load each layer's predicted experts before it runs (LRU or LFU only; the
    trace must carry predictions). With ``start="full"`` and a capacity of at least every expert
    the trace uses, every request hits.
    """
    where = "simulate_cache"
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"{where}: trace must be a RoutingTrace, got {type(trace).__name__}")
    check_int("capacity", capacity, low=0, where=where)
    check_choice("policy", policy, POLICIES, where=where)
    check_choice("start", start, ("cold", "full"), where=where)
    if expert_bytes is not None and (isinstance(expert_bytes, bool) or not isinstance(expert_bytes, (int, float))
                                     or not expert_bytes >= 0):
        raise ValueError(f"{where}: expert_bytes={expert_bytes!r} must be None or a number >= 0")
    if not isinstance(prefetch, bool):
        raise TypeError(f"{where}: prefetch must be a bool, got {type(prefetch).__name__} {prefetch!r}")
    if prefetch and policy == "belady":
        raise ValueError(f"{where}: prefetch=True with policy='belady' is meaningless (MIN already knows the "
                         f"future); use 'lru' or 'lfu'")
    runs = [_simulate(ev, capacity, policy, start) for ev in trace.events(scope, prefetch)]
    return CacheResult(policy, capacity, scope, sum(r[1] for r in runs), sum(r[0] for r in runs), trace.num_tokens,
                       expert_bytes, sum(r[2] for r in runs))


def hit_rate_curve(trace: RoutingTrace, capacities: Sequence[int], policy: str = "lru", **kwargs) -> dict[int, float]:
    """``{capacity: hit rate}`` of :func:`simulate_cache` for each capacity (e.g. chapter 14's
    ``lru_hit_rate``)."""
    return {int(c): simulate_cache(trace, c, policy, **kwargs).hit_rate for c in capacities}

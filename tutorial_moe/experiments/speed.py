"""Small, honest timing tools for the "Making MoE fast" chapter.

Everything here times forward + backward (what training pays), interleaves the variants being
compared round by round (so a machine that slows down mid-run hits every variant alike), and
reports medians. ``benchmarks/bench_dispatch.py`` is the full-size benchmark; these functions
are the small live measurements a notebook can afford.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validate import check_int
from ..moe import MoELayer

__all__ = ["ActiveDense", "time_interleaved", "moe_cost", "compare_dispatch", "indexing_in_loop",
           "gather_speed", "dispatch_overhead", "time_topk_inference", "time_breakdown", "STAGES",
           "stage_output", "tune_allocator", "machine_load"]


class ActiveDense(nn.Module):
    """The limit a k-of-E MoE layer is measured against: one dense FFN of hidden width k * d_hidden."""

    def __init__(self, d_model: int, d_hidden: int, k: int, expert: str = "mlp"):
        super().__init__()
        h = k * d_hidden
        self.expert = expert
        if expert == "mlp":
            self.fc1, self.fc2 = nn.Linear(d_model, h), nn.Linear(h, d_model)
        else:
            self.gate = nn.Linear(d_model, h, bias=False)
            self.up = nn.Linear(d_model, h, bias=False)
            self.down = nn.Linear(h, d_model, bias=False)

    def forward(self, x):
        if self.expert == "mlp":
            return self.fc2(F.gelu(self.fc1(x)))
        return self.down(F.silu(self.gate(x)) * self.up(x))


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 2) -> dict[str, dict]:
    """Median / min / max milliseconds of each zero-argument callable, run in interleaved rounds.

    Each result also keeps ``ms``, the list of per-round times: round i of every variant ran
    back to back, so two variants' lists are paired by round (what a paired comparison needs).
    """
    check_int("repeats", repeats, low=1, where="time_interleaved")
    check_int("warmup", warmup, low=0, where="time_interleaved")
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {n: [] for n in fns}
    for _ in range(repeats):
        for n, f in fns.items():
            t = time.perf_counter()
            f()
            times[n].append((time.perf_counter() - t) * 1e3)
    return {n: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "ms": v}
            for n, v in times.items()}


def _fwd_bwd(module, x, gy):
    def run():
        x.grad = None
        module(x).backward(gy)
    return run


def moe_cost(d_model: int, d_hidden: int, num_experts: int, k: int, expert: str = "mlp") -> dict:
    """Total vs active parameters and forward FLOPs per token of an MoE FFN layer (router included)."""
    per_expert = (2 if expert == "mlp" else 3) * d_model * d_hidden + ((d_hidden + d_model) if expert == "mlp" else 0)
    router = d_model * num_experts
    flops_expert = 2 * (2 if expert == "mlp" else 3) * d_model * d_hidden
    return {
        "total_params": num_experts * per_expert + router,
        "active_params": k * per_expert + router,
        "dense_all_flops_per_token": num_experts * flops_expert + 2 * router,
        "active_flops_per_token": k * flops_expert + 2 * router,
        "router_share_of_active_flops": 2 * router / (k * flops_expert + 2 * router),
    }


def compare_dispatch(d_model: int, d_hidden: int, num_experts: int, k: int, tokens: int, modes=("dense", "loop", "sorted"),
                     expert: str = "mlp", repeats: int = 7, seed: int = 0, warmup: int = 2) -> dict:
    """Forward+backward milliseconds of MoELayer in each dispatch mode and of the active-dense limit."""
    torch.manual_seed(seed)
    layer = MoELayer(d_model, d_hidden, num_experts, k, expert=expert, losses={})
    dense = ActiveDense(d_model, d_hidden, k, expert)
    x = torch.randn(tokens, d_model, requires_grad=True)
    gy = torch.randn(tokens, d_model)

    def with_mode(mode):
        def run():
            layer.dispatch = mode
            x.grad = None
            layer(x).backward(gy)
        return run

    fns = {"active-dense": _fwd_bwd(dense, x, gy), **{m: with_mode(m) for m in modes}}
    res = time_interleaved(fns, repeats=repeats, warmup=warmup)
    base = res["active-dense"]["median_ms"]
    for r in res.values():
        r["x_active_dense"] = r["median_ms"] / base
    return res


def indexing_in_loop(num_experts: int, tokens_per_expert: int = 32, d: int = 32, repeats: int = 5) -> dict:
    """Backward time of a per-expert loop that indexes stacked weights as ``w[e]`` vs ``w.unbind(0)``.

    Each ``w[e]`` is its own autograd node whose backward materialises a zero tensor the size of
    all of ``w`` and adds the slice in; E of them cost O(E^2) memory traffic. One ``unbind``
    has a single backward that stacks the E gradients.
    """
    check_int("num_experts", num_experts, low=1, where="indexing_in_loop")
    w = torch.randn(num_experts, d, d, requires_grad=True)
    xs = torch.randn(num_experts, tokens_per_expert, d)

    def by_index():
        w.grad = None
        sum((xs[e] @ w[e]).sum() for e in range(num_experts)).backward()

    def by_unbind():
        w.grad = None
        ws = w.unbind(0)
        sum((xs[e] @ ws[e]).sum() for e in range(num_experts)).backward()

    res = time_interleaved({"w[e]": by_index, "w.unbind(0)": by_unbind}, repeats=repeats)
    return {n: r["median_ms"] for n, r in res.items()}


def gather_speed(rows: int = 16384, d: int = 256, repeats: int = 7, seed: int = 0) -> dict:
    """Milliseconds to gather ``rows`` random rows: ``x[idx]`` vs ``x.index_select(0, idx)`` (forward+backward)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, requires_grad=True)
    idx = torch.randint(0, rows, (rows,), generator=g)
    gy = torch.randn(rows, d)

    def advanced():
        x.grad = None
        x[idx].backward(gy)

    def index_select():
        x.grad = None
        x.index_select(0, idx).backward(gy)

    res = time_interleaved({"x[idx]": advanced, "x.index_select(0, idx)": index_select}, repeats=repeats)
    return {n: r["median_ms"] for n, r in res.items()}


def dispatch_overhead(d_model: int, d_hidden: int, num_experts: int, k: int, tokens: int, repeats: int = 7, seed: int = 0) -> dict:
    """How much of an MoE layer's forward+backward is *not* expert matmuls.

    Times (a) the routing + sort + gather + weighted scatter-add with the experts replaced by the
    identity and (b) the active-dense block; returns both and their ratio.
    """
    from ..dispatch import combine_pairs, sorted_pairs

    torch.manual_seed(seed)
    layer = MoELayer(d_model, d_hidden, num_experts, k, losses={})
    dense = ActiveDense(d_model, d_hidden, k)
    x = torch.randn(tokens, d_model, requires_grad=True)
    gy = torch.randn(tokens, d_model)

    def plumbing():
        x.grad = None
        routing = layer.router(x)
        t_idx, _, w, _ = sorted_pairs(routing)
        xs = x.index_select(0, t_idx)
        combine_pairs(xs, w, t_idx, x.shape[0]).backward(gy)

    res = time_interleaved({"dispatch only": plumbing, "active-dense": _fwd_bwd(dense, x, gy)}, repeats=repeats)
    out = {n: r["median_ms"] for n, r in res.items()}
    out["share_of_active_dense"] = out["dispatch only"] / out["active-dense"]
    return out


def time_topk_inference(k: int = 3, num_experts: int = 6, hidden: int = 256, batch: int = 256,
                        repeats: int = 10, seed: int = 0) -> dict:
    """Seed 000's inference setting, timed live: ``num_experts`` whole-image experts
    (784 -> ``hidden`` -> 10), the gate's top ``k`` per image (default dispatch) against running
    all experts (dense), batch ``batch``, no autograd. Interleaved rounds; returns
    ``time_interleaved``'s dict with keys ``"top-k"`` and ``"all"`` (per-round ``ms`` paired by
    round) and ``"macs_ratio"``, the share of expert multiply-adds top-k does (k / E).
    """
    from ..experts import MLPExpert
    from ..moe import MoE
    from ..routing import TopKRouter

    check_int("k", k, low=1, where="time_topk_inference")
    check_int("num_experts", num_experts, low=k, where="time_topk_inference")
    torch.manual_seed(seed)
    router = TopKRouter(784, num_experts, k)
    model = MoE([MLPExpert(784, hidden, 10) for _ in range(num_experts)], router, dispatch="auto").eval()
    x = torch.rand(batch, 784)

    def run(top, mode):
        def call():
            router.k, model.dispatch = top, mode
            with torch.no_grad():
                model(x)
        return call

    res = time_interleaved({"top-k": run(k, "auto"), "all": run(num_experts, "dense")}, repeats=repeats)
    res["macs_ratio"] = k / num_experts
    return res


#: The goals of issue 10, against the active-dense limit (forward + backward, T=8192, 2 threads, fp32).
GOALS = {"E8": 1.08, "E64": 1.30}


def load_recorded(path) -> dict | None:
    """The table written by ``benchmarks/bench_dispatch.py`` (None if it was never recorded)."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def goal_table(bench: dict) -> list[dict]:
    """Per recorded shape and expert form: ours (the mode ``dispatch="auto"`` ran; recordings older
    than that flag count ``sorted``) vs the active-dense limit, the goal, and the peers."""
    rows = []
    for shape, goal in GOALS.items():
        for form in ("mlp", "swiglu"):
            sel = [r for r in bench["rows"] if r["shape"] == shape and r["form"] == form]
            ours = next((r for r in sel if r.get("auto")), None) or next(
                (r for r in sel if r["variant"] == "ours-sorted"), None)
            if ours is None:
                continue
            peers = [r for r in sel if r["variant"].startswith("peer")]
            rows.append({"shape": shape, "form": form, "ours (auto)": ours["variant"].removeprefix("ours-"),
                         "ours x active-dense": ours["x_active_dense"], "goal": goal,
                         "meets goal": ours["x_active_dense"] <= goal,
                         **{f"{p['variant']} x active-dense": p["x_active_dense"] for p in peers},
                         "ours / best peer": ours["x_best_peer"] if peers else float("nan")})
    return rows


#: The stages of one MoE layer's forward + backward that :func:`time_breakdown` times apart.
STAGES = ("router", "sort", "gather", "experts", "combine")


def stage_output(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output computed stage by stage, as :func:`time_breakdown` times the stages
    (router, sort, gather, experts, combine); equal to ``layer(x)`` up to float rounding when the
    stages are the whole layer (tests/test_speed.py checks it)."""
    from ..dispatch import combine_pairs, run_sorted_experts, sorted_pairs

    routing = layer.router(x)
    t_idx, _, w, counts = sorted_pairs(routing)
    ys = run_sorted_experts(layer.experts, x.index_select(0, t_idx), counts)
    return combine_pairs(ys, w.to(ys.dtype), t_idx, x.shape[0])


def time_breakdown(d_model: int, d_hidden: int, num_experts: int, k: int, tokens: int, expert: str = "mlp",
                   repeats: int = 5, warmup: int = 1, seed: int = 0) -> dict:
    """Where an MoE layer's forward + backward time goes, stage by stage, next to the whole
    layer (default dispatch) and the active-dense limit, all in the same interleaved rounds.

    Each stage runs on inputs prepared beforehand (leaves that require grad), forward and
    backward: ``router`` (scores, softmax, top-k and their backward), ``sort`` (the argsort of
    the routed pairs: integers, forward only), ``gather`` (``index_select`` of the tokens and its
    scatter-add backward), ``experts`` (the fused expert computation the default dispatch runs)
    and ``combine`` (the weighted scatter-add and its backward). Returns median ms per stage and
    for ``"layer"`` and ``"active-dense"``, ``"sum of stages"``, ``"mode"`` (what the experts
    ran as) and ``"experts / active-dense"``: what the ratio would be if all plumbing were free.
    """
    from ..dispatch import choose_dispatch, combine_pairs, run_sorted_experts, sorted_pairs

    where = "time_breakdown"
    for name, v in (("d_model", d_model), ("d_hidden", d_hidden), ("num_experts", num_experts),
                    ("tokens", tokens)):
        check_int(name, v, low=1, where=where)
    check_int("k", k, low=1, where=where)
    torch.manual_seed(seed)
    layer = MoELayer(d_model, d_hidden, num_experts, k, expert=expert, losses={})
    dense = ActiveDense(d_model, d_hidden, k, expert)
    x = torch.randn(tokens, d_model, requires_grad=True)
    gy = torch.randn(tokens, d_model)
    with torch.no_grad():
        routing = layer.router(x)
        t_idx, e_idx, w, counts = sorted_pairs(routing)
        xs = x.index_select(0, t_idx)
        ys = run_sorted_experts(layer.experts, xs, counts)
    g_route = torch.randn_like(routing.weights)
    g_rows = torch.randn_like(xs)
    xs_leaf, ys_leaf = xs.clone().requires_grad_(), ys.clone().requires_grad_()
    w_leaf = w.clone().requires_grad_()

    def router():
        x.grad = None
        layer.router(x).weights.backward(g_route)

    def sort():
        sorted_pairs(routing)

    def gather():
        x.grad = None
        x.index_select(0, t_idx).backward(g_rows)

    def experts():
        xs_leaf.grad = None
        run_sorted_experts(layer.experts, xs_leaf, counts).backward(g_rows)

    def combine():
        ys_leaf.grad = w_leaf.grad = None
        combine_pairs(ys_leaf, w_leaf, t_idx, tokens).backward(gy)

    def whole():
        x.grad = None
        layer(x).backward(gy)

    fns = {"router": router, "sort": sort, "gather": gather, "experts": experts, "combine": combine,
           "layer": whole, "active-dense": _fwd_bwd(dense, x, gy)}
    res = time_interleaved(fns, repeats=repeats, warmup=warmup)
    out = {n: r["median_ms"] for n, r in res.items()}
    out["sum of stages"] = sum(out[s] for s in STAGES)
    out["mode"] = choose_dispatch(layer.experts, x)
    out["experts / active-dense"] = out["experts"] / out["active-dense"]
    out["layer / active-dense"] = out["layer"] / out["active-dense"]
    return out


# glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD.
_MALLOPT = {"trim_threshold": (-1, 2**31 - 1), "top_pad": (-2, 2**30), "mmap_threshold": (-3, 2**25)}


def tune_allocator() -> bool:
    """Keep freed memory in this process (glibc only), as ``benchmarks/bench_dispatch.py`` does
    with its MALLOC_* variables: otherwise the large intermediates of a dense block are
    returned to the OS and page-faulted back on every call, which slows the active-dense
    limit and flatters every MoE measured against it. Returns whether it was applied."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _MALLOPT.values())


def machine_load() -> dict:
    """The machine's load while we time: 1-minute load average and CPU count (timings taken
    under a load above the threads we use are pessimistic)."""
    import os

    one, _, _ = os.getloadavg()
    return {"load_1min": one, "cpus": os.cpu_count()}

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
           "gather_speed", "dispatch_overhead", "time_topk_inference"]


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
                     expert: str = "mlp", repeats: int = 7, seed: int = 0) -> dict:
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
    res = time_interleaved(fns, repeats=repeats)
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

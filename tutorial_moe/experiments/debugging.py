"""Debugging an MoE (seed 002's list): collapse, routing instability, gradient flow, profiling.

* :func:`detect_collapse` - reads :class:`~tutorial_moe.monitoring.RoutingMonitor` records and raises
  the alarm when routing stays collapsed (a dominant expert, or half the experts dead) for
  ``patience`` probes in a row.
* :func:`instability_summary` - routing changes early vs late in training.
* :func:`expert_gradient_norms`, :func:`router_gradient_norm`, :class:`GradientMonitor` - gradient
  flow per expert and into the router; :func:`router_gradient_sources` splits the router's gradient
  into the part from the task loss and the part from the auxiliary losses.
* :func:`profile_training` - a ``torch.profiler`` run of a few training steps, summarised by stage
  (forward, router, dispatch, auxiliary losses, backward, optimiser) and by operator.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from .._validate import check_int, check_positive_float
from ..experts import ExpertBank
from ..moe import moe_modules, total_aux_loss
from ..routing import update_expert_biases
from ..train import batches, router_parameters

__all__ = ["detect_collapse", "instability_summary", "expert_gradient_norms", "router_gradient_norm",
           "GradientMonitor", "router_gradient_sources", "ProfileSummary", "profile_training", "STAGES"]


def _records(run) -> list[dict]:
    recs = run.records if hasattr(run, "records") else run
    if not isinstance(recs, list) or not all(isinstance(r, dict) for r in recs):
        raise TypeError(f"expected a RoutingMonitor or a list of its records, got {type(run).__name__}")
    return recs


def detect_collapse(run, dead_share: float = 0.1, dominant_share: float = 0.5, patience: int = 3) -> dict:
    """Raise the alarm if routing collapses and stays collapsed.

    At each probe an expert is *dead* when its utilisation is below ``dead_share / E`` (a tenth of
    its fair share by default) and *dominant* above ``dominant_share``; the probe is collapsed when
    any expert dominates or at least half are dead (the rule of ``metrics.collapse_report``). The
    alarm needs ``patience`` collapsed probes in a row, so one odd batch does not trigger it.

    Returns ``collapsed`` (bool), ``alarm_step`` (first step at which the alarm fired, or None),
    ``collapsed_share`` (share of probes that were collapsed), and ``dead``/``dominant`` experts
    and ``utilization`` at the last probe.
    """
    recs = [r for r in _records(run) if r.get("utilization") is not None]
    check_positive_float("dead_share", dead_share, where="detect_collapse")
    check_positive_float("dominant_share", dominant_share, where="detect_collapse")
    check_int("patience", patience, low=1, where="detect_collapse")
    if not recs:
        raise ValueError("detect_collapse: the run has no utilisation records; run a RoutingMonitor first")

    def state(u):
        E = len(u)
        dead = [e for e, v in enumerate(u) if v < dead_share / E]
        dominant = [e for e, v in enumerate(u) if v > dominant_share] if E > 1 else []
        return dead, dominant, bool(dominant) or len(dead) >= max(1, E // 2)

    streak, alarm_step, n_collapsed = 0, None, 0
    for r in recs:
        *_, bad = state(r["utilization"])
        n_collapsed += bad
        streak = streak + 1 if bad else 0
        if streak >= patience and alarm_step is None:
            alarm_step = r["step"]
    dead, dominant, _ = state(recs[-1]["utilization"])
    return {"collapsed": alarm_step is not None, "alarm_step": alarm_step,
            "collapsed_share": n_collapsed / len(recs), "dead": dead, "dominant": dominant,
            "utilization": [round(float(v), 4) for v in recs[-1]["utilization"]]}


def instability_summary(run, fraction: float = 0.25) -> dict:
    """Mean share of probe tokens that changed expert between probes, over the first and the last
    ``fraction`` of the probes (``early``, ``late``), and overall (``mean``)."""
    vals = [r["changes"] for r in _records(run) if r.get("changes") is not None]
    if not 0 < fraction <= 1:
        raise ValueError(f"instability_summary: fraction={fraction} must lie in (0, 1]")
    if not vals:
        raise ValueError("instability_summary: no 'changes' recorded (a RoutingMonitor needs at least two probes)")
    n = max(1, int(round(len(vals) * fraction)))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"early": mean(vals[:n]), "late": mean(vals[-n:]), "mean": mean(vals), "probes": len(vals)}


def _expert_groups(module: nn.Module) -> list[list[torch.Tensor]] | None:
    """Per-expert parameter gradients: for an ExpertBank, slices of its stacked tensors."""
    experts = getattr(module, "experts", None)
    if experts is None and hasattr(module, "layer"):  # TokenGroups around a SoftMoELayer
        experts = getattr(module.layer, "experts", None)
    if isinstance(experts, ExpertBank):
        grads = [p.grad for p in experts.parameters()]
        if any(g is None for g in grads):
            return None
        return [[g[e] for g in grads] for e in range(experts.num_experts)]
    if isinstance(experts, nn.ModuleList):
        out = []
        for ex in experts:
            gs = [p.grad for p in ex.parameters() if p.grad is not None]
            out.append(gs)
        return out
    raise TypeError(f"expert_gradient_norms: no experts found in {type(module).__name__}")


def expert_gradient_norms(model: nn.Module, layer: int = 0) -> torch.Tensor:
    """(E,) L2 norm of each expert's parameter gradient in the ``layer``-th MoE module (after backward).

    An expert that received no tokens has norm 0; a collapsed run shows one large norm and E-1 tiny ones.
    """
    mods = moe_modules(model)
    if not mods:
        raise ValueError("expert_gradient_norms: model contains no MoE module")
    check_int("layer", layer, low=0, high=len(mods) - 1, where="expert_gradient_norms")
    groups = _expert_groups(mods[layer])
    if groups is None:
        raise ValueError("expert_gradient_norms: no gradients yet; call loss.backward() first")
    return torch.tensor([math.sqrt(sum(float(g.detach().pow(2).sum()) for g in gs)) for gs in groups])


def router_gradient_norm(model: nn.Module) -> float:
    """L2 norm of the gradient of every router parameter (0 if none has a gradient)."""
    gs = [p.grad for p in router_parameters(model) if p.grad is not None]
    return math.sqrt(sum(float(g.detach().pow(2).sum()) for g in gs))


class GradientMonitor:
    """A ``fit`` callback recording per-expert and router gradient norms every ``every`` steps.

    ``fit`` calls back after the optimiser step but before the next ``zero_grad``, so the gradients
    are this step's (after clipping when ``clip_grad`` is set; clipping scales all of them alike).
    ``records``: dicts with step, ``experts`` (E floats) and ``router``.
    """

    def __init__(self, every: int = 1, layer: int = 0):
        self.every = check_int("every", every, low=1, where="GradientMonitor")
        self.layer = check_int("layer", layer, low=0, where="GradientMonitor")
        self.records: list[dict] = []

    def __call__(self, row: dict, model: nn.Module) -> None:
        if row["step"] % self.every == 0:
            self.records.append({"step": row["step"], "experts": expert_gradient_norms(model, self.layer).tolist(),
                                 "router": router_gradient_norm(model)})


def router_gradient_sources(model: nn.Module, batch, loss_fn) -> dict:
    """Norm of the router's gradient from the task loss alone and from the auxiliary losses alone.

    ``batch`` is (x, y) or (x, y, ids). A router whose task gradient is 0 learns only from the
    balance losses: e.g. top-1 routing with renormalised weights (the one weight is always 1).
    Leaves ``.grad`` untouched.
    """
    params = router_parameters(model)
    if not params:
        raise ValueError("router_gradient_sources: model has no router parameters")
    x, y = batch[0], batch[1]
    was_training = model.training
    model.train()
    out = model(x) if len(batch) == 2 else model(x, batch[2])
    task = loss_fn(out, y)
    aux = total_aux_loss(model)
    model.train(was_training)

    def norm(loss):
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return 0.0
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))

    return {"task": norm(task), "aux": norm(aux)}


#: Stages labelled with ``torch.profiler.record_function`` (the ``moe.*`` ones inside ``MoELayer.forward``).
STAGES = ("forward", "moe.router", "moe.dispatch", "moe.aux_losses", "backward", "optimizer")


@dataclass
class ProfileSummary:
    """stages: rows (stage, ms per step, share of the step); ops: the top operators by self time;
    table: torch.profiler's own table (a string)."""

    stages: list
    ops: list
    table: str
    steps: int


@contextlib.contextmanager
def _quiet_stderr():
    # The profiler's C++ backend logs start/stop lines (and a GPU probe error on CPU-only machines)
    # straight to file descriptor 2 (not via sys.stderr, which Jupyter replaces); hide them so the
    # notebook shows only the tables. Python-level stderr is left alone.
    fd = 2
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def profile_training(model: nn.Module, data, loss_fn, steps: int = 10, batch_size: int = 128, lr: float = 1e-3,
                     warmup: int = 2, row_limit: int = 10) -> ProfileSummary:
    """Profile ``steps`` Adam training steps of ``model`` on ``data`` = (x, y[, ids]) (CPU times).

    Each step is labelled forward / backward / optimizer; ``MoELayer`` labels its router, dispatch
    and auxiliary losses inside the forward. ``warmup`` unprofiled steps come first (first calls
    allocate and pick kernels). The model's weights change (it trains); profile a copy if needed.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    check_int("steps", steps, low=1, where="profile_training")
    check_int("warmup", warmup, low=0, where="profile_training")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    dev = next(model.parameters()).device
    batch_list = list(batches(tuple(data), batch_size))
    if not batch_list:
        raise ValueError("profile_training: data is empty")

    def step(i):
        b = batch_list[i % len(batch_list)]
        with record_function("forward"):
            out = model(b[0].to(dev)) if len(b) == 2 else model(b[0].to(dev), b[2].to(dev))
            loss = loss_fn(out, b[1].to(dev)) + total_aux_loss(model)
        opt.zero_grad(set_to_none=True)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            update_expert_biases(model)

    for i in range(warmup):
        step(i)
    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps):
                step(warmup + i)
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    total_us = sum(by_name[s].cpu_time_total for s in ("forward", "backward", "optimizer") if s in by_name)
    stages = []
    for s in STAGES:
        if s in by_name:
            us = by_name[s].cpu_time_total
            stages.append({"stage": s, "ms_per_step": us / 1000 / steps, "share": us / total_us if total_us else 0.0})
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total, reverse=True)
    op_rows = [{"op": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": e.self_cpu_time_total / 1000 / steps,
                "share": e.self_cpu_time_total / total_us if total_us else 0.0} for e in ops[:row_limit]]
    table = events.table(sort_by="self_cpu_time_total", row_limit=row_limit)
    return ProfileSummary(stages, op_rows, table, steps)

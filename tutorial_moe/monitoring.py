"""Watching routing while an MoE trains: one summary per probe, recorded by a ``fit`` callback.

:class:`RoutingMonitor` routes a fixed probe set (held-out tokens with known labels) every few
steps and records seed 002's monitoring list - utilisation, routing entropy, specialisation, load
balance - plus the dropped fraction and how many probe tokens changed expert since the last probe
(routing instability). ``tutorial_moe.book.plots.plot_dashboard`` draws the records.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from ._validate import check_int
from .metrics import load_imbalance, routing_changes, routing_entropy, specialization, utilization
from .moe import collect_routing
from .routing import Routing

__all__ = ["top_expert_mask", "routing_summary", "RoutingMonitor", "compute_per_token"]


def top_expert_mask(routing: Routing) -> torch.Tensor:
    """(T, E) bool: each token's single heaviest expert (by combine weight), False for dropped tokens.

    Scoring specialisation on this mask treats dense and sparse routers alike: a softmax router
    sends every token everywhere, but its heaviest expert still says where the token "belongs".
    """
    top = routing.weights.detach().argmax(-1)
    mask = torch.nn.functional.one_hot(top, routing.num_experts).bool()
    return mask & ~routing.dropped.unsqueeze(1)


def routing_summary(routing: Routing, labels: torch.Tensor | None = None) -> dict:
    """Headline numbers of one routing of T tokens.

    utilization (E,) share of assignments per expert; entropy: mean router entropy in nats;
    load_imbalance: max/mean tokens per expert (1 = perfect); dropped: share of tokens that lost
    every expert; experts_per_token: mean routed experts per token; specialization: NMI between
    each kept token's heaviest expert and its label (needs ``labels``; 1 = expert tells the label).
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"routing_summary: routing must be a Routing, got {type(routing).__name__}")
    out = {
        "utilization": utilization(routing.mask).tolist(),
        "entropy": float(routing_entropy(routing.probs.detach())),
        "load_imbalance": load_imbalance(routing.mask),
        "dropped": float(routing.dropped.float().mean()) if routing.num_tokens else 0.0,
        "experts_per_token": float(routing.mask.float().sum(1).mean()) if routing.num_tokens else 0.0,
    }
    if labels is not None:
        kept = ~routing.dropped
        labels = torch.as_tensor(labels)
        if labels.shape != (routing.num_tokens,):
            raise ValueError(f"routing_summary: labels must have shape ({routing.num_tokens},), got {tuple(labels.shape)}")
        top = top_expert_mask(routing)
        out["specialization"] = specialization(top[kept], labels[kept]) if kept.any() else 0.0
    return out


class RoutingMonitor:
    """A ``fit`` callback: every ``every`` steps, route the probe tokens and record a summary.

    Args:
        x: (N, ...) probe inputs (held-out data, fixed for the whole run).
        labels: (N,) ground-truth groups for specialisation (optional).
        ids: (N,) token ids for routers that need them (hash routing).
        every: probe period in optimiser steps.  layer: which MoE module of the model to watch.

    ``records`` is a list of dicts: step, task (the training step's task loss), every key of
    :func:`routing_summary` (on the probe), ``train_dropped`` (dropped share of the training
    batch, as ``fit`` logged it), ``changes`` (share of probe tokens whose experts changed since
    the previous probe; None for the first) and ``seconds`` since the first probe. Use it directly as
    ``fit(..., callback=monitor)`` or call ``monitor.observe(model, step)`` yourself.
    """

    def __init__(self, x: torch.Tensor, labels: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                 every: int = 5, layer: int = 0):
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or len(x) == 0:
            raise ValueError(f"RoutingMonitor: x must be a non-empty (N, ...) tensor, got {getattr(x, 'shape', type(x))}")
        self.x, self.labels, self.ids = x, labels, ids
        if labels is not None and len(labels) != len(x):
            raise ValueError(f"RoutingMonitor: labels has {len(labels)} rows but x has {len(x)}")
        if ids is not None and len(ids) != len(x):
            raise ValueError(f"RoutingMonitor: ids has {len(ids)} rows but x has {len(x)}")
        self.every = check_int("every", every, low=1, where="RoutingMonitor")
        self.layer = check_int("layer", layer, low=0, where="RoutingMonitor")
        self.records: list[dict] = []
        self._previous_mask = None
        self._t0 = None

    def observe(self, model: nn.Module, step: int, task: float | None = None,
                train_dropped: float | None = None) -> dict:
        """Route the probe now and append a record (eval mode; no noise, no bias updates)."""
        if self._t0 is None:
            self._t0 = time.perf_counter()
        routing = collect_routing(model, self.x, self.ids, layer=self.layer)
        rec = {"step": int(step), "task": task, **routing_summary(routing, self.labels), "train_dropped": train_dropped}
        rec["changes"] = None if self._previous_mask is None else routing_changes(self._previous_mask, routing.mask)
        rec["seconds"] = time.perf_counter() - self._t0
        self._previous_mask = routing.mask.clone()
        self.records.append(rec)
        return rec

    def __call__(self, row: dict, model: nn.Module) -> None:
        if row["step"] % self.every == 0:
            dropped = row.get("dropped")  # fit logs one value per MoE module, for the training batch
            train_dropped = dropped[self.layer] if isinstance(dropped, list) and len(dropped) > self.layer else None
            self.observe(model, row["step"], row.get("task"), train_dropped)

    def series(self, key: str) -> list:
        return [r.get(key) for r in self.records]


def compute_per_token(layer: nn.Module, routing: Routing) -> dict:
    """Forward cost of one MoE feed-forward block per token.

    ``expert_evals``: expert applications per token (routed pairs / T; Soft MoE: slots / T).
    ``flops``: multiply-adds x 2 of the experts plus the router (gate matmuls; Soft MoE's slot
    mixing). Elementwise work (activations, softmax, sorting) is left out: it is small next to the
    matmuls at realistic widths, and a profile (chapter 10) shows what it costs at this size.
    """
    from .blocks import TokenGroups  # local: blocks imports nothing from here

    if isinstance(layer, TokenGroups):
        soft = layer.layer
        d, E, S = soft.d_model, soft.num_experts, soft.slots
        evals = layer.expert_evaluations_per_token()
        bank = soft.experts
        router_flops = 2 * d * E * S * 3  # logits, dispatch mix, combine mix
    else:
        bank = getattr(layer, "experts", None)
        if bank is None or not hasattr(bank, "d_hidden"):
            raise TypeError(f"compute_per_token: layer must be an MoELayer or TokenGroups, got {type(layer).__name__}")
        evals = float(routing.mask.float().sum() / max(routing.num_tokens, 1))
        router = layer.router
        gate_params = sum(p.numel() for p in router.parameters())
        router_flops = 2 * gate_params  # each gate/noise/group weight is used once per token
    d, h = bank.d_model, bank.d_hidden
    per_expert = 2 * d * h * (2 if bank.kind == "mlp" else 3)
    return {"expert_evals": evals, "flops": evals * per_expert + router_flops, "router_flops": router_flops,
            "expert_flops": per_expert}

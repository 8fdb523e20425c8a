"""Changing a trained MoE layer's experts: prune, split, switch off, and scale their gradients.

Seed 002 lists expert pruning and growth, handling expert failures and gradient scaling for
rarely used experts among its advanced techniques; these helpers make each one a small,
checkable operation on an :class:`~tutorial_moe.moe.MoELayer` with a ``TopKRouter``-style router
(a ``gate`` module that is an ``nn.Linear``, optional ``noise`` network, ``expert_bias`` buffer).

* :func:`prune_experts` keeps a subset of the experts (gate rows and expert weights together).
* :func:`split_expert` appends a copy of one expert whose gate row is slightly perturbed, so the
  copy starts identical and the two share the original's tokens.
* :func:`switch_off_experts` makes the router never choose some experts (their scores become
  -inf), e.g. an expert whose output is no longer finite; tokens go to their next choice.
* :func:`scale_expert_gradients` multiplies each expert's gradient by (mean load / its load) of
  the last forward, so an expert that saw few tokens still takes a step of normal size.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ._validate import check_int, check_positive_float

__all__ = ["prune_experts", "split_expert", "switch_off_experts", "scale_expert_gradients",
           "nonfinite_experts"]


def _check_layer(layer, where: str):
    router = getattr(layer, "router", None)
    bank = getattr(layer, "experts", None)
    gate = getattr(router, "gate", None)
    if router is None or bank is None or not isinstance(gate, nn.Linear) or not hasattr(bank, "w1"):
        raise TypeError(f"{where}: layer must be an MoELayer with MLP experts and a router whose gate is an "
                        f"nn.Linear, got {type(layer).__name__}")
    return router, bank


def _rebuild(layer, rows: list[int], where: str, gate_noise: torch.Tensor | None = None):
    """A copy of ``layer`` whose expert j is old expert ``rows[j]`` (gate rows, weights, biases)."""
    router, _ = _check_layer(layer, where)
    # The last forward's routing and losses are graph tensors, which deepcopy refuses; the copy
    # starts without them.
    saved = {n: layer.__dict__[n] for n in ("last_routing", "aux_losses", "aux_loss") if n in layer.__dict__}
    for n in saved:
        layer.__dict__[n] = None
    try:
        new = copy.deepcopy(layer)
    finally:
        layer.__dict__.update(saved)
    new.aux_losses, new.aux_loss = {}, torch.zeros(())
    idx = torch.tensor(rows, dtype=torch.long)
    E = len(rows)
    with torch.no_grad():
        g = router.gate
        gate = nn.Linear(g.in_features, E, bias=g.bias is not None).to(g.weight)
        gate.weight.copy_(g.weight[idx])
        if gate_noise is not None:
            gate.weight.add_(gate_noise)
        if g.bias is not None:
            gate.bias.copy_(g.bias[idx])
        new.router.gate = gate
        noise = getattr(router, "noise", None)
        if isinstance(noise, nn.Linear):
            new.router.noise = nn.Linear(noise.in_features, E, bias=False).to(noise.weight)
            new.router.noise.weight.copy_(noise.weight[idx])
        for name in ("expert_bias", "expert_load"):
            buf = getattr(router, name, None)
            if isinstance(buf, torch.Tensor):
                new.router._buffers[name] = buf[idx].clone()
        for name in ("w1", "b1", "w2", "b2"):
            setattr(new.experts, name, nn.Parameter(getattr(layer.experts, name)[idx].clone()))
    new.router.num_experts = E
    new.experts.num_experts = E
    new.num_experts = E
    if getattr(new.router, "k", 1) > E:
        raise ValueError(f"{where}: the router's k={new.router.k} exceeds the {E} experts left")
    return new


def prune_experts(layer, keep) -> nn.Module:
    """A copy of ``layer`` with only the experts in ``keep`` (a list of distinct indices, in order).

    For a renormalising top-k router (k > 1), removing experts that no token ranks in its top k
    leaves every output unchanged: the kept probabilities are rescaled by the same factor.
    """
    where = "prune_experts"
    router, bank = _check_layer(layer, where)
    keep = list(keep)
    if not keep or len(set(keep)) != len(keep):
        raise ValueError(f"{where}: keep={keep!r} must be a non-empty list of distinct expert indices")
    for e in keep:
        check_int("keep[i]", e, low=0, high=bank.num_experts - 1, where=where)
    return _rebuild(layer, keep, where)


def split_expert(layer, expert: int, noise: float = 0.01, seed: int = 0) -> nn.Module:
    """A copy of ``layer`` with one more expert: a clone of ``expert`` (index E), whose gate row is
    the original's plus Gaussian noise of std ``noise`` (so the two divide its tokens)."""
    where = "split_expert"
    router, bank = _check_layer(layer, where)
    check_int("expert", expert, low=0, high=bank.num_experts - 1, where=where)
    check_positive_float("noise", noise, where=where, allow_zero=True)
    rows = list(range(bank.num_experts)) + [expert]
    g = torch.Generator().manual_seed(seed)
    delta = torch.zeros(len(rows), router.gate.in_features)
    delta[-1] = noise * torch.randn(router.gate.in_features, generator=g)
    return _rebuild(layer, rows, where, gate_noise=delta.to(router.gate.weight))


def switch_off_experts(layer, experts) -> torch.utils.hooks.RemovableHandle:
    """Make ``layer``'s router never choose ``experts`` (their gate scores become -inf).

    Returns the hook's handle: ``handle.remove()`` switches them back on. Tokens whose choice was
    a switched-off expert go to their next-best expert; the other experts' probabilities are
    renormalised by the softmax.
    """
    where = "switch_off_experts"
    router, bank = _check_layer(layer, where)
    experts = sorted(set(experts))
    for e in experts:
        check_int("experts[i]", e, low=0, high=bank.num_experts - 1, where=where)
    if len(experts) > bank.num_experts - getattr(router, "k", 1):
        raise ValueError(f"{where}: switching off {len(experts)} of {bank.num_experts} experts leaves fewer "
                         f"than k={getattr(router, 'k', 1)}")
    off = torch.tensor(experts, dtype=torch.long)

    def hook(module, inputs, output):
        out = output.clone()
        out[..., off.to(out.device)] = float("-inf")
        return out

    return router.gate.register_forward_hook(hook)


@torch.no_grad()
def nonfinite_experts(layer, x: torch.Tensor) -> list[int]:
    """Experts whose output on tokens ``x`` (T, d_model) has a NaN or an infinity."""
    _check_layer(layer, "nonfinite_experts")
    y = layer.experts.forward_all(x)  # (E, T, d)
    return [int(e) for e in torch.nonzero(~torch.isfinite(y).flatten(1).all(1)).flatten()]


def scale_expert_gradients(layer, max_scale: float = 8.0) -> list:
    """Scale each expert's gradient by min(mean load / its load, ``max_scale``) (loads from the
    layer's last forward; an expert with no tokens has no gradient to scale).

    Returns the hook handles (``h.remove()`` for each to undo). The scale is applied as the
    gradient is computed, so clipping and the optimiser see the scaled values.
    """
    where = "scale_expert_gradients"
    _check_layer(layer, where)
    check_positive_float("max_scale", max_scale, where=where)

    def scale():
        routing = layer.last_routing
        if routing is None:
            return None
        load = routing.mask.sum(0).to(torch.float32)
        return (load.mean() / load.clamp_min(1.0)).clamp(max=max_scale)

    def make_hook(dims):
        def hook(grad):
            s = scale()
            if s is None:
                return grad
            return grad * s.to(grad).view(-1, *([1] * dims))
        return hook

    return [getattr(layer.experts, n).register_hook(make_hook(getattr(layer.experts, n).dim() - 1))
            for n in ("w1", "b1", "w2", "b2")]

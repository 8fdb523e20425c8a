"""A balance loss over the whole accumulated batch, not each micro-batch (global-batch balancing).

The Switch loss (Fedus et al., arXiv 2101.03961) is ``E * sum_i f_i P_i`` with f_i the share of
expert i among the batch's assignments and P_i the mean router probability of expert i. With
gradient accumulation it is usually computed on each micro-batch and averaged: every
micro-batch must then be balanced on its own. Qiu et al. (Qwen, "Demons in the Detail", arXiv
2501.11873) compute f over the *global* batch instead (they synchronise the counts across
micro-batches and data-parallel ranks), which asks for balance over the corpus rather than inside
each few sequences, and report better perplexity and clearer domain specialisation; Qwen3-MoE
trains this way.

Because f carries no gradient and the loss is linear in P, the global loss splits exactly over
micro-batches m of T_m tokens (T = sum T_m):

    L_global = E * sum_i f_i^global * P_i^global
             = sum_m  E * sum_i f_i^global * (T_m / T) * P_i^m,

so each micro-batch contributes a term with its own P^m (and its graph) and the global f, which
is known only once every micro-batch has routed. :class:`GlobalBalanceLoss` collects, per MoE
layer and micro-batch, the expert counts (detached) and the probability sums (keeping their
graph); :meth:`GlobalBalanceLoss.loss` returns the sum of those terms (equal to the Switch loss
of the concatenated batch, in value and gradient) and :meth:`GlobalBalanceLoss.micro_batch_loss`
the usual mean of per-micro-batch Switch losses, for comparison.

Using it in a training step (the layers' own Switch loss switched off with ``losses={}``)::

    acc = GlobalBalanceLoss()
    task = 0
    for xb, yb in micro_batches:
        task = task + F.cross_entropy(model(xb), yb) / len(micro_batches)
        acc.add_model(model)                     # reads every MoE module's last_routing
    (task + weight * acc.loss()).backward()      # one backward: every P^m graph is alive
    optimizer.step(); acc.reset()

The terms need every micro-batch's router graph alive until the backward, so this form costs the
activation memory of the whole batch (the same gradients as accumulation, not its memory saving).
A memory-saving run would backpropagate each task loss at once and keep only the routers' inputs.

Only ``Routing.probs`` and the router's choices are read: ``Routing.chosen_mask`` (the choices
before capacity) where the Routing has it, else ``Routing.mask``; f's denominator is the number of
assignments, as in ``tutorial_moe.losses.switch_balance_loss``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch
import torch.nn as nn

from .moe import moe_modules

__all__ = ["choices_of", "GlobalBalanceLoss"]


def choices_of(routing) -> torch.Tensor:
    """(T, E) bool: the experts the router chose for each token, before capacity dropped any when
    the Routing records that (``chosen_mask``), else ``mask``."""
    mask = getattr(routing, "chosen_mask", None)
    return routing.mask if mask is None else mask


@dataclass
class _Layer:
    counts: list[torch.Tensor] = field(default_factory=list)  # (E,) float64, detached
    prob_sums: list[torch.Tensor] = field(default_factory=list)  # (E,), with graph
    tokens: list[int] = field(default_factory=list)


class GlobalBalanceLoss:
    """Accumulates routing over micro-batches and gives the Switch loss of the whole batch.

    :meth:`add` takes one micro-batch's :class:`~tutorial_moe.routing.Routing` of one layer
    (``layer`` any hashable key, default 0); :meth:`add_model` adds the ``last_routing`` of every
    MoE module of a model (keys 0, 1, ... in ``moe_modules`` order). Losses are summed over layers,
    as ``total_aux_loss`` sums the layers' own losses.
    """

    def __init__(self):
        self._layers: dict[Hashable, _Layer] = {}

    def reset(self) -> None:
        """Forget everything (call after the optimiser step)."""
        self._layers = {}

    @property
    def layers(self) -> list:
        return list(self._layers)

    def num_micro_batches(self, layer: Hashable = 0) -> int:
        return len(self._get(layer).tokens)

    def _get(self, layer) -> _Layer:
        if layer not in self._layers:
            raise ValueError(f"GlobalBalanceLoss: no routing was added for layer={layer!r}; layers with routing: "
                             f"{self.layers}")
        return self._layers[layer]

    def add(self, routing, layer: Hashable = 0) -> None:
        """Add one micro-batch's routing of ``layer`` (its ``probs`` keep their graph)."""
        where = "GlobalBalanceLoss.add"
        probs = getattr(routing, "probs", None)
        if not isinstance(probs, torch.Tensor) or not isinstance(getattr(routing, "mask", None), torch.Tensor):
            raise TypeError(f"{where}: routing must be a Routing (with probs and mask tensors), got "
                            f"{type(routing).__name__}")
        mask = choices_of(routing)
        if probs.dim() != 2 or mask.shape != probs.shape:
            raise ValueError(f"{where}: routing.probs {tuple(probs.shape)} and its choices {tuple(mask.shape)} must "
                             f"both be (tokens, experts)")
        try:
            hash(layer)
        except TypeError:
            raise TypeError(f"{where}: layer must be hashable (an int or a name), got {type(layer).__name__}") from None
        acc = self._layers.setdefault(layer, _Layer())
        if acc.counts and acc.counts[0].shape[0] != probs.shape[1]:
            raise ValueError(f"{where}: layer={layer!r} had {acc.counts[0].shape[0]} experts, this routing has "
                             f"{probs.shape[1]}")
        acc.counts.append(mask.detach().sum(0).to(torch.float64))
        acc.prob_sums.append(probs.sum(0))
        acc.tokens.append(int(probs.shape[0]))

    def add_model(self, model: nn.Module) -> int:
        """Add the ``last_routing`` of every MoE module of ``model`` (after its forward on one
        micro-batch); returns how many layers were added."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"GlobalBalanceLoss.add_model: model must be an nn.Module, got {type(model).__name__}")
        mods = moe_modules(model)
        if not mods:
            raise ValueError("GlobalBalanceLoss.add_model: model has no MoE module (nothing with last_routing)")
        for i, m in enumerate(mods):
            if m.last_routing is None:
                raise ValueError(f"GlobalBalanceLoss.add_model: MoE module {i} has no last_routing; run a forward first")
            self.add(m.last_routing, i)
        return len(mods)

    def frequencies(self, layer: Hashable = 0) -> torch.Tensor:
        """f^global (E,), float64: each expert's share of all assignments added for ``layer``."""
        acc = self._get(layer)
        counts = torch.stack(acc.counts).sum(0)
        return counts / counts.sum().clamp_min(1)

    def terms(self, layer: Hashable = 0) -> list[torch.Tensor]:
        """Per micro-batch: ``E * sum_i f_i^global * (T_m / T) * P_i^m`` (their sum is :meth:`loss`)."""
        acc = self._get(layer)
        f = self.frequencies(layer)
        T = max(sum(acc.tokens), 1)
        E = f.shape[0]
        return [E * (f.to(s.dtype) * s).sum() / T for s in acc.prob_sums]

    def loss(self, layer: Hashable | None = None) -> torch.Tensor:
        """The global-batch Switch loss of ``layer``, or summed over every layer (None)."""
        keys = self.layers if layer is None else [layer]
        if not keys:
            raise ValueError("GlobalBalanceLoss.loss: nothing was added")
        return torch.stack([torch.stack(self.terms(key)).sum() for key in keys]).sum()

    def micro_batch_loss(self, layer: Hashable | None = None) -> torch.Tensor:
        """The usual alternative: the mean over micro-batches of each one's own Switch loss
        (what accumulating ``loss / N`` with the layers' built-in loss optimises); summed over
        layers when ``layer`` is None."""
        keys = self.layers if layer is None else [layer]
        if not keys:
            raise ValueError("GlobalBalanceLoss.micro_batch_loss: nothing was added")
        per_layer = []
        for key in keys:
            acc = self._get(key)
            parts = []
            for c, s, t in zip(acc.counts, acc.prob_sums, acc.tokens):
                f = c / c.sum().clamp_min(1)
                parts.append(c.shape[0] * (f.to(s.dtype) * s).sum() / max(t, 1))
            per_layer.append(torch.stack(parts).mean())
        return torch.stack(per_layer).sum()

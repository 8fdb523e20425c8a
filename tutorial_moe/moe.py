"""Mixture-of-Experts modules.

* :class:`MoELayer` - a drop-in feed-forward block for ``(..., d_model)`` tensors with E experts in an
  :class:`~tutorial_moe.experts.ExpertBank`, a router, a dispatch mode and auxiliary losses.
* :class:`MoE` - "whole network" experts (seeds 000 and 004): any list of modules with the same
  output shape, a router that reads the same input, outputs combined by the routing weights.
* :class:`SoftMoELayer` - Soft MoE (Puigcerver et al., arXiv 2308.00951): experts process learned
  soft mixtures of tokens ("slots"), so nothing is dropped and everything is differentiable.

After a forward each module keeps ``last_routing`` (a :class:`Routing`), ``aux_losses`` (a dict
of weighted auxiliary losses, for logging) and ``aux_loss`` (their sum, to add to the task loss).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import check_choice, check_finite, check_int, check_positive_float
from .dispatch import DISPATCH_MODES, dispatch as run_dispatch, expert_slices, sorted_pairs
from .experts import ACTIVATIONS, ExpertBank, MLPExpert
from .losses import check_loss_weights, check_losses_for_router, compute_aux_losses
from .routing import Router, Routing, cat_routings, layer_router

__all__ = ["MoELayer", "MoE", "SoftMoELayer", "AuxLossMixin", "moe_modules", "total_aux_loss", "collect_routing",
           "default_losses"]

_EXPERT_KINDS = ("mlp", "swiglu")


def _profiler_label(name: str):
    """A torch.profiler range (tutorial_moe.experiments.debugging.profile_training reads them), entered only while
    a profiler runs: an idle ``record_function`` costs about as much as a small matmul."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


_DEFAULT_LOSSES = {"switch": 0.01}


def default_losses(router) -> dict:
    """The auxiliary losses a layer gets when ``losses=None``: the Switch loss at weight 0.01,
    except for routers that send every token to every expert or give every expert the same load
    (where it is a constant)."""
    constant = getattr(router, "routes_all", False) or getattr(router, "equal_load", False)
    return {} if constant else dict(_DEFAULT_LOSSES)


class AuxLossMixin:
    """Keeps ``last_routing``, ``aux_losses`` and ``aux_loss`` of an MoE module after a forward
    (what ``fit``, ``moe_modules`` and ``total_aux_loss`` read); ``self.losses`` holds the weights."""

    def _set_aux(self, routing: Routing, expert_outputs=None):
        self.last_routing = routing
        self.aux_losses = compute_aux_losses(routing, self.losses, expert_outputs)
        if self.aux_losses:
            self.aux_loss = torch.stack(list(self.aux_losses.values())).sum()
        else:
            self.aux_loss = routing.probs.new_zeros(())


class MoELayer(AuxLossMixin, nn.Module):
    """A sparse feed-forward block: ``(..., d_model) -> (..., d_model)``.

    Args:
        d_model, d_hidden: token width and each expert's hidden width.
        num_experts: E.  k: experts per token (1 <= k <= E).
        expert: "mlp" (Linear, GELU, Linear) or "swiglu" (the gated form).
        dispatch: "dense" (oracle), "loop", "sorted", "grouped" or "auto" (fastest valid here).
        capacity_factor: None (no dropping) or > 0 (capacity ceil(cf * T * k / E) per expert).
        router: a router module to use instead of the default ``TopKRouter`` (its ``num_experts``
            must equal E, and ``k`` must equal its k; capacity, noise and temperature are set on
            it: passing them here too raises ValueError instead of being ignored).
        noisy, temperature: passed to the default ``TopKRouter`` (which renormalises the k weights
            when the current k > 1 and keeps the raw probability when k = 1, as Switch does).
        losses: ``{name: weight}`` auxiliary losses (see ``tutorial_moe.losses.LOSSES``);
            default ``{"switch": 0.01}`` ({} for a router that sends every token everywhere).
            Settings that cannot work with the router ('z' without real logits, 'switch' on a
            dense router, 'load' without a noisy one) raise ValueError.

    Tokens dropped by capacity get a zero output from this block; wrap it in a residual
    connection (as transformers do) so they pass through unchanged.
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, k: int, expert: str = "mlp",
                 dispatch: str = "auto", capacity_factor: float | None = None, router: nn.Module | None = None,
                 noisy: bool = False, temperature: float = 1.0, losses: dict | None = None):
        super().__init__()
        where = "MoELayer"
        self.d_model = check_int("d_model", d_model, low=1, where=where)
        self.d_hidden = check_int("d_hidden", d_hidden, low=1, where=where)
        self.num_experts = check_int("num_experts", num_experts, low=1, where=where)
        check_int("k", k, low=1, high=num_experts, where=where)
        check_choice("expert", expert, _EXPERT_KINDS, where=where)
        self.dispatch = check_choice("dispatch", dispatch, DISPATCH_MODES, where=where)
        router = layer_router(where, d_model, num_experts, k, router, capacity_factor, noisy, temperature)
        self.losses = check_loss_weights(default_losses(router) if losses is None else losses, where)
        check_losses_for_router(self.losses, router, where)
        self.router = router
        self.experts = ExpertBank(num_experts, d_model, d_hidden, kind=expert)
        self.last_routing: Routing | None = None
        self.aux_losses: dict = {}
        self.aux_loss = torch.zeros(())

    @property
    def k(self) -> int:
        return getattr(self.router, "k", None)

    def extra_repr(self):
        return f"dispatch={self.dispatch!r}, losses={self.losses}"

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoELayer: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"MoELayer: x must have shape (..., {self.d_model}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.d_model)
        flat_ids = None if ids is None else torch.as_tensor(ids, device=x.device).reshape(-1)
        with _profiler_label("moe.router"):
            routing = self.router(flat, flat_ids)
        with _profiler_label("moe.dispatch"):
            out = run_dispatch(self.dispatch, self.experts, flat, routing)
        with _profiler_label("moe.aux_losses"):
            y_all = self.experts.forward_all(flat) if self.losses.get("diversity", 0) > 0 else None
            self._set_aux(routing, y_all)
        return out.reshape(*lead, self.d_model)


class MoE(AuxLossMixin, nn.Module):
    """Whole-network experts combined by a router: ``out = combine_e(weights[:, e], expert_e(x))``.

    Args:
        experts: a list of modules; each maps the input (N, ...) to (N, C).
        router: a router module reading the same input (see ``tutorial_moe.routing``).
        dispatch: "dense" runs every expert on every sample (the oracle, and what training with
            all experts costs); "loop" runs each expert module only on its routed samples (what a
            sparse model costs at inference); "auto" is "loop", except that without autograd,
            plain one-hidden-layer ``MLPExpert`` s of one shape run on expert-sorted samples with
            a few direct kernel calls (see ``_sparse_inference``), with far less per-expert overhead.
        combine: "logits" - weighted sum of the experts' outputs (seed 004: softmax of the sum);
            "probs" - mixture of the experts' softmax distributions (seed 000: "sum the weighted
            probabilities"), returned as log-probabilities of the mixture renormalised over the
            experts each sample kept (``sum_e w_e softmax(y_e) / sum_e w_e``): each row's
            ``exp`` sums to 1 even when the weights do not (raw top-k probabilities, capacity
            drops), so ``F.nll_loss`` and ``F.cross_entropy`` on the output agree and are the
            negative log-likelihood of that mixture. A sample that kept no expert gets the
            uniform distribution.
        losses: ``{name: weight}`` auxiliary losses, default none.
    """

    def __init__(self, experts, router: nn.Module, dispatch: str = "dense", combine: str = "logits",
                 losses: dict | None = None):
        super().__init__()
        where = "MoE"
        experts = list(experts)
        if not experts or not all(isinstance(e, nn.Module) for e in experts):
            raise TypeError(f"{where}: experts must be a non-empty list of nn.Module, got {experts!r:.80}")
        if not isinstance(router, nn.Module):
            raise TypeError(f"{where}: router must be an nn.Module, got {type(router).__name__}")
        if getattr(router, "num_experts", len(experts)) != len(experts):
            raise ValueError(f"{where}: router.num_experts={router.num_experts} but {len(experts)} experts were given")
        self.experts = nn.ModuleList(experts)
        self.router = router
        self.dispatch = check_choice("dispatch", dispatch, ("dense", "loop", "auto"), where=where)
        self.combine = check_choice("combine", combine, ("logits", "probs"), where=where)
        self.losses = check_loss_weights(losses, where)
        check_losses_for_router(self.losses, router, where)
        self.last_routing = None
        self.aux_losses = {}
        self.aux_loss = torch.zeros(())

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every sample: (E, N, C) raw outputs (e.g. to score each expert alone)."""
        return torch.stack([e(x) for e in self.experts])

    def _mix(self, weights: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # weights (n,) or (n, 1)-broadcastable, y (n, C)
        if self.combine == "probs":
            return weights.unsqueeze(-1) * y.softmax(-1)
        return weights.unsqueeze(-1) * y

    def _plain_mlp_experts(self):
        """``(activation, [(w1, b1, w2, b2) per expert])`` when no gradient is needed and every expert
        is a plain one-hidden-layer :class:`MLPExpert` of one shape (no LayerNorm, no skip onto the
        input, no active dropout); else None. The weights are the experts' own tensors."""
        # Runs on every forward, so it reads the module dicts directly (nn.Module attribute lookup
        # costs ~1 us a time) and re-checks the structure only when an expert or weight changes.
        ex = list(self.experts._modules.values())
        if not all(type(e) is MLPExpert for e in ex):
            return None
        lin = [(e._modules["fc_in"]._parameters, e._modules["fc_out"]._parameters) for e in ex]
        params = [(a["weight"], a["bias"], b["weight"], b["bias"]) for a, b in lin]
        if torch.is_grad_enabled() and any(p.requires_grad for ps in params for p in ps):
            return None
        key = tuple((id(e), e.training, e.activation, e._modules["drop"].p, *(id(p) for p in ps), *(p.shape for p in ps))
                    for e, ps in zip(ex, params))
        cached = self.__dict__.get("_plain_cache")
        if cached is None or cached[0] != key:
            first = ex[0]
            plain = not any(len(e.hidden) or e.layer_norm or (e.skip and e.d_out == e.d_in) or (e.training and e.drop.p > 0)
                            or e.activation != first.activation or e.fc_in.weight.shape != first.fc_in.weight.shape
                            or e.fc_out.weight.shape != first.fc_out.weight.shape for e in ex)
            cached = self.__dict__["_plain_cache"] = (key, plain)
        return (ex[0].activation, params) if cached[1] else None

    def _sparse_inference(self, x: torch.Tensor, routing: Routing, plain) -> torch.Tensor:
        """Routed samples sorted by expert, each expert's slice through two ``addmm(out=...)`` and
        one activation over all rows: a handful of kernel calls instead of a module call chain per
        expert (the per-expert Python overhead is a visible share at batch 256)."""
        activation, params = plain
        flat = x.flatten(1) if x.dim() > 2 else x
        t_idx, _, w, counts = sorted_pairs(routing)
        xs = flat.index_select(0, t_idx)
        n = xs.shape[0]
        h, y = xs.new_empty(n, params[0][0].shape[0]), xs.new_empty(n, params[0][2].shape[0])
        slices = [(params[e], sl) for e, sl in expert_slices(counts.tolist())]
        # nn.Linear's (out, in) weights used through a transposed view, as F.linear does: measured
        # as fast as contiguous transposed copies for the wide first layer, faster for the 10-wide last.
        for (w1, b1, _, _), sl in slices:
            torch.addmm(b1, xs[sl], w1.t(), out=h[sl])
        h = ACTIVATIONS[activation](h)
        for (_, _, w2, b2), sl in slices:
            torch.addmm(b2, h[sl], w2.t(), out=y[sl])
        return y.new_zeros(flat.shape[0], y.shape[1]).index_add_(0, t_idx, self._mix(w.to(y.dtype), y))

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoE: x must be a torch.Tensor, got {type(x).__name__}")
        if not isinstance(self.router, Router):  # our score-based routers check x themselves
            check_finite(x, where="MoE")
        routing = self.router(x, ids)
        W = routing.weights
        ys = None
        if self.dispatch == "dense" or self.losses.get("diversity", 0) > 0:
            ys = self.expert_outputs(x)  # (E, N, C)
        if self.dispatch == "dense":
            out = sum(self._mix(W[:, e], ys[e]) for e in range(self.num_experts))
        elif self.dispatch == "auto" and (plain := self._plain_mlp_experts()) is not None:
            out = self._sparse_inference(x, routing, plain)
        else:
            out = None
            for e, expert in enumerate(self.experts):
                idx = routing.mask[:, e].nonzero().squeeze(1)
                if idx.numel() == 0:
                    continue
                part = self._mix(W.index_select(0, idx)[:, e], expert(x.index_select(0, idx)))
                if out is None:
                    out = part.new_zeros((x.shape[0],) + part.shape[1:])
                out = out.index_add(0, idx, part)
            if out is None:  # every sample dropped: zeros of the experts' output shape
                probe = self.experts[0](x[:1])
                out = probe.new_zeros((x.shape[0],) + probe.shape[1:])
        if self.combine == "probs":
            # Renormalise over the kept experts: each expert's softmax sums to 1, so the mixture
            # sums to the kept weights' total.
            total = W.sum(-1, keepdim=True).to(out.dtype)
            kept = total > 0
            log_mix = out.clamp_min(1e-12).log() - torch.where(kept, total, torch.ones_like(total)).log()
            out = torch.where(kept, log_mix, torch.full_like(log_mix, -math.log(out.shape[-1])))
        self._set_aux(routing, ys)
        return out


class SoftMoELayer(AuxLossMixin, nn.Module):
    """Soft MoE (arXiv 2308.00951) with ``slots_per_expert`` slots per expert.

    For a group of n tokens X (n, d) and slot parameters Phi (d, E*S):
    dispatch D = softmax over tokens of X Phi, slots = D^T X; each expert processes its S slots;
    combine C = softmax over slots of X Phi, output = C @ expert outputs. Input ``(..., n, d)``:
    the next-to-last dim is the group (a sequence); a 2-D input is one group of all its rows, so a
    sample's output then depends on the rest of the batch. ``last_routing.probs`` holds each
    token's combine weight summed per expert (its share of each expert).

    Deviation: the paper L2-normalises the tokens and the slot parameters (with a learned scale)
    before ``X Phi`` for stability at scale (arXiv 2308.00951); this layer does not.
    Its routing has no pre-softmax scores per expert, so the z-loss and the Switch loss (every
    token reaches every expert) are refused.
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, slots_per_expert: int = 1, expert: str = "mlp",
                 losses: dict | None = None):
        super().__init__()
        where = "SoftMoELayer"
        self.d_model = check_int("d_model", d_model, low=1, where=where)
        self.num_experts = check_int("num_experts", num_experts, low=1, where=where)
        self.slots = check_int("slots_per_expert", slots_per_expert, low=1, where=where)
        check_choice("expert", expert, _EXPERT_KINDS, where=where)
        self.phi = nn.Parameter(torch.randn(d_model, num_experts * slots_per_expert) * d_model**-0.5)
        self.experts = ExpertBank(num_experts, d_model, d_hidden, kind=expert)
        self.losses = check_loss_weights(losses, where)
        check_losses_for_router(self.losses, None, where, has_logits=False, routes_all=True)
        self.last_routing = None
        self.aux_losses = {}
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor, ids=None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"SoftMoELayer: x must have shape (..., n, {self.d_model}), got {tuple(getattr(x, 'shape', ()))}")
        check_finite(x, where="SoftMoELayer")
        squeeze = x.dim() == 2
        X = x.unsqueeze(0) if squeeze else x.reshape(math.prod(x.shape[:-2]), *x.shape[-2:])  # (B, n, d)
        B, n, d = X.shape
        E, S = self.num_experts, self.slots
        scores = X @ self.phi  # (B, n, E*S)
        D = scores.softmax(dim=1)  # over tokens
        C = scores.softmax(dim=2)  # over slots
        slots = torch.einsum("bns,bnd->bsd", D, X).reshape(B, E, S, d)
        y_slots = torch.stack([
            self.experts.apply_expert(p, slots[:, e].reshape(B * S, d)).reshape(B, S, d)
            for e, p in enumerate(self.experts.expert_params())
        ], dim=1).reshape(B, E * S, d)
        out = torch.einsum("bns,bsd->bnd", C, y_slots)
        share = C.reshape(B * n, E, S).sum(-1)  # (T, E)
        T = B * n
        routing = Routing(share.clamp_min(1e-30).log(), share, share, torch.ones(T, E, dtype=torch.bool, device=x.device),
                          torch.zeros(T, dtype=torch.bool, device=x.device), has_logits=False)
        self._set_aux(routing)
        return out.squeeze(0) if squeeze else out.reshape(x.shape)


def moe_modules(model: nn.Module) -> list[nn.Module]:
    """Every MoE module inside ``model`` (anything with ``last_routing`` and ``aux_loss``), in order."""
    return [m for m in model.modules() if hasattr(m, "last_routing") and hasattr(m, "aux_loss")]


@torch.no_grad()
def collect_routing(model: nn.Module, x: torch.Tensor, ids=None, batch_size: int = 1024, layer: int = 0) -> Routing:
    """Run ``model`` in eval mode over ``x`` and concatenate the routing of its ``layer``-th MoE module."""
    mods = moe_modules(model)
    if not mods:
        raise ValueError("collect_routing: model contains no MoE module (nothing with last_routing)")
    check_int("layer", layer, low=0, high=len(mods) - 1, where="collect_routing")
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts = []
    try:
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(dev)
            model(xb) if ids is None else model(xb, ids[start : start + batch_size].to(dev))
            parts.append(mods[layer].last_routing.detach())
    finally:
        model.train(was_training)
    return cat_routings(parts)


def total_aux_loss(model: nn.Module) -> torch.Tensor | float:
    """Sum of the auxiliary losses of every MoE module in ``model`` from its last forward."""
    parts = [m.aux_loss for m in moe_modules(model) if isinstance(m.aux_loss, torch.Tensor)]
    return torch.stack(parts).sum() if parts else 0.0

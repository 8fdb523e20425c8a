"""Small token models around one feed-forward block, for the token-level chapters (07-09).

* :class:`ResidualBlock` - ``x + ffn(LayerNorm(x))``: the pre-norm residual block of a transformer.
  Wrapping the MoE layer (rather than each expert) in the skip connection and LayerNorm means a
  token dropped by capacity passes through unchanged and the gate weight never scales the skip.
* :class:`TokenGroups` - feeds a 2-D token batch to Soft MoE in fixed-size groups.
* :class:`TokenRegressor` - ``Linear(d_in, d_model) -> ResidualBlock(ffn) -> LayerNorm -> Linear(d_model, d_out)``,
  where ``ffn`` is an :class:`~tutorial_moe.moe.MoELayer`, a :class:`~tutorial_moe.moe.SoftMoELayer`
  or a dense :class:`~tutorial_moe.experts.MLPExpert` (the non-MoE baseline).
* :func:`active_parameters`, :func:`dense_hidden_matching` - parameter accounting for fair baselines.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from ._validate import check_int
from .experts import ExpertBank
from .routing import cat_routings

__all__ = ["ResidualBlock", "TokenGroups", "TokenRegressor", "active_parameters", "dense_hidden_matching"]


def _takes_ids(module: nn.Module) -> bool:
    try:
        return "ids" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


class ResidualBlock(nn.Module):
    """``x + ffn(LayerNorm(x))`` for tokens (T, d_model); ``ids`` are passed on if ``ffn`` takes them."""

    def __init__(self, d_model: int, ffn: nn.Module):
        super().__init__()
        check_int("d_model", d_model, low=1, where="ResidualBlock")
        if not isinstance(ffn, nn.Module):
            raise TypeError(f"ResidualBlock: ffn must be an nn.Module, got {type(ffn).__name__}")
        self.norm = nn.LayerNorm(d_model)
        self.ffn = ffn
        self._ids = _takes_ids(ffn)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x)
        return x + (self.ffn(h, ids) if self._ids else self.ffn(h))


class TokenGroups(nn.Module):
    """Run ``layer`` (e.g. a SoftMoELayer) on (T, d) tokens cut into groups of ``group_size`` rows.

    Soft MoE mixes the tokens of a group into slots, so a token's output depends on its group;
    fixed groups keep that dependence small and the same in training and evaluation. The last
    group may be shorter when T is not a multiple of ``group_size``. After a forward, the wrapped
    layer's ``last_routing`` and ``aux_loss`` hold their merge over all groups, so ``moe_modules``,
    ``fit`` and ``collect_routing`` see one layer that routed every token (this wrapper has no
    such attributes of its own, so nothing is counted twice). The merged auxiliary losses are
    the groups' losses weighted by their share of the tokens (a full group of n tokens counts n/T),
    so they do not depend on how T splits into groups (a short last group adds its share, not a
    whole extra loss).
    """

    def __init__(self, layer: nn.Module, group_size: int):
        super().__init__()
        if not isinstance(layer, nn.Module):
            raise TypeError(f"TokenGroups: layer must be an nn.Module, got {type(layer).__name__}")
        self.layer = layer
        self.group_size = check_int("group_size", group_size, low=1, where="TokenGroups")
        self.num_experts = getattr(layer, "num_experts", None)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"TokenGroups: x must have shape (tokens, d_model), got {tuple(getattr(x, 'shape', ()))}")
        T, n = x.shape[0], self.group_size
        full = (T // n) * n
        outs, routings, aux, parts = [], [], [], {}
        for chunk in ([x[:full].reshape(T // n, n, -1)] if full else []) + ([x[full:]] if full < T else []):
            share = (chunk.shape[0] * chunk.shape[1] if chunk.dim() == 3 else chunk.shape[0]) / T
            outs.append(self.layer(chunk).reshape(-1, x.shape[1]))
            routings.append(self.layer.last_routing)
            a = self.layer.aux_loss
            aux.append(share * (a if isinstance(a, torch.Tensor) else torch.tensor(float(a))))
            for name, v in self.layer.aux_losses.items():
                parts[name] = parts.get(name, 0) + share * v
        if not outs:  # no tokens: let the layer see the empty batch once (zero losses, a routing of 0 rows)
            return self.layer(x)
        self.layer.aux_losses = parts
        self.layer.last_routing = cat_routings(routings)
        self.layer.aux_loss = torch.stack(aux).sum()
        return torch.cat(outs)

    def expert_evaluations_per_token(self) -> float:
        """Slots processed per token: E * slots_per_expert / group_size (Soft MoE's compute)."""
        return self.layer.num_experts * self.layer.slots / self.group_size


class TokenRegressor(nn.Module):
    """Maps (T, d_in) samples to (T, d_out) predictions through one residual feed-forward block.

    ``ffn`` is any (T, d_model) -> (T, d_model) module; MoE modules inside are found by
    ``tutorial_moe.moe.moe_modules`` (so ``fit`` adds their auxiliary losses and logs their routing).
    """

    def __init__(self, d_in: int, d_model: int, d_out: int, ffn: nn.Module):
        super().__init__()
        where = "TokenRegressor"
        check_int("d_in", d_in, low=1, where=where)
        self.d_model = check_int("d_model", d_model, low=1, where=where)
        check_int("d_out", d_out, low=1, where=where)
        self.embed = nn.Linear(d_in, d_model)
        self.block = ResidualBlock(d_model, ffn)
        self.out_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, d_out)

    @property
    def ffn(self) -> nn.Module:
        return self.block.ffn

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.embed.in_features:
            raise ValueError(f"TokenRegressor: x must have shape (T, {self.embed.in_features}), "
                             f"got {tuple(getattr(x, 'shape', ()))}")
        return self.head(self.out_norm(self.block(self.embed(x), ids)))


def active_parameters(model: nn.Module, experts_per_token: float = 1.0) -> int:
    """Parameters one token touches: everything outside expert banks, plus ``experts_per_token``
    experts' worth of each :class:`~tutorial_moe.experts.ExpertBank` (rounded to an int)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"active_parameters: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(experts_per_token, bool) or not isinstance(experts_per_token, (int, float)) or experts_per_token < 0:
        raise ValueError(f"active_parameters: experts_per_token={experts_per_token!r} must be a number >= 0")
    banks = [m for m in model.modules() if isinstance(m, ExpertBank)]
    in_banks = {id(p) for b in banks for p in b.parameters()}
    shared = sum(p.numel() for p in model.parameters() if id(p) not in in_banks)
    per_expert = sum(sum(p.numel() for p in b.parameters()) / b.num_experts for b in banks)
    return int(round(shared + experts_per_token * per_expert))


def dense_hidden_matching(target_params: int, d_in: int, d_model: int, d_out: int) -> int:
    """The smallest hidden width h for which ``TokenRegressor(d_in, d_model, d_out, MLPExpert(d_model, h))``
    has at least ``target_params`` parameters (a dense baseline with equal active parameters)."""
    check_int("target_params", target_params, low=1, where="dense_hidden_matching")
    # Everything but the MLP: embed, two LayerNorms, head. The MLP adds (2 d_model + 1) h + d_model.
    fixed = (d_in + 1) * d_model + 4 * d_model + (d_model + 1) * d_out + d_model
    per_unit = 2 * d_model + 1
    return max(1, -(-(target_params - fixed) // per_unit))

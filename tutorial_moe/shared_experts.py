"""Shared experts and fine-grained expert configurations.

* :class:`SharedExpertMoE` - DeepSeekMoE's *shared expert isolation* (Dai et al., arXiv 2401.06066):
  ``S`` shared experts process every token, and an :class:`~tutorial_moe.moe.MoELayer` of routed
  experts adds its sparse part on top,

      out(x) = g(x) * sum_{s<S} shared_s(x) + moe(x),

  where g = 1 (DeepSeekMoE, DeepSeek-V3 arXiv 2412.19437) or, with ``shared_gate=True``, a learned
  scalar gate g(x) = sigmoid(w . x) per token, as Qwen1.5-MoE and Qwen2-MoE do. The shared
  experts hold the knowledge every token needs, so the routed ones need not each relearn it.
* :func:`fine_grained` - DeepSeekMoE's *fine-grained expert segmentation*: split each of E experts
  of hidden width f into m experts of width f/m and route every token to m*k of the m*E experts.
  The multiply-adds a token spends in experts are unchanged (m*k experts of width f/m instead of
  k of width f), while the number of possible expert combinations grows from C(E, k) to
  C(mE, mk). Optionally ``num_shared`` of the fine experts become shared ones, taken out of both
  the total and the active budget (``mE - s`` routed experts, ``mk - s`` chosen per token), as
  in the paper. The function returns the matching keyword arguments and the parameter and
  multiply-add counts, so equal-compute comparisons are arranged by construction.

The wrapper has no ``last_routing`` or ``aux_loss`` of its own: ``moe_modules`` finds the inner
``MoELayer`` (``layer.moe``), whose routing and auxiliary losses are the layer's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ._validate import check_int
from .experts import ExpertBank
from .moe import MoELayer

__all__ = ["SharedExpertMoE", "FineGrainedConfig", "fine_grained", "expert_macs", "expert_params"]

_KINDS = ("mlp", "swiglu")


def expert_params(d_model: int, d_hidden: int, kind: str = "mlp") -> int:
    """Parameters of one expert: mlp ``2 d h + h + d`` (two matrices, two biases); swiglu ``3 d h``."""
    if kind not in _KINDS:
        raise ValueError(f"expert_params: kind={kind!r} is unknown; choose one of {list(_KINDS)}")
    return 2 * d_model * d_hidden + d_hidden + d_model if kind == "mlp" else 3 * d_model * d_hidden


def expert_macs(d_model: int, d_hidden: int, kind: str = "mlp") -> int:
    """Multiply-adds of one expert on one token: ``2 d h`` (mlp) or ``3 d h`` (swiglu); bias adds and
    the activation are not multiply-adds and are left out."""
    if kind not in _KINDS:
        raise ValueError(f"expert_macs: kind={kind!r} is unknown; choose one of {list(_KINDS)}")
    return (2 if kind == "mlp" else 3) * d_model * d_hidden


class SharedExpertMoE(nn.Module):
    """``(..., d_model) -> (..., d_model)``: shared experts on every token plus routed experts.

    Args:
        d_model: token width.
        d_hidden: hidden width of each routed expert.
        num_experts, k: routed experts E and how many each token uses.
        num_shared: S >= 1 shared experts (their outputs are summed).
        shared_hidden: hidden width of each shared expert (default ``d_hidden``). S shared experts
            of width f compute the same family of functions as one of width S*f; DeepSeekMoE
            counts them as S fine-grained experts, Qwen2-MoE uses one wide one.
        shared_gate: False (weight 1, DeepSeekMoE) or True (a per-token sigmoid gate
            ``sigmoid(x @ w)``, ``w`` of shape (d_model,), Qwen-MoE).
        expert: "mlp" or "swiglu", for both kinds of expert.
        **moe_kwargs: passed to :class:`~tutorial_moe.moe.MoELayer` (``dispatch``, ``router``,
            ``capacity_factor``, ``losses``, ...).

    After a forward, ``last_shared_gate`` holds the gate values (``(...,)``, or None without a gate).
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, k: int, num_shared: int = 1,
                 shared_hidden: int | None = None, shared_gate: bool = False, expert: str = "mlp", **moe_kwargs):
        super().__init__()
        where = "SharedExpertMoE"
        check_int("num_shared", num_shared, low=1, where=where)
        shared_hidden = d_hidden if shared_hidden is None else check_int("shared_hidden", shared_hidden, low=1,
                                                                         where=where)
        if not isinstance(shared_gate, bool):
            raise TypeError(f"{where}: shared_gate must be a bool, got {type(shared_gate).__name__} {shared_gate!r}")
        # MoELayer checks d_model, d_hidden, num_experts, k, expert and the rest.
        self.moe = MoELayer(d_model, d_hidden, num_experts, k, expert=expert, **moe_kwargs)
        self.d_model = d_model
        self.shared = ExpertBank(num_shared, d_model, shared_hidden, kind=expert)
        if shared_gate:
            # Starts at 0, so the gate opens halfway (sigmoid(0) = 1/2) and learns from there.
            self.shared_gate = nn.Parameter(torch.zeros(d_model))
        else:
            self.register_parameter("shared_gate", None)
        self.last_shared_gate: torch.Tensor | None = None

    @property
    def num_shared(self) -> int:
        return self.shared.num_experts

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    @property
    def k(self) -> int:
        return self.moe.k

    def extra_repr(self) -> str:
        return f"num_shared={self.num_shared}, shared_gate={self.shared_gate is not None}"

    def shared_output(self, x: torch.Tensor) -> torch.Tensor:
        """The shared part alone on tokens x (T, d_model): ``g(x) * sum_s shared_s(x)``."""
        params = self.shared.expert_params()
        y = self.shared.apply_expert(params[0], x)
        for p in params[1:]:
            y = y + self.shared.apply_expert(p, x)
        if self.shared_gate is None:
            self.last_shared_gate = None
            return y
        g = torch.sigmoid(x @ self.shared_gate.to(x.dtype))
        self.last_shared_gate = g.detach()
        return g.unsqueeze(-1) * y

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        routed = self.moe(x, ids)  # checks x's type and width
        flat = x.reshape(-1, self.d_model)
        shared = self.shared_output(flat)
        if self.last_shared_gate is not None:
            self.last_shared_gate = self.last_shared_gate.reshape(x.shape[:-1])
        return routed + shared.reshape(x.shape)

    def active_params_per_token(self) -> int:
        """Expert parameters one token uses: every shared expert plus k routed ones (router and
        gate excluded)."""
        return sum(p.numel() for p in self.shared.parameters()) + self.moe.experts.active_params_per_token(self.k)


@dataclass(frozen=True)
class FineGrainedConfig:
    """A fine-grained version of an (E experts of width f, top-k) layer; see :func:`fine_grained`.

    ``num_experts``/``k``/``d_hidden`` describe the *routed* experts, ``num_shared``/``shared_hidden``
    the shared ones (0 / None: none). Counts are per layer, router excluded except in ``router_*``:
    ``total_params`` and ``active_params`` (expert parameters stored / used per token),
    ``active_macs`` (expert multiply-adds per token), ``router_params`` (= router multiply-adds per
    token, d_model * routed experts) and ``combinations`` (C(routed experts, k): the number of
    distinct expert sets a token can use).
    """

    d_model: int
    d_hidden: int
    num_experts: int
    k: int
    granularity: int
    num_shared: int
    shared_hidden: int | None
    expert: str
    total_params: int
    active_params: int
    active_macs: int
    router_params: int
    combinations: int

    def moe_kwargs(self) -> dict:
        """Keyword arguments of :class:`MoELayer` (routed experts only); valid when ``num_shared == 0``."""
        if self.num_shared:
            raise ValueError(f"FineGrainedConfig.moe_kwargs: this configuration has num_shared={self.num_shared} "
                             f"shared experts, which MoELayer cannot hold; use layer_kwargs() and SharedExpertMoE")
        return dict(d_model=self.d_model, d_hidden=self.d_hidden, num_experts=self.num_experts, k=self.k,
                    expert=self.expert)

    def layer_kwargs(self) -> dict:
        """Keyword arguments of :class:`SharedExpertMoE` (needs ``num_shared >= 1``)."""
        if not self.num_shared:
            raise ValueError("FineGrainedConfig.layer_kwargs: num_shared=0; use moe_kwargs() and MoELayer")
        return dict(d_model=self.d_model, d_hidden=self.d_hidden, num_experts=self.num_experts, k=self.k,
                    num_shared=self.num_shared, shared_hidden=self.shared_hidden, expert=self.expert)

    def build(self, **kwargs) -> nn.Module:
        """The layer: an :class:`MoELayer` (no shared experts) or a :class:`SharedExpertMoE`;
        ``kwargs`` go to it (``dispatch``, ``losses``, ``shared_gate``, ...)."""
        if self.num_shared:
            return SharedExpertMoE(**self.layer_kwargs(), **kwargs)
        return MoELayer(**self.moe_kwargs(), **kwargs)


def fine_grained(d_model: int, d_hidden: int, num_experts: int, k: int, granularity: int = 1, *,
                 num_shared: int = 0, expert: str = "mlp") -> FineGrainedConfig:
    """Split each of ``num_experts`` experts of width ``d_hidden`` into ``granularity`` = m experts of
    width ``d_hidden / m`` and route to m*k of them (DeepSeekMoE, arXiv 2401.06066, Section 3.1);
    then make ``num_shared`` = s of the fine experts shared (Section 3.2): ``m*E - s`` routed
    experts, ``m*k - s`` chosen per token, s shared experts of width ``d_hidden / m``.

    Multiply-adds per token in experts are the same for every m and s (``k * expert_macs(d, f)``).
    Stored parameters are the same up to the output biases of the mlp kind (each fine expert has
    its own, ``(m - 1) * E * d_model`` more at granularity m); the router grows m-fold.
    Raises ValueError when ``d_hidden`` is not divisible by m or s leaves no routed choice.
    """
    where = "fine_grained"
    check_int("d_model", d_model, low=1, where=where)
    check_int("d_hidden", d_hidden, low=1, where=where)
    check_int("num_experts", num_experts, low=1, where=where)
    check_int("k", k, low=1, high=num_experts, where=where)
    m = check_int("granularity", granularity, low=1, where=where)
    if expert not in _KINDS:
        raise ValueError(f"{where}: expert={expert!r} is unknown; choose one of {list(_KINDS)}")
    if d_hidden % m:
        raise ValueError(f"{where}: d_hidden={d_hidden} is not divisible by granularity={m}; allowed: a divisor "
                         f"of d_hidden, so every fine expert has width d_hidden / granularity")
    check_int("num_shared", num_shared, low=0, high=m * k - 1, where=where)
    h = d_hidden // m
    routed, k_routed = m * num_experts - num_shared, m * k - num_shared
    one_p, one_mac = expert_params(d_model, h, expert), expert_macs(d_model, h, expert)
    return FineGrainedConfig(
        d_model=d_model, d_hidden=h, num_experts=routed, k=k_routed, granularity=m, num_shared=num_shared,
        shared_hidden=h if num_shared else None, expert=expert,
        total_params=(routed + num_shared) * one_p, active_params=(k_routed + num_shared) * one_p,
        active_macs=(k_routed + num_shared) * one_mac, router_params=d_model * routed,
        combinations=math.comb(routed, k_routed),
    )

"""Sparse upcycling: turn a trained dense feed-forward block into a Mixture of Experts.

Komatsuzaki et al., "Sparse Upcycling" (arXiv 2212.05055): every expert of the new MoE layer
starts as a copy of the dense block's feed-forward weights and a new router is added. If the
combine weights of the experts a token is sent to sum to 1, then at initialisation

    moe(x) = sum_e w_e(x) * ffn_e(x) = (sum_e w_e(x)) * ffn(x) = ffn(x),

so the upcycled model computes exactly what the dense one did (up to the rounding of the weights'
sum, a few ulp) and continued training starts from the dense model's loss, not from scratch.

:func:`upcycle` builds one :class:`~tutorial_moe.moe.MoELayer` from a dense block;
:func:`upcycle_model` replaces every selected block of a model in place; :func:`max_abs_diff`
measures how exact the copy is on given inputs.

What counts as a dense block (``ffn``):

* ``nn.Sequential(nn.Linear(d, h), activation, nn.Linear(h, d))`` with activation one of
  ``nn.GELU()`` (exact form, not ``approximate="tanh"``), ``nn.ReLU()``, ``nn.SiLU()``, ``nn.Tanh()``;
* a pair ``(fc_in, fc_out)`` of ``nn.Linear`` (the activation is then the ``activation`` argument);
* any module with two ``nn.Linear`` attributes ``fc1``/``fc2`` or ``fc_in``/``fc_out`` whose forward
  is ``fc2(act(fc1(x)))`` (e.g. the chapter-11 language model's feed-forward block); the library
  cannot read the activation from such a module, so ``activation`` says which (default "gelu").

A Linear without bias upcycles into zero expert biases (the same function).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ._validate import check_choice, check_int, check_positive_float
from .experts import ACTIVATIONS
from .moe import MoELayer
from .routing import TopKRouter

__all__ = ["dense_ffn_parts", "upcycle", "upcycle_model", "max_abs_diff"]

_ACTIVATION_MODULES = {nn.GELU: "gelu", nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh"}
_ATTR_PAIRS = (("fc1", "fc2"), ("fc_in", "fc_out"))


def dense_ffn_parts(ffn, activation: str | None = None, *, where: str = "upcycle") -> tuple[nn.Linear, str, nn.Linear]:
    """``(fc_in, activation name, fc_out)`` of a dense feed-forward block (see the module docstring).

    ``activation`` (a name in ``tutorial_moe.experts.ACTIVATIONS``) is required to agree with the
    activation module of an ``nn.Sequential``, and is used as given for the other two forms.
    """
    if activation is not None:
        check_choice("activation", activation, ACTIVATIONS, where=where)
    if isinstance(ffn, nn.Sequential):
        layers = list(ffn)
        if len(layers) != 3 or not isinstance(layers[0], nn.Linear) or not isinstance(layers[2], nn.Linear):
            raise ValueError(f"{where}: ffn must be nn.Sequential(Linear, activation, Linear), got "
                             f"{[type(m).__name__ for m in layers]}")
        act_mod = layers[1]
        name = _ACTIVATION_MODULES.get(type(act_mod))
        if name is None:
            raise ValueError(f"{where}: ffn's activation {type(act_mod).__name__} is not supported; allowed: "
                             f"{sorted(c.__name__ for c in _ACTIVATION_MODULES)}")
        if isinstance(act_mod, nn.GELU) and act_mod.approximate != "none":
            raise ValueError(f"{where}: ffn uses nn.GELU(approximate={act_mod.approximate!r}); the experts compute "
                             f"the exact GELU, so only approximate='none' upcycles exactly")
        if activation is not None and activation != name:
            raise ValueError(f"{where}: activation={activation!r} contradicts the ffn's {type(act_mod).__name__}")
        fc_in, fc_out = layers[0], layers[2]
    elif isinstance(ffn, (tuple, list)):
        if len(ffn) != 2 or not all(isinstance(m, nn.Linear) for m in ffn):
            raise TypeError(f"{where}: ffn given as a pair must be (nn.Linear, nn.Linear), got "
                            f"{[type(m).__name__ for m in ffn]}")
        fc_in, fc_out = ffn
        name = activation or "gelu"
    elif isinstance(ffn, nn.Module):
        for a, b in _ATTR_PAIRS:
            if isinstance(getattr(ffn, a, None), nn.Linear) and isinstance(getattr(ffn, b, None), nn.Linear):
                fc_in, fc_out = getattr(ffn, a), getattr(ffn, b)
                break
        else:
            raise TypeError(f"{where}: ffn {type(ffn).__name__} has no nn.Linear pair named "
                            f"{' or '.join('/'.join(p) for p in _ATTR_PAIRS)}; pass (fc_in, fc_out) instead")
        name = activation or "gelu"
    else:
        raise TypeError(f"{where}: ffn must be an nn.Sequential, a (Linear, Linear) pair or a module with "
                        f"fc1/fc2, got {type(ffn).__name__}")
    if fc_in.out_features != fc_out.in_features or fc_out.out_features != fc_in.in_features:
        raise ValueError(f"{where}: ffn's Linear layers must map d -> h -> d, got {fc_in.in_features} -> "
                         f"{fc_in.out_features} and {fc_out.in_features} -> {fc_out.out_features}")
    return fc_in, name, fc_out


def upcycle(ffn, num_experts: int, k: int, *, activation: str | None = None, router_std: float = 0.02,
            jitter: float = 0.0, dispatch: str = "auto", capacity_factor: float | None = None,
            losses: dict | None = None, bias_update_rate: float = 0.0, generator: torch.Generator | None = None
            ) -> MoELayer:
    """An :class:`MoELayer` of ``num_experts`` copies of the dense block ``ffn``, routing to ``k``.

    Args:
        ffn: the dense block (see the module docstring for the accepted forms); not modified.
        num_experts, k: E >= 1 and 1 <= k <= E.
        activation: the block's activation name when it cannot be read from ``ffn``.
        router_std: the router's weights start as N(0, router_std^2); 0 gives a zero router
            (every probability 1/E, ties broken towards low expert ids, so every token then goes to
            experts 0..k-1 until the router learns). The default is the package's router init.
        jitter: > 0 multiplies every copied weight by (1 + jitter * N(0, 1)), independently per
            expert, to break the experts' symmetry; exactness then no longer holds. Default 0.
        dispatch, capacity_factor, losses, bias_update_rate: passed on to the layer and its
            :class:`~tutorial_moe.routing.TopKRouter`. A capacity factor can drop tokens, whose
            output is then 0 instead of ffn(x): exactness holds only when nothing is dropped.
        generator: the random source for the router and jitter (None: torch's global one).

    The router always renormalises the k chosen weights to sum to 1 (``normalize=True``), even at
    k = 1: that is what makes the copy exact. At k = 1 the weight is then always 1 and the task loss
    gives the router no gradient (chapter 10's dead gate); use k >= 2 to train the router from the
    task, as the paper's decoder does (top-2).

    The layer has the block's dtype and device.
    """
    where = "upcycle"
    fc_in, act, fc_out = dense_ffn_parts(ffn, activation, where=where)
    check_int("num_experts", num_experts, low=1, where=where)
    check_int("k", k, low=1, high=num_experts, where=where)
    router_std = check_positive_float("router_std", router_std, where=where, allow_zero=True)
    jitter = check_positive_float("jitter", jitter, where=where, allow_zero=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    d, h = fc_in.in_features, fc_in.out_features
    ref = fc_in.weight
    router = TopKRouter(d, num_experts, k, capacity_factor=capacity_factor, normalize=True,
                        bias_update_rate=bias_update_rate)
    layer = MoELayer(d, h, num_experts, k, expert="mlp", dispatch=dispatch, router=router, losses=losses)
    if act != layer.experts.activation:
        # ExpertBank takes the activation at construction; MoELayer builds it with the default.
        layer.experts.activation = check_choice("activation", act, ACTIVATIONS, where=where)
    layer = layer.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        gate = layer.router.gate.weight
        if router_std > 0:
            gate.copy_(torch.randn(gate.shape, generator=generator, dtype=torch.float64).to(gate) * router_std)
        else:
            gate.zero_()
        bank = layer.experts
        b_in = fc_in.bias if fc_in.bias is not None else torch.zeros(h, dtype=ref.dtype, device=ref.device)
        b_out = fc_out.bias if fc_out.bias is not None else torch.zeros(d, dtype=ref.dtype, device=ref.device)
        # ExpertBank stores (in, out) matrices, nn.Linear (out, in): the copies are transposes.
        for dst, src in ((bank.w1, fc_in.weight.t()), (bank.b1, b_in), (bank.w2, fc_out.weight.t()), (bank.b2, b_out)):
            dst.copy_(src.unsqueeze(0).expand_as(dst))
            if jitter > 0:
                noise = torch.randn(dst.shape, generator=generator, dtype=torch.float64).to(dst)
                dst.mul_(1 + jitter * noise)
    return layer


def upcycle_model(model: nn.Module, num_experts: int, k: int, select: Callable[[str, nn.Module], bool], **kwargs
                  ) -> list[str]:
    """Replace, in place, every submodule of ``model`` for which ``select(name, module)`` is true by
    ``upcycle(module, num_experts, k, **kwargs)``; returns the replaced names, in order.

    ``select`` sees the qualified names of ``model.named_modules()`` (e.g. ``"blocks.0.ffn"``);
    a selected module's own submodules are not visited. The replacement is called the way the
    dense block was: ``MoELayer.forward(x, ids=None)`` accepts an optional second argument, so a
    block that calls ``self.ffn(h, ids)`` keeps working. Raises ValueError when nothing is selected.
    """
    where = "upcycle_model"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    if not callable(select):
        raise TypeError(f"{where}: select must be a callable (name, module) -> bool, got {type(select).__name__}")
    chosen, skip = [], None
    for name, module in model.named_modules():
        if not name or (skip is not None and name.startswith(skip + ".")):
            continue
        if select(name, module):
            chosen.append((name, module))
            skip = name
    if not chosen:
        raise ValueError(f"{where}: select matched no submodule of {type(model).__name__}; nothing to upcycle")
    # Build every replacement before swapping any, so a bad block leaves the model untouched.
    built = [(name, upcycle(module, num_experts, k, **kwargs)) for name, module in chosen]
    for name, layer in built:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, (nn.Sequential, nn.ModuleList)) and attr.isdigit():
            parent[int(attr)] = layer
        else:
            setattr(parent, attr, layer)
    return [name for name, _ in built]


@torch.no_grad()
def max_abs_diff(a: nn.Module | Callable, b: nn.Module | Callable, x: torch.Tensor) -> float:
    """max |a(x) - b(x)| over every entry (both evaluated without gradient), e.g. a dense block and
    its upcycled layer: the upcycling check of chapter 14."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"max_abs_diff: x must be a torch.Tensor, got {type(x).__name__}")
    ya, yb = a(x), b(x)
    if ya.shape != yb.shape:
        raise ValueError(f"max_abs_diff: outputs differ in shape, {tuple(ya.shape)} vs {tuple(yb.shape)}")
    return float((ya - yb).abs().max()) if ya.numel() else 0.0

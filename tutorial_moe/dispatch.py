"""Dispatch: moving tokens to the experts that routing chose, and their outputs back.

All modes compute  out[t] = sum_e weights[t, e] * expert_e(x[t])  over the routed pairs, and agree
with ``dense`` within float rounding, in outputs and gradients (tests/test_dispatch.py).

* ``dense``  - every expert on every token, then a weighted sum: the obvious oracle (seed 003's
  Keras layer does this); costs E/k times the useful work.
* ``loop``   - for each expert, gather its tokens, run it, scatter-add back.
* ``sorted`` - sort the (token, expert) pairs by expert once, run each expert on its contiguous
  slice, one scatter-add at the end.
* ``grouped`` - like ``sorted`` but one grouped matmul per layer (``torch._grouped_mm``) instead of
  E small ones, where this torch build supports it.
"""
from __future__ import annotations

import functools

import torch

from .experts import ACTIVATIONS, ExpertBank
from .routing import Routing

__all__ = ["DISPATCH_MODES", "dispatch", "dispatch_dense", "dispatch_loop", "dispatch_sorted", "dispatch_grouped",
           "grouped_mm_available", "choose_dispatch"]

DISPATCH_MODES = ("dense", "loop", "sorted", "grouped", "auto")


def dispatch_dense(bank: ExpertBank, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    y_all = bank.forward_all(x)  # (E, T, d)
    return torch.einsum("te,etd->td", routing.weights.to(y_all.dtype), y_all)


def dispatch_loop(bank: ExpertBank, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    out = torch.zeros_like(x)
    for e, params in enumerate(bank.expert_params()):
        idx = routing.mask[:, e].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        y = bank.apply_expert(params, x.index_select(0, idx))
        out.index_add_(0, idx, y * routing.weights.index_select(0, idx)[:, e : e + 1].to(y.dtype))
    return out


def _sorted_pairs(routing: Routing):
    """Routed pairs sorted by expert: token ids, their weights, and tokens per expert."""
    t_idx, e_idx = routing.assignments()
    w = routing.weights[t_idx, e_idx]
    counts = routing.mask.sum(0)
    return t_idx, e_idx, w, counts


def dispatch_sorted(bank: ExpertBank, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    t_idx, _, w, counts = _sorted_pairs(routing)
    xs = x.index_select(0, t_idx)
    pieces = []
    for params, chunk in zip(bank.expert_params(), xs.split(counts.tolist())):
        if chunk.shape[0]:
            pieces.append(bank.apply_expert(params, chunk))
    y = torch.cat(pieces) if pieces else xs
    return torch.zeros_like(x).index_add_(0, t_idx, y * w.unsqueeze(1).to(y.dtype))


@functools.lru_cache(maxsize=None)
def grouped_mm_available(device_type: str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``torch._grouped_mm`` runs (forward and backward) here for this device and dtype."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    try:
        a = torch.randn(8, 4, device=device_type, dtype=dtype, requires_grad=True)
        b = torch.randn(2, 4, 4, device=device_type, dtype=dtype, requires_grad=True)
        offs = torch.tensor([3, 8], device=device_type, dtype=torch.int32)
        out = fn(a, b, offs=offs)
        out.backward(torch.ones_like(out))
        ref = torch.cat([a[:3] @ b[0], a[3:] @ b[1]])
        return bool(torch.allclose(out, ref, atol=1e-3, rtol=1e-3))
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward
    rejects e.g. the stride-0 gradient of ``out.sum()``)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(torch._grouped_mm(a.contiguous(), b.contiguous(), offs=offs))


def dispatch_grouped(bank: ExpertBank, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    t_idx, e_idx, w, counts = _sorted_pairs(routing)
    xs = x.index_select(0, t_idx)
    offs = counts.cumsum(0).to(torch.int32)
    if bank.kind == "mlp":
        h = ACTIVATIONS[bank.activation](_gmm(xs, bank.w1, offs) + bank.b1.index_select(0, e_idx))
        y = _gmm(h, bank.w2, offs) + bank.b2.index_select(0, e_idx)
    else:
        g = _gmm(xs, bank.w_gate, offs)
        u = _gmm(xs, bank.w_up, offs)
        y = _gmm(torch.nn.functional.silu(g) * u, bank.w_down, offs)
    return torch.zeros_like(x).index_add_(0, t_idx, y * w.unsqueeze(1).to(y.dtype))


_FUNCS = {"dense": dispatch_dense, "loop": dispatch_loop, "sorted": dispatch_sorted, "grouped": dispatch_grouped}


def choose_dispatch(bank: ExpertBank, x: torch.Tensor) -> str:
    """The mode ``auto`` uses: grouped matmul where it runs, else sorted slices."""
    if grouped_mm_available(x.device.type, x.dtype):
        return "grouped"
    return "sorted"


def dispatch(mode: str, bank: ExpertBank, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    if mode == "auto":
        mode = choose_dispatch(bank, x)
    if mode == "grouped" and not grouped_mm_available(x.device.type, x.dtype):
        raise ValueError(
            f"dispatch: mode='grouped' needs torch._grouped_mm for {x.device.type}/{x.dtype}, which this torch "
            f"({torch.__version__}) lacks; use 'sorted' or 'auto'"
        )
    return _FUNCS[mode](bank, x, routing)

"""Dispatch: moving tokens to the experts that routing chose, and their outputs back.

All modes compute  out[t] = sum_e weights[t, e] * expert_e(x[t])  over the routed pairs, and agree
with ``dense`` within float rounding, in outputs and gradients (tests/test_dispatch.py).

* ``dense``  - every expert on every token, then a weighted sum: the obvious oracle (seed 003's
  Keras layer does this); costs E/k times the useful work.
* ``loop``   - for each expert, gather its tokens, run it, scatter-add back.
* ``sorted`` - sort the (token, expert) pairs by expert once, run each expert on its contiguous
  slice, one scatter-add at the end.
* ``grouped`` - like ``sorted`` but one grouped matmul per weight (``torch._grouped_mm``) instead of
  E small ones, where this torch build supports it.
* ``auto``   - ``grouped`` where torch._grouped_mm runs for this device, dtype and widths, else
  ``sorted`` (see :func:`choose_dispatch`).

Under ``torch.autocast`` every mode computes the experts in the autocast dtype (bf16 on CPU,
bf16/fp16 on CUDA) and returns that dtype, as ``dense`` does through autocast's own casts; the
fused modes cast the tokens and weights themselves (autocast does not reach into a custom
autograd node), so all modes agree within the autocast dtype's rounding.
"""
from __future__ import annotations

import functools

import torch

from .experts import ACTIVATIONS, ExpertBank
from .routing import Routing

__all__ = ["DISPATCH_MODES", "dispatch", "dispatch_dense", "dispatch_loop", "dispatch_sorted", "dispatch_grouped",
           "expert_slices", "combine_pairs", "sorted_pairs", "run_sorted_experts", "autocast_dtype",
           "grouped_mm_available", "choose_dispatch"]

DISPATCH_MODES = ("dense", "loop", "sorted", "grouped", "auto")


def dispatch_dense(bank: ExpertBank, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    y_all = bank.forward_all(x)  # (E, T, d)
    return torch.einsum("te,etd->td", routing.weights.to(y_all.dtype), y_all)


def _bank_weights(bank: ExpertBank, dtype: torch.dtype | None = None) -> dict:
    """The bank's stacked weights by name, cast (differentiably) to ``dtype`` when given."""
    names = ("w1", "b1", "w2", "b2") if bank.kind == "mlp" else ("w_gate", "w_up", "w_down")
    out = {}
    for n in names:
        w = getattr(bank, n)
        out[n] = w if dtype is None or w.dtype == dtype else w.to(dtype)
    return out


def _expert_params(bank: ExpertBank, weights: dict) -> list[tuple[torch.Tensor, ...]]:
    return list(zip(*(w.unbind(0) for w in weights.values())))


def dispatch_loop(bank: ExpertBank, x: torch.Tensor, routing: Routing, weights: dict | None = None) -> torch.Tensor:
    weights = _bank_weights(bank) if weights is None else weights
    out = torch.zeros_like(x)
    for e, params in enumerate(_expert_params(bank, weights)):
        idx = routing.mask[:, e].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        y = bank.apply_expert(params, x.index_select(0, idx))
        out.index_add_(0, idx, y * routing.weights.index_select(0, idx)[:, e : e + 1].to(y.dtype))
    return out


def sorted_pairs(routing: Routing):
    """Routed (token, expert) pairs sorted by expert (tokens in order within an expert).

    Returns token ids (N,), expert ids (N,), combine weights (N,) and tokens per expert (E,).
    Top-k routers give ``indices`` (T, k): a stable argsort of k*T expert ids is much cheaper
    than scanning the (T, E) mask; other routers fall back to the mask.
    """
    E = routing.num_experts
    idx = routing.indices
    if idx is not None and idx.shape[1] < E:
        k = idx.shape[1]
        flat_e = idx.reshape(-1)
        w = routing.weights.gather(1, idx).reshape(-1)
        pos = torch.arange(flat_e.numel(), device=flat_e.device)
        keep = routing.mask.gather(1, idx).reshape(-1)
        if not bool(keep.all()):
            sel = keep.nonzero().squeeze(1)
            flat_e, w, pos = flat_e.index_select(0, sel), w.index_select(0, sel), sel
        order = torch.argsort(flat_e, stable=True)
        t_idx = pos.index_select(0, order).div(k, rounding_mode="floor")
        e_idx = flat_e.index_select(0, order)
        return t_idx, e_idx, w.index_select(0, order), torch.bincount(flat_e, minlength=E)
    t_idx, e_idx = routing.assignments()
    return t_idx, e_idx, routing.weights[t_idx, e_idx], routing.mask.sum(0)


def expert_slices(counts) -> list[tuple[int, slice]]:
    """``(expert, row slice)`` of every expert with tokens, for rows sorted by expert with ``counts``
    rows each (a sequence of ints)."""
    out, start = [], 0
    for e, c in enumerate(counts):
        if c:
            out.append((e, slice(start, start + c)))
            start += c
    return out


class _CombinePairs(torch.autograd.Function):
    """out[t] = sum over pairs p of token t of w[p] * y[p], as one autograd node.

    Autograd would record a multiply and a scatter-add and, backward, a gather, two multiplies and
    a row sum; here the combine-weight gradient is one batched dot (``bmm`` of 1 x d by d x 1),
    which measured ~1.5x faster than ``(g * y).sum(1)`` for 16k rows.
    """

    @staticmethod
    def forward(ctx, y, w, t_idx, num_tokens):
        ctx.save_for_backward(y, w, t_idx)
        return y.new_zeros(num_tokens, y.shape[1]).index_add_(0, t_idx, y * w.unsqueeze(1))

    @staticmethod
    def backward(ctx, g):
        y, w, t_idx = ctx.saved_tensors
        gsel = g.index_select(0, t_idx)
        gy = gsel * w.unsqueeze(1) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(gsel.unsqueeze(1), y.unsqueeze(2)).view(-1) if ctx.needs_input_grad[1] else None
        return gy, gw, None, None


def combine_pairs(y: torch.Tensor, w: torch.Tensor, t_idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(num_tokens, d) weighted sum of the pair outputs ``y`` (N, d) into their tokens ``t_idx``."""
    return _CombinePairs.apply(y, w, t_idx, num_tokens)


class _SortedMLP(torch.autograd.Function):
    """All E experts of an "mlp" bank over expert-sorted tokens, as ONE autograd node.

    Forward runs each expert on its contiguous slice with ``addmm(..., out=slice)``; backward
    writes each expert's weight gradients into one preallocated (E, ...) buffer. Compared with
    letting autograd record 4-5 nodes per expert, this removes E-fold graph overhead and the
    E^2 cost of per-expert ``w[e]`` gradients - what matters with many small experts.
    """

    @staticmethod
    def forward(ctx, xs, counts, w1, b1, w2, b2):
        n, h, d = xs.shape[0], w1.shape[2], w2.shape[2]
        pre = xs.new_empty(n, h)
        act = xs.new_empty(n, h)
        y = xs.new_empty(n, d)
        for e, sl in expert_slices(counts):
            torch.addmm(b1[e], xs[sl], w1[e], out=pre[sl])
            act[sl] = torch.nn.functional.gelu(pre[sl])
            torch.addmm(b2[e], act[sl], w2[e], out=y[sl])
        ctx.counts = counts
        ctx.save_for_backward(xs, pre, act, w1, w2)
        return y

    @staticmethod
    def backward(ctx, gy):
        xs, pre, act, w1, w2 = ctx.saved_tensors
        gy = gy.contiguous()
        gx = torch.empty_like(xs)
        gw1, gb1 = torch.zeros_like(w1), w1.new_zeros(w1.shape[0], w1.shape[2])
        gw2, gb2 = torch.zeros_like(w2), w2.new_zeros(w2.shape[0], w2.shape[2])
        for e, sl in expert_slices(ctx.counts):
            g = gy[sl]
            torch.mm(act[sl].t(), g, out=gw2[e])
            torch.sum(g, 0, out=gb2[e])
            gpre = torch.ops.aten.gelu_backward(g @ w2[e].t(), pre[sl])
            torch.mm(xs[sl].t(), gpre, out=gw1[e])
            torch.sum(gpre, 0, out=gb1[e])
            torch.mm(gpre, w1[e].t(), out=gx[sl])
        return gx, None, gw1, gb1, gw2, gb2


class _SortedSwiGLU(torch.autograd.Function):
    """The SwiGLU bank over expert-sorted tokens as one autograd node (see :class:`_SortedMLP`)."""

    @staticmethod
    def forward(ctx, xs, counts, wg, wu, wd):
        n, h, d = xs.shape[0], wg.shape[2], wd.shape[2]
        g, u, a = xs.new_empty(n, h), xs.new_empty(n, h), xs.new_empty(n, h)
        y = xs.new_empty(n, d)
        for e, sl in expert_slices(counts):
            torch.mm(xs[sl], wg[e], out=g[sl])
            torch.mm(xs[sl], wu[e], out=u[sl])
            torch.mul(torch.nn.functional.silu(g[sl]), u[sl], out=a[sl])
            torch.mm(a[sl], wd[e], out=y[sl])
        ctx.counts = counts
        ctx.save_for_backward(xs, g, u, a, wg, wu, wd)
        return y

    @staticmethod
    def backward(ctx, gy):
        xs, g, u, a, wg, wu, wd = ctx.saved_tensors
        gy = gy.contiguous()
        gx = torch.empty_like(xs)
        gwg, gwu, gwd = torch.zeros_like(wg), torch.zeros_like(wu), torch.zeros_like(wd)
        for e, sl in expert_slices(ctx.counts):
            gye = gy[sl]
            torch.mm(a[sl].t(), gye, out=gwd[e])
            ga = gye @ wd[e].t()
            gu = ga * torch.nn.functional.silu(g[sl])
            gg = torch.ops.aten.silu_backward(ga * u[sl], g[sl])
            torch.mm(xs[sl].t(), gg, out=gwg[e])
            torch.mm(xs[sl].t(), gu, out=gwu[e])
            torch.mm(gg, wg[e].t(), out=gx[sl])
            gx[sl].addmm_(gu, wu[e].t())
        return gx, None, gwg, gwu, gwd


def _sorted_experts(bank: ExpertBank, xs: torch.Tensor, counts: tuple, weights: dict) -> torch.Tensor:
    if bank.kind == "mlp" and bank.activation == "gelu":
        return _SortedMLP.apply(xs, counts, weights["w1"], weights["b1"], weights["w2"], weights["b2"])
    if bank.kind == "swiglu":
        return _SortedSwiGLU.apply(xs, counts, weights["w_gate"], weights["w_up"], weights["w_down"])
    pieces = [bank.apply_expert(p, chunk) for p, chunk in zip(_expert_params(bank, weights), xs.split(list(counts)))
              if chunk.shape[0]]
    return torch.cat(pieces) if pieces else xs


def dispatch_sorted(bank: ExpertBank, x: torch.Tensor, routing: Routing, weights: dict | None = None) -> torch.Tensor:
    weights = _bank_weights(bank) if weights is None else weights
    t_idx, _, w, counts = sorted_pairs(routing)
    xs = x.index_select(0, t_idx)  # index_select is several times faster than x[t_idx]
    y = _sorted_experts(bank, xs, tuple(counts.tolist()), weights)
    return combine_pairs(y, w.to(y.dtype), t_idx, x.shape[0])


@functools.lru_cache(maxsize=None)
def grouped_mm_available(device_type: str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``torch._grouped_mm`` runs (forward and backward) here for this device and dtype.

    The probe runs with autograd on and autocast off, whatever the caller's context (a first call
    under ``no_grad`` or ``autocast`` must not cache a wrong answer for the whole process)."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
            # 16 columns: 16-byte row strides in every dtype down to 1 byte per element.
            a = torch.randn(8, 16, device=device_type, dtype=dtype, requires_grad=True)
            b = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
            offs = torch.tensor([3, 8], device=device_type, dtype=torch.int32)
            out = fn(a, b, offs=offs)
            out.backward(torch.ones_like(out))
            ref = torch.cat([a[:3] @ b[0], a[3:] @ b[1]])
            tol = 1e-3 if dtype in (torch.float32, torch.float64) else 1e-1
            return bool(torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol)) and a.grad is not None
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


class _AddExpertBias(torch.autograd.Function):
    """``h[rows of expert e] += bias[e]`` in place on a fresh grouped-matmul output.

    The obvious ``h + bias.index_select(0, expert_of_row)`` materialises an (N, width) bias tensor
    and reads it back (at E=8, d_hidden=1024 that is 64 MB each way per layer). Here forward adds
    E broadcast rows in place; backward is one ``index_add_`` of the rows into (E, width), which
    measured faster than E per-expert sums or ``segment_reduce``. Like :class:`_ContiguousGrad`,
    the gradient handed on is contiguous.
    """

    @staticmethod
    def forward(ctx, h, bias, counts, e_idx):
        for e, sl in expert_slices(counts):
            h[sl].add_(bias[e])
        ctx.mark_dirty(h)
        ctx.save_for_backward(e_idx)
        ctx.num_experts = bias.shape[0]
        return h

    @staticmethod
    def backward(ctx, g):
        (e_idx,) = ctx.saved_tensors
        g = g.contiguous()
        return g, g.new_zeros(ctx.num_experts, g.shape[1]).index_add_(0, e_idx, g), None, None


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, bias: torch.Tensor | None = None,
         counts: tuple | None = None, e_idx: torch.Tensor | None = None) -> torch.Tensor:
    out = torch._grouped_mm(a.contiguous(), b.contiguous(), offs=offs)
    if bias is None:
        return _ContiguousGrad.apply(out)
    return _AddExpertBias.apply(out, bias, counts, e_idx)


def _grouped_experts(bank: ExpertBank, xs: torch.Tensor, counts: torch.Tensor, e_idx: torch.Tensor,
                     weights: dict) -> torch.Tensor:
    offs = counts.cumsum(0).to(torch.int32)
    if bank.kind == "mlp":
        cts = tuple(counts.tolist())
        h = ACTIVATIONS[bank.activation](_gmm(xs, weights["w1"], offs, weights["b1"], cts, e_idx))
        return _gmm(h, weights["w2"], offs, weights["b2"], cts, e_idx)
    g = _gmm(xs, weights["w_gate"], offs)
    u = _gmm(xs, weights["w_up"], offs)
    return _gmm(torch.nn.functional.silu(g) * u, weights["w_down"], offs)


def dispatch_grouped(bank: ExpertBank, x: torch.Tensor, routing: Routing, weights: dict | None = None) -> torch.Tensor:
    weights = _bank_weights(bank) if weights is None else weights
    t_idx, e_idx, w, counts = sorted_pairs(routing)
    xs = x.index_select(0, t_idx)
    y = _grouped_experts(bank, xs, counts, e_idx, weights)
    return combine_pairs(y, w.to(y.dtype), t_idx, x.shape[0])


def run_sorted_experts(bank: ExpertBank, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Every expert of ``bank`` on its block of expert-sorted rows ``xs`` (``counts[e]`` rows for
    expert e, in expert order) through the fused kernels: one grouped matmul per weight where
    :func:`choose_dispatch` would pick it, else the one-node sorted loop. Used by the
    expert-parallel layer for the rows that arrived at its local experts; follows autocast."""
    dtype = autocast_dtype(xs)
    with _autocast_off(xs, dtype):
        xs_c = xs if dtype is None else xs.to(dtype)
        weights = _bank_weights(bank, dtype)
        compute = xs_c.dtype
        if grouped_mm_available(xs.device.type, compute) and grouped_shapes_ok(bank, compute) and xs.shape[0] > 0:
            e_idx = torch.repeat_interleave(torch.arange(len(counts), device=xs.device), counts)
            return _grouped_experts(bank, xs_c, counts, e_idx, weights)
        return _sorted_experts(bank, xs_c, tuple(counts.tolist()), weights)


_FUNCS = {"dense": dispatch_dense, "loop": dispatch_loop, "sorted": dispatch_sorted, "grouped": dispatch_grouped}


def grouped_shapes_ok(bank: ExpertBank, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` accepts this bank: it needs every row stride (d_model and
    d_hidden elements) to be a multiple of 16 bytes, e.g. multiples of 4 in fp32."""
    per_16_bytes = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return bank.d_model % per_16_bytes == 0 and bank.d_hidden % per_16_bytes == 0


def choose_dispatch(bank: ExpertBank, x: torch.Tensor, dtype: torch.dtype | None = None) -> str:
    """The mode ``auto`` uses for this bank, device and dtype: ``grouped`` wherever this torch build
    runs ``torch._grouped_mm`` for the device and dtype and the widths suit it, else ``sorted``.

    Measured in benchmarks/bench_dispatch.py (CPU, 2 threads, fp32, forward + backward): grouped
    beat the fused sorted path at every shape tried, from 1.03x faster (8 experts of
    256x1024) to 2.3x (32 experts of 32x32), because its per-expert loop runs in C++ rather
    than Python. On CUDA one grouped kernel per weight replaces E small launches.
    """
    dtype = x.dtype if dtype is None else dtype
    if grouped_mm_available(x.device.type, dtype) and grouped_shapes_ok(bank, dtype):
        return "grouped"
    return "sorted"


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would compute matmuls of ``x`` in, or None when autocast is off for
    ``x``'s device (or ``x`` is not a float tensor autocast would cast)."""
    dev = x.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev) or x.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(dev)


def _autocast_off(x: torch.Tensor, dtype):
    import contextlib
    return torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext()


def dispatch(mode: str, bank: ExpertBank, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    dtype = autocast_dtype(x)
    compute = x.dtype if dtype is None else dtype
    if mode == "auto":
        mode = choose_dispatch(bank, x, compute)
    if mode == "grouped" and not grouped_mm_available(x.device.type, compute):
        raise ValueError(
            f"dispatch: mode='grouped' needs torch._grouped_mm for {x.device.type}/{compute}, which this torch "
            f"({torch.__version__}) lacks; use 'sorted' or 'auto'"
        )
    if mode == "grouped" and not grouped_shapes_ok(bank, compute):
        raise ValueError(
            f"dispatch: mode='grouped' needs d_model and d_hidden to be multiples of 16 bytes for {compute}; "
            f"got d_model={bank.d_model}, d_hidden={bank.d_hidden}; use 'sorted' or 'auto'"
        )
    if mode == "dense" or dtype is None:
        return _FUNCS[mode](bank, x, routing)
    # Autocast does not reach inside the fused autograd nodes (and index_add_ refuses mixed
    # dtypes): cast tokens and weights to the autocast dtype here, differentiably, and run the
    # mode with autocast off, so every mode computes in the dtype dense gets from autocast.
    with torch.autocast(x.device.type, enabled=False):
        return _FUNCS[mode](bank, x.to(dtype), routing, _bank_weights(bank, dtype))

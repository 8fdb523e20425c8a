"""Expert parallelism: experts sharded over processes, tokens carried to them by all-to-all.

With ``W`` ranks (processes, one per GPU in practice) and ``E`` experts, rank ``r`` owns experts
``r*E/W .. (r+1)*E/W - 1``. Everything else (the router, attention, embeddings) is replicated.
One forward of :class:`ExpertParallelMoELayer` on a rank's local tokens:

1. route locally (the same router weights on every rank);
2. exchange per-expert token counts, so every rank knows how many rows it will receive;
3. ``all_to_all_single`` with uneven split sizes sends every routed (token, expert) pair to the
   rank that owns the expert ("dispatch");
4. run the local experts on what arrived;
5. ``all_to_all_single`` back to where each pair came from ("combine");
6. add up the expert outputs with the routing weights.

Autograd flows through the collectives (``all_to_all_single_autograd``): the backward of a
dispatch is a combine-shaped all-to-all of gradients and vice versa, so a training step moves
the token payload four times. :func:`all_to_all_bytes` predicts that volume;
:class:`CommCounter` counts it from the layer's split sizes, and :class:`CollectiveTap`
measures it independently, from the tensors actually handed to ``dist.all_to_all_single``
(whatever code called it, backward passes and count exchanges included), with the time
spent inside the collectives.

This is an existing engine (``torch.distributed``: gloo on CPU, nccl on CUDA) put to work, not
a home-made transport. :func:`run_ranks` forks ranks on one machine (what the tests and the book
use); ``torchrun`` starts the same module on several GPUs or nodes::

    torchrun --standalone --nproc-per-node 4 -m tutorial_moe.parallel --demo
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ._validate import check_choice, check_int, check_positive_float
from .dispatch import run_sorted_experts
from .experts import ExpertBank
from .losses import check_loss_weights, check_losses_for_router
from .moe import AuxLossMixin, MoELayer, default_losses
from .routing import Routing, layer_router

__all__ = [
    "default_backend", "init_distributed", "expert_shard", "ExpertParallelMoELayer", "AllToAll", "CommCounter",
    "CollectiveTap", "overlap_model",
    "all_to_all_bytes", "routed_counts", "draw_all_to_all", "free_port", "run_ranks", "equivalence_report", "run_demo", "main",
]

PHASES = ("dispatch_forward", "combine_forward", "dispatch_backward", "combine_backward")


# ----------------------------------------------------------------------------- process group set-up

def default_backend() -> str:
    """"nccl" when CUDA and NCCL are available (GPU ranks), else "gloo" (CPU ranks)."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def init_distributed(backend: str | None = None, timeout_s: float = 60.0) -> tuple[int, int, torch.device]:
    """Join the process group described by the environment (as ``torchrun`` or :func:`run_ranks` set it).

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (and ``LOCAL_RANK`` to pick
    this rank's GPU under nccl). ``timeout_s`` bounds every collective, so a rank that dies or
    a mismatched call fails with an error instead of hanging. Returns (rank, world_size, device).
    """
    where = "init_distributed"
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"{where}: environment variables {missing} are not set; start this process with torchrun "
            f"or tutorial_moe.parallel.run_ranks (they set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
        )
    timeout_s = check_positive_float("timeout_s", timeout_s, where=where)
    backend = default_backend() if backend is None else backend
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"{where}: backend={backend!r} is unknown; choose 'gloo' (CPU) or 'nccl' (CUDA)")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError(f"{where}: backend='nccl' needs CUDA, but torch.cuda.is_available() is False; use 'gloo'")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def _group_info(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "ExpertParallelMoELayer: torch.distributed is not initialised; call "
            "tutorial_moe.parallel.init_distributed() (or dist.init_process_group) on every rank first"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def expert_shard(num_experts: int, world_size: int, rank: int) -> range:
    """The experts rank ``rank`` owns: a contiguous block of ``num_experts // world_size``."""
    where = "expert_shard"
    check_int("num_experts", num_experts, low=1, where=where)
    check_int("world_size", world_size, low=1, where=where)
    check_int("rank", rank, low=0, high=world_size - 1, where=where)
    if num_experts % world_size:
        raise ValueError(
            f"{where}: num_experts={num_experts} is not divisible by world_size={world_size}; expert "
            f"parallelism gives every rank the same number of experts, so use a multiple of {world_size}"
        )
    per_rank = num_experts // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


# ----------------------------------------------------------------------------- communication volume

def _element_size(dtype) -> int:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"all_to_all_bytes: dtype must be a torch.dtype, got {type(dtype).__name__} {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()


def all_to_all_bytes(tokens: int, d_model: int, k: int, world_size: int, dtype: torch.dtype = torch.float32,
                     backward: bool = True, num_experts: int | None = None,
                     local_fraction: float | None = None) -> dict:
    """Bytes the expert-parallel all-to-alls carry in one step, summed over all ranks.

    ``tokens`` is the global number of tokens in the step (all ranks together). Every routed
    (token, expert) pair is a row of ``d_model`` numbers, and it travels

    * forward:  once to its expert (dispatch) and once back (combine): 2 passes;
    * backward: the gradients of those two tensors retrace the same routes: 2 more passes.

    So ``payload = passes * tokens * k * d_model * bytes_per_element`` (an upper bound with a
    capacity factor, because dropped pairs are not sent). Rows whose expert lives on the sender's
    own rank never leave the process; with ``local_fraction`` of pairs staying home (``1/W`` when
    routing is balanced, the default) the bytes that cross between processes are
    ``payload * (1 - local_fraction)``. With ``num_experts`` the tiny per-expert count exchange
    (one int64 per expert per rank per forward) is added as ``counts_bytes``.

    Returns a dict: payload_bytes, remote_bytes, counts_bytes, per_rank_remote_bytes, passes.
    """
    where = "all_to_all_bytes"
    check_int("tokens", tokens, low=0, where=where)
    check_int("d_model", d_model, low=1, where=where)
    check_int("k", k, low=1, where=where)
    check_int("world_size", world_size, low=1, where=where)
    if num_experts is not None:
        check_int("num_experts", num_experts, low=1, where=where)
    if local_fraction is None:
        local_fraction = 1.0 / world_size
    if isinstance(local_fraction, bool) or not isinstance(local_fraction, (int, float)) or not 0 <= local_fraction <= 1:
        raise ValueError(f"{where}: local_fraction={local_fraction!r} must be a number in [0, 1]")
    passes = 4 if backward else 2
    payload = passes * tokens * k * d_model * _element_size(dtype)
    remote = payload * (1.0 - local_fraction)
    counts = 0 if num_experts is None else world_size * num_experts * 8
    return {
        "payload_bytes": payload,
        "remote_bytes": remote,
        "counts_bytes": counts,
        "per_rank_remote_bytes": remote / world_size,
        "passes": passes,
    }


class CommCounter:
    """Bytes this rank hands to the all-to-alls, counted from the actual split sizes.

    ``payload[phase]`` counts every row given to the collective; ``remote[phase]`` only the rows
    addressed to another rank (the part that crosses a process/network boundary). Phases:
    dispatch_forward, combine_forward, dispatch_backward, combine_backward. The backward phases
    are counted from the gradient tensors the backward all-to-alls actually send.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.payload = {p: 0 for p in PHASES}
        self.remote = {p: 0 for p in PHASES}
        self.counts_bytes = 0
        self.routed_pairs = 0
        self.local_pairs = 0
        self.forwards = 0

    def add(self, phase: str, rows_per_rank: list[int], rank: int, row_bytes: int):
        total = sum(rows_per_rank)
        self.payload[phase] += total * row_bytes
        self.remote[phase] += (total - rows_per_rank[rank]) * row_bytes

    def as_dict(self) -> dict:
        return {
            "payload": dict(self.payload), "remote": dict(self.remote), "counts_bytes": self.counts_bytes,
            "payload_bytes": sum(self.payload.values()), "remote_bytes": sum(self.remote.values()),
            "routed_pairs": self.routed_pairs, "local_pairs": self.local_pairs, "forwards": self.forwards,
        }

    def all_reduce(self, group=None, device=None) -> dict:
        """:meth:`as_dict` summed over the ranks of ``group`` (a collective: every rank must call it)."""
        keys = [("payload", p) for p in PHASES] + [("remote", p) for p in PHASES]
        vals = [getattr(self, a)[p] for a, p in keys] + [self.counts_bytes, self.routed_pairs, self.local_pairs,
                                                        self.forwards]
        t = torch.tensor(vals, dtype=torch.float64, device=device)
        dist.all_reduce(t, group=group)
        t = t.tolist()
        out = {"payload": {}, "remote": {}}
        for (a, p), v in zip(keys, t):
            out[a][p] = int(v)
        n = len(keys)
        out.update(counts_bytes=int(t[n]), routed_pairs=int(t[n + 1]), local_pairs=int(t[n + 2]),
                   forwards=int(t[n + 3]))
        out["payload_bytes"] = sum(out["payload"].values())
        out["remote_bytes"] = sum(out["remote"].values())
        return out


class CollectiveTap:
    """Measures every ``dist.all_to_all_single`` call made while it is active, from the
    collective's side: the bytes of the tensor handed to it, per destination rank, and the
    bytes of the output received from every other rank, plus the seconds spent inside the call.

    It wraps ``torch.distributed.all_to_all_single`` itself (a context manager), so it sees the
    calls of any code (the forward all-to-alls, the ones autograd makes in backward, the count
    exchanges) and reads sizes from the tensors, not from the routing that chose them.

    ``sent_bytes``: every byte given to the collective; ``sent_remote_bytes``: those addressed
    to another rank; ``received_remote_bytes``: bytes that arrived from another rank;
    ``seconds``: wall time inside the calls (waiting for the slowest rank included).
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.calls = 0
        self.sent_bytes = 0
        self.sent_remote_bytes = 0
        self.received_remote_bytes = 0
        self.seconds = 0.0

    def _record(self, output, inp, output_split_sizes, input_split_sizes, group, seconds):
        rank, W = _group_info(group)

        def chunks(t, sizes):
            sizes = list(sizes) if sizes else [t.shape[0] // W] * W
            return [c.numel() * c.element_size() for c in t.split(sizes)]

        sent, received = chunks(inp, input_split_sizes), chunks(output, output_split_sizes)
        self.calls += 1
        self.sent_bytes += inp.numel() * inp.element_size()
        self.sent_remote_bytes += sum(b for r, b in enumerate(sent) if r != rank)
        self.received_remote_bytes += sum(b for r, b in enumerate(received) if r != rank)
        self.seconds += seconds

    def __enter__(self):
        self._original = dist.all_to_all_single
        tap, original = self, self._original

        def tapped(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                   async_op=False):
            t0 = time.perf_counter()
            work = original(output, input, output_split_sizes, input_split_sizes, group=group,
                            async_op=async_op)
            if async_op:
                work.wait()
            tap._record(output, input, output_split_sizes, input_split_sizes, group,
                        time.perf_counter() - t0)
            return work

        dist.all_to_all_single = tapped
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self._original
        return False

    def as_dict(self) -> dict:
        return {"calls": self.calls, "sent_bytes": self.sent_bytes,
                "sent_remote_bytes": self.sent_remote_bytes,
                "received_remote_bytes": self.received_remote_bytes, "seconds": self.seconds}


def overlap_model(compute_s: float, comm_s: float, chunks: int = 1) -> float:
    """Step time when the all-to-alls overlap the expert computation by splitting the tokens
    into ``chunks`` pieces sent one after the other (a pipeline: chunk i computes while chunk
    i+1 travels). ``chunks=1`` is no overlap: compute + comm. In the limit only the longer of
    the two remains; with c chunks ``max + min / c`` (the pipeline's fill and drain)."""
    where = "overlap_model"
    check_int("chunks", chunks, low=1, where=where)
    for name, v in (("compute_s", compute_s), ("comm_s", comm_s)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{where}: {name} must be a number >= 0, got {v!r}")
    if chunks == 1:
        return float(compute_s + comm_s)
    return float(max(compute_s, comm_s) + min(compute_s, comm_s) / chunks)


# ----------------------------------------------------------------------------- the layer

class AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` with uneven splits, made differentiable.

    Forward: row block ``i`` of ``x`` (``input_split_sizes[i]`` rows) goes to rank ``i``; the
    output stacks what each rank sent here (``output_split_sizes[i]`` rows from rank ``i``).
    Backward: each gradient row goes back the way its row came, i.e. the same collective with
    the two split lists swapped. Every rank must run forward and backward in the same order.
    """

    @staticmethod
    def forward(ctx, x, output_split_sizes, input_split_sizes, group):
        ctx.splits, ctx.group = (list(output_split_sizes), list(input_split_sizes)), group
        out = x.new_empty((sum(output_split_sizes),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), list(output_split_sizes), list(input_split_sizes), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


COLLECTIVES = ("c10d", "functional")


def _all_to_all(x: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int], group,
                collective: str = "c10d") -> torch.Tensor:
    if collective == "c10d":
        return AllToAll.apply(x, output_split_sizes, input_split_sizes, group)
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    group = dist.group.WORLD if group is None else group
    out = all_to_all_single_autograd(x.contiguous(), output_split_sizes, input_split_sizes, group)
    # Functional collectives return a lazily-waited tensor; waiting here keeps timings honest.
    return out.wait() if hasattr(out, "wait") else out


class ExpertParallelMoELayer(AuxLossMixin, nn.Module):
    """A :class:`~tutorial_moe.moe.MoELayer` whose E experts are split over the ranks of ``group``.

    Each rank holds the full router (replicated) and an :class:`ExpertBank` of its ``E / W``
    experts (``self.experts``; global ids ``self.expert_ids``). ``forward(x)`` takes this rank's
    tokens ``(..., d_model)`` (ranks may hold different numbers of tokens) and returns their
    outputs; ranks must call it together (it contains collectives).

    Capacity and dropping act exactly as in ``MoELayer`` applied to this rank's tokens: the
    capacity is computed from the local batch (as in GShard, where each device is a group).
    Auxiliary losses are computed from the local routing. With a full-batch loss that is the sum
    of the ranks' losses, expert gradients come out complete (the backward all-to-all brings
    every rank's contribution home); the replicated router's gradients are partial sums, to be
    added up with :meth:`reduce_gradients` before an optimiser step.

    Every rank must run ``backward`` through the layer's output on every step, even a rank with
    no tokens or whose loss does not need it: the backward all-to-alls are collectives, and a
    rank that skips them leaves the others waiting until the process group's timeout. With
    auxiliary-loss-free balancing (a router with ``bias_update_rate``), every rank calls
    ``update_expert_bias()`` after its optimiser step (``fit`` does); the load is summed over
    ``group`` first, so the replicated biases stay identical.

    Args mirror ``MoELayer`` (no noisy router: each rank would draw different noise). ``group``:
    a process group (default: the whole world). ``collective``: "c10d" (default) wraps
    ``dist.all_to_all_single`` in :class:`AllToAll`; "functional" uses torch's
    ``_functional_collectives.all_to_all_single_autograd`` (same numbers, but its first call
    imports ``torch._dynamo``, several seconds per process). Build from an existing
    single-process layer with :meth:`from_moe_layer`.
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, k: int = 1, expert: str = "mlp",
                 capacity_factor: float | None = None, router: nn.Module | None = None, temperature: float = 1.0,
                 losses: dict | None = None, group=None, activation: str = "gelu", collective: str = "c10d"):
        super().__init__()
        where = "ExpertParallelMoELayer"
        self.collective = check_choice("collective", collective, COLLECTIVES, where=where)
        self.d_model = check_int("d_model", d_model, low=1, where=where)
        self.d_hidden = check_int("d_hidden", d_hidden, low=1, where=where)
        self.num_experts = check_int("num_experts", num_experts, low=1, where=where)
        check_int("k", k, low=1, high=num_experts, where=where)
        self.group = group
        self.rank, self.world_size = _group_info(group)
        self.expert_ids = expert_shard(num_experts, self.world_size, self.rank)
        router = layer_router(where, d_model, num_experts, k, router, capacity_factor, temperature=temperature)
        if getattr(router, "noisy", False):
            raise ValueError(f"{where}: a noisy router draws different noise on every rank; use noisy=False")
        self.losses = check_loss_weights(default_losses(router) if losses is None else losses, where)
        if self.losses.get("diversity", 0) > 0:
            raise ValueError(f"{where}: losses={losses!r}: 'diversity' needs every expert's output on every token, "
                             f"which expert parallelism never computes; drop it")
        check_losses_for_router(self.losses, router, where)
        if hasattr(router, "process_group"):
            router.process_group = group  # the bias update sums the load over this layer's ranks
        self.router = router
        self.experts = ExpertBank(len(self.expert_ids), d_model, d_hidden, kind=expert, activation=activation)
        self.comm = CommCounter()
        self.last_routing: Routing | None = None
        self.last_splits: dict = {}
        self.aux_losses: dict = {}
        self.aux_loss = torch.zeros(())

    @property
    def k(self):
        return getattr(self.router, "k", None)

    @property
    def local_experts(self) -> int:
        return len(self.expert_ids)

    def extra_repr(self):
        return (f"rank={self.rank}, world_size={self.world_size}, experts={self.expert_ids.start}.."
                f"{self.expert_ids.stop - 1} of {self.num_experts}")

    @classmethod
    def from_moe_layer(cls, layer: MoELayer, group=None, collective: str = "c10d") -> "ExpertParallelMoELayer":
        """This rank's shard of a single-process ``MoELayer``: a copy of its router and the slice
        ``[r*E/W, (r+1)*E/W)`` of its ExpertBank's stacked weights (same dtype and device)."""
        if not isinstance(layer, MoELayer):
            raise TypeError(f"ExpertParallelMoELayer.from_moe_layer: layer must be a MoELayer, got {type(layer).__name__}")
        bank = layer.experts
        ep = cls(layer.d_model, layer.d_hidden, layer.num_experts, k=layer.k or 1, expert=bank.kind,
                 router=copy.deepcopy(layer.router), losses=dict(layer.losses), group=group,
                 activation=bank.activation, collective=collective)
        first, stop = ep.expert_ids.start, ep.expert_ids.stop
        ref = next(layer.parameters())
        ep.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for name, p in ep.experts.named_parameters():
                p.copy_(getattr(bank, name)[first:stop])
        return ep

    def broadcast_router_(self, src: int = 0) -> None:
        """Copy the router's parameters and buffers from rank ``src`` to every rank (collective).
        Use it after building layers independently, so every rank routes the same way."""
        for t in list(self.router.parameters()) + list(self.router.buffers()):
            dist.broadcast(t.data, src=dist.get_global_rank(self.group, src) if self.group else src, group=self.group)

    def reduce_gradients(self, average: bool = False) -> None:
        """Turn each rank's gradients into those of the sum (or, ``average=True``, the mean) of all
        ranks' losses. Collective.

        After ``backward`` every expert's gradient already holds every rank's contribution
        (the backward all-to-all carried them home), but each router replica only saw its own
        tokens: the router's gradients are summed over the ranks. With ``average`` both are
        then divided by W, which is what data parallelism (DDP) does for replicated weights.
        """
        for p in self.router.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.group)
        if average:
            for p in list(self.router.parameters()) + list(self.experts.parameters()):
                if p.grad is not None:
                    p.grad /= self.world_size

    def _run_local_experts(self, received: torch.Tensor, recv_counts: torch.Tensor) -> torch.Tensor:
        """received (n, d) ordered [source rank][local expert][token]; returns expert outputs in that order.

        The rows are regrouped by expert and run through the same fused kernels as
        ``MoELayer``'s sorted/grouped dispatch (one autograd node or one grouped matmul per
        weight, not a Python loop over experts)."""
        W, El = self.world_size, self.local_experts
        local_expert = torch.repeat_interleave(torch.arange(El, device=received.device).repeat(W),
                                               recv_counts.reshape(-1))
        order = torch.argsort(local_expert, stable=True)  # regroup by expert: [expert][source][token]
        xs = received.index_select(0, order)
        ys = run_sorted_experts(self.experts, xs, recv_counts.sum(0))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return ys.index_select(0, inverse).to(received.dtype)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        where = "ExpertParallelMoELayer"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"{where}: x must have shape (..., {self.d_model}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.d_model)
        flat_ids = None if ids is None else torch.as_tensor(ids, device=x.device).reshape(-1)
        routing = self.router(flat, flat_ids)
        W, El, rank = self.world_size, self.local_experts, self.rank

        # 1. the routed pairs, sorted by expert: experts are owned in contiguous blocks, so this
        #    also sorts them by destination rank, as all_to_all_single's splits require.
        t_idx, e_idx = routing.assignments()
        w = routing.weights[t_idx, e_idx]
        counts = routing.mask.sum(0)  # (E,) int64: pairs this rank sends to each expert

        # 2. counts exchange: afterwards recv_counts[s, j] = pairs rank s sends to my local expert j.
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.reshape(W, El)
        send_splits = counts.reshape(W, El).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()

        # 3-5. dispatch, local experts, combine.
        received = _all_to_all(flat.index_select(0, t_idx), recv_splits, send_splits, self.group, self.collective)
        y = self._run_local_experts(received, recv_counts)
        returned = _all_to_all(y, send_splits, recv_splits, self.group, self.collective)

        # 6. weighted sum over each token's experts.
        out = torch.zeros_like(flat).index_add(0, t_idx, returned * w.unsqueeze(1).to(returned.dtype))

        self._count(counts, send_splits, recv_splits, received, returned)
        self.last_splits = {"send": send_splits, "recv": recv_splits, "counts": counts.tolist(),
                            "recv_counts": recv_counts.tolist()}
        self._set_aux(routing)
        return out.reshape(*lead, self.d_model)

    def _count(self, counts, send_splits, recv_splits, received, returned):
        c, rank = self.comm, self.rank
        row = self.d_model * received.element_size()
        c.add("dispatch_forward", send_splits, rank, row)
        c.add("combine_forward", recv_splits, rank, row)
        c.counts_bytes += counts.numel() * counts.element_size()
        c.routed_pairs += sum(send_splits)
        c.local_pairs += send_splits[rank]
        c.forwards += 1
        # The gradient of `received` is what dispatch's backward sends home (split like recv_splits);
        # the gradient of `returned` is what combine's backward sends to the experts (like send_splits).
        if received.requires_grad:
            received.register_hook(lambda g: c.add("dispatch_backward", recv_splits, rank,
                                                   g.shape[1] * g.element_size()))
        if returned.requires_grad:
            returned.register_hook(lambda g: c.add("combine_backward", send_splits, rank,
                                                   g.shape[1] * g.element_size()))


# ----------------------------------------------------------------------------- a picture of the traffic

def routed_counts(router: nn.Module, x: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """(W, E) int64: (token, expert) pairs each of W ranks would send to each expert, computed in
    one process by routing each rank's rows (``splits[r]`` of ``x``) on their own, as the ranks do.

    Read-only: the router runs in eval mode (no noise, nothing counted for a bias update) and its
    buffers are restored afterwards, so asking never changes how it routes next."""
    if sum(splits) != x.shape[0]:
        raise ValueError(f"routed_counts: splits={splits} sum to {sum(splits)}, but x has {x.shape[0]} rows")
    was_training = router.training
    saved = {name: b.clone() for name, b in router.named_buffers()}
    router.eval()
    try:
        with torch.no_grad():
            return torch.stack([router(part).mask.sum(0) for part in x.split(list(splits))])
    finally:
        router.train(was_training)
        with torch.no_grad():
            for name, b in router.named_buffers():
                b.copy_(saved[name])


def draw_all_to_all(counts, ax=None, title: str | None = None):
    """Draw one dispatch all-to-all: ``counts[s, e]`` pairs go from rank ``s`` to expert ``e``.

    Source ranks on the left, the experts grouped by their owner rank on the right; one arrow per
    non-zero count, width proportional to it, coloured by sender; solid arrows cross between
    processes, dotted ones stay on their rank (no network). The combine all-to-all retraces every arrow
    backwards, and the backward pass retraces both. Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Rectangle

    counts = torch.as_tensor(counts)
    if counts.dim() != 2:
        raise ValueError(f"draw_all_to_all: counts must have shape (world_size, num_experts), got {tuple(counts.shape)}")
    W, E = counts.shape
    El = len(expert_shard(E, W, 0))
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.9 + 0.55 * E), dpi=90)
    colors = plt.get_cmap("tab10")
    height = 1.0 / W
    expert_y = [1 - (e + 0.5) / E for e in range(E)]
    biggest = max(1, int(counts.max()))
    for s in range(W):
        y0 = 1 - (s + 1) * height
        ax.add_patch(Rectangle((0.0, y0 + 0.1 * height), 0.2, 0.8 * height, facecolor=colors(s), alpha=0.25,
                               edgecolor=colors(s)))
        ax.text(0.1, y0 + 0.5 * height, f"rank {s}\nsends {int(counts[s].sum())}", ha="center", va="center")
        ax.add_patch(Rectangle((0.72, y0 + 0.02), 0.26, height - 0.04, facecolor="none", edgecolor="0.4",
                               linestyle="--"))
        ax.text(0.945, y0 + 0.5 * height, f"rank {s}", ha="center", va="center", rotation=90, fontsize=8,
                color="0.3")
    for e in range(E):
        ax.add_patch(Rectangle((0.75, expert_y[e] - 0.3 / E), 0.16, 0.6 / E, facecolor="0.9", edgecolor="0.2"))
        ax.text(0.83, expert_y[e], f"expert {e}", ha="center", va="center", fontsize=8)
    for s in range(W):
        ys = 1 - (s + 0.5) * height
        for e in range(E):
            n = int(counts[s, e])
            if n == 0:
                continue
            local = e // El == s
            ax.add_patch(FancyArrowPatch((0.2, ys), (0.75, expert_y[e]), arrowstyle="-|>", mutation_scale=10,
                                         linewidth=0.5 + 5 * n / biggest, color=colors(s), alpha=0.8,
                                         linestyle=":" if local else "-"))
    from matplotlib.lines import Line2D

    ax.legend(handles=[Line2D([], [], color="0.3", linestyle="-", label="crosses to another rank"),
                       Line2D([], [], color="0.3", linestyle=":", label="stays on its rank")],
              loc="lower center", bbox_to_anchor=(0.47, -0.09), ncol=2, frameon=False, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.set_title(title or f"Dispatch all-to-all: (token, expert) pairs sent, {W} ranks, {E} experts")
    return ax


# ----------------------------------------------------------------------------- launching ranks

def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(conn, fn, rank, nprocs, port, threads_per_rank, args, kwargs):
    """Body of a forked rank: the torchrun environment, then ``fn``; its result or traceback goes to ``conn``."""
    import traceback

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads_per_rank))
    torch.set_num_threads(threads_per_rank)
    try:
        conn.send(("ok", fn(*args, **kwargs)))
    except BaseException:  # noqa: BLE001 - report anything, including KeyboardInterrupt, to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        if dist.is_initialized():  # the rank function should have done this; never leave a group behind
            dist.destroy_process_group()
        conn.close()


def run_ranks(fn, nprocs: int, args: tuple = (), kwargs: dict | None = None, timeout_s: float = 120.0,
              threads_per_rank: int = 1) -> list:
    """Run ``fn(*args, **kwargs)`` in ``nprocs`` forked local processes, one per rank; return their results.

    Each rank sees the environment ``torchrun --standalone`` would give it (RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free MASTER_PORT, OMP_NUM_THREADS=threads_per_rank), so
    ``fn`` calls :func:`init_distributed` exactly as under torchrun. Forking reuses this process's
    imports (starting ranks costs milliseconds, not a torch import each); use it from scripts and
    tests, not from a notebook kernel (run a script in a subprocess there). If a rank raises, the
    others are stopped at once and ``RuntimeError`` carries its traceback; past ``timeout_s`` all
    are killed and ``TimeoutError`` is raised. No process outlives the call.
    """
    import multiprocessing as mp

    where = "run_ranks"
    if not callable(fn):
        raise TypeError(f"{where}: fn must be callable, got {type(fn).__name__}")
    check_int("nprocs", nprocs, low=1, where=where)
    timeout_s = check_positive_float("timeout_s", timeout_s, where=where)
    check_int("threads_per_rank", threads_per_rank, low=1, where=where)
    ctx = mp.get_context("fork")
    port = free_port()
    procs, conns = [], []
    results: list = [None] * nprocs
    done = [False] * nprocs
    try:
        for rank in range(nprocs):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_rank_main, args=(send, fn, rank, nprocs, port, threads_per_rank, tuple(args),
                                                     dict(kwargs or {})), daemon=True)
            p.start()
            send.close()
            procs.append(p)
            conns.append(recv)
        deadline = time.monotonic() + timeout_s
        while not all(done):
            for rank, (p, conn) in enumerate(zip(procs, conns)):
                if done[rank]:
                    continue
                if conn.poll():
                    try:
                        status, value = conn.recv()
                    except EOFError:
                        status, value = "error", "exited without a result"
                    if status == "error":
                        raise RuntimeError(f"{where}: rank {rank} of {nprocs} failed:\n{value}")
                    results[rank], done[rank] = value, True
                elif p.exitcode is not None and not conn.poll():
                    raise RuntimeError(f"{where}: rank {rank} of {nprocs} died with exit code {p.exitcode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{where}: ranks {[r for r, d in enumerate(done) if not d]} of {nprocs} gave no "
                                   f"result within {timeout_s:.0f} s; all ranks were killed")
            time.sleep(0.01)
        for p in procs:
            p.join(timeout=10)
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in conns:
            conn.close()


# ----------------------------------------------------------------------------- equivalence and the demo

def _max_abs(a, b) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def equivalence_report(layer: MoELayer, x_full: torch.Tensor, splits: list[int], group=None) -> dict:
    """Run ``layer`` on all of ``x_full`` in this process and its expert-parallel shard on this
    rank's rows (``splits[r]`` rows for rank r); compare outputs and gradients of the loss
    ``sum(out * upstream)`` (a fixed random upstream gradient). Collective; the returned maxima
    are over all ranks: ``absolute`` max |difference| and ``relative`` (divided by the oracle's
    largest |value| of that quantity). Without a capacity factor the reference is one full-batch forward; with
    one, capacity is per rank's batch, so the reference runs ``layer`` on each rank's rows.
    """
    rank, W = _group_info(group)
    if len(splits) != W or sum(splits) != x_full.shape[0]:
        raise ValueError(f"equivalence_report: splits={splits} must have {W} entries summing to {x_full.shape[0]}")
    ep = ExpertParallelMoELayer.from_moe_layer(layer, group)
    g = torch.Generator(device="cpu").manual_seed(1234)
    upstream = torch.randn(x_full.shape, generator=g).to(x_full)
    start = sum(splits[:rank])
    mine = slice(start, start + splits[rank])

    x_ref = x_full.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    if getattr(layer.router, "capacity_factor", None) is None:
        out_ref = layer(x_ref)
    else:
        out_ref = torch.cat([layer(part) for part in x_ref.split(splits)])
    (out_ref * upstream).sum().backward()

    x_local = x_full[mine].detach().clone().requires_grad_(True)
    out = ep(x_local)
    (out * upstream[mine]).sum().backward()
    ep.reduce_gradients()

    def grad(p):
        return torch.zeros_like(p) if p.grad is None else p.grad

    first, stop = ep.expert_ids.start, ep.expert_ids.stop
    diffs = torch.tensor([
        _max_abs(out.detach(), out_ref.detach()[mine]),
        _max_abs(x_local.grad, x_ref.grad[mine]),
        max(_max_abs(grad(p), grad(getattr(layer.experts, n))[first:stop]) for n, p in ep.experts.named_parameters()),
        max(_max_abs(grad(p), grad(q)) for p, q in zip(ep.router.parameters(), layer.router.parameters())),
    ], dtype=torch.float64, device=x_full.device)
    scales = torch.tensor([
        out_ref.detach().abs().max(), x_ref.grad.abs().max(),
        max(grad(p).abs().max() for p in layer.experts.parameters()),
        max(grad(p).abs().max() for p in layer.router.parameters()),
    ], dtype=torch.float64, device=x_full.device)
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX, group=group)
    names = ("output", "input_grad", "expert_grad", "router_grad")
    return {
        "absolute": {n: float(v) for n, v in zip(names, diffs.tolist())},
        "relative": {n: float(v / s) if s > 0 else float(v) for n, v, s in zip(names, diffs.tolist(), scales.tolist())},
    }


def run_demo(tokens_per_rank: int = 512, d_model: int = 64, d_hidden: int = 128, num_experts: int = 8, k: int = 2,
             capacity_factor: float | None = None, steps: int = 5, seed: int = 0, backend: str | None = None,
             timeout_s: float = 60.0, imbalance_biases=(0.0, 0.05, 0.1, 0.2, 0.4, 10.0)) -> dict | None:
    """One rank's part of the demo: equivalence with a single process, bytes moved (counted by
    the layer and measured by a :class:`CollectiveTap`), step times, time in the collectives,
    and step time against routing imbalance (``imbalance_biases``: selection biases added to
    rank 0's experts, one timed run each).

    Run it on every rank (:func:`run_ranks` or ``torchrun``); rank 0 returns the results, others None.
    """
    rank, W, device = init_distributed(backend, timeout_s)
    try:
        torch.manual_seed(seed)  # same seed on every rank: same reference layer and inputs
        # The dense dispatch (every expert on every token) is the obviously-correct oracle.
        layer = MoELayer(d_model, d_hidden, num_experts, k, dispatch="dense", capacity_factor=capacity_factor,
                         losses={}).to(device)
        x_full = torch.randn(W * tokens_per_rank, d_model, device=device)
        splits = [tokens_per_rank] * W
        report = equivalence_report(layer, x_full, splits)

        ep = ExpertParallelMoELayer.from_moe_layer(layer)
        mine = x_full[rank * tokens_per_rank:(rank + 1) * tokens_per_rank]
        upstream = torch.randn_like(mine)
        def timed_steps(n):
            """n timed training steps after one warm-up; per step: (seconds, seconds in
            all-to-alls, rows this rank's experts received)."""
            out = []
            for step in range(n + 1):  # step 0 warms up and is not timed or counted
                if step == 1:
                    ep.comm.reset()
                    tap.reset()
                dist.barrier()
                in_comm = tap.seconds
                t0 = time.perf_counter()
                xi = mine.detach().requires_grad_(True)
                (ep(xi) * upstream).sum().backward()
                ep.reduce_gradients()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                out.append((time.perf_counter() - t0, tap.seconds - in_comm,
                            sum(ep.last_splits["recv"])))
            return out[1:]

        with CollectiveTap() as tap:
            steps_run = timed_steps(steps)
            tapped = tap.as_dict()
            comm = ep.comm.all_reduce(device=device)
            times = [0.0] + [t for t, _, _ in steps_run]
            comm_seconds = [c for _, c, _ in steps_run]
            # Step time against routing imbalance: a selection bias towards rank 0's experts
            # (the router's expert_bias, as the loss-free balancer uses) sends it more rows.
            imbalance = []
            favoured = torch.zeros(num_experts, device=device)
            favoured[: num_experts // W] = 1.0
            # The router adds expert_bias to the logits it selects with when its update rate
            # is positive; nothing here calls update_expert_bias, so the bias stays as set.
            rate, ep.router.bias_update_rate = ep.router.bias_update_rate, 1e-9
            for bias in imbalance_biases:
                ep.router.expert_bias.copy_(bias * favoured)
                run = timed_steps(steps)
                rows = torch.tensor([[r for _, _, r in run]], dtype=torch.float64, device=device)
                secs = torch.tensor([[t for t, _, _ in run], [c for _, c, _ in run]],
                                    dtype=torch.float64, device=device)
                all_rows = [torch.empty_like(rows) for _ in range(W)]
                dist.all_gather(all_rows, rows)
                dist.all_reduce(secs, op=dist.ReduceOp.MAX)
                loads = torch.cat(all_rows).mean(1)  # (W,) rows received per step
                imbalance.append({
                    "bias": bias, "rows_received": loads.tolist(),
                    "max_over_mean": float(loads.max() / loads.mean()),
                    "step_seconds": float(secs[0].median()),
                    "comm_seconds": float(secs[1].median()),
                })
            ep.router.expert_bias.zero_()
            ep.router.bias_update_rate = rate
        tap_totals = torch.tensor([tapped["calls"], tapped["sent_bytes"], tapped["sent_remote_bytes"],
                                   tapped["received_remote_bytes"]], dtype=torch.float64, device=device)
        dist.all_reduce(tap_totals)
        comm_per_rank = torch.tensor(comm_seconds, dtype=torch.float64, device=device)
        dist.all_reduce(comm_per_rank, op=dist.ReduceOp.MAX)
        counts = torch.tensor(ep.last_splits["counts"], device=device)
        all_counts = [torch.empty_like(counts) for _ in range(W)]
        dist.all_gather(all_counts, counts)  # (W, E): what every rank sent to every expert in a step
        step_times = torch.tensor(times[1:], dtype=torch.float64, device=device)
        dist.all_reduce(step_times, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
        single = None
        if rank == 0:  # the same step for the whole batch in one process, for comparison
            layer.dispatch = "sorted"  # the same per-expert loop the ranks run, not the dense oracle
            ts = []
            for step in range(steps + 1):
                t0 = time.perf_counter()
                xr = x_full.detach().requires_grad_(True)
                (layer(xr) * torch.randn_like(xr)).sum().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            single = sorted(ts[1:])[len(ts[1:]) // 2]
        dist.barrier()
        if rank != 0:
            return None
        dtype = x_full.dtype
        pairs_per_step = comm["routed_pairs"] / steps
        local_fraction = comm["local_pairs"] / max(1, comm["routed_pairs"])
        predicted = all_to_all_bytes(W * tokens_per_rank, d_model, k, W, dtype, num_experts=num_experts,
                                     local_fraction=local_fraction)
        predicted_balanced = all_to_all_bytes(W * tokens_per_rank, d_model, k, W, dtype, num_experts=num_experts)
        return {
            "world_size": W, "backend": dist.get_backend(), "device": str(device),
            "tokens_per_rank": tokens_per_rank, "d_model": d_model, "d_hidden": d_hidden,
            "num_experts": num_experts, "k": k, "capacity_factor": capacity_factor, "steps": steps,
            "max_diff": report,
            "measured": {
                "payload_bytes_per_step": comm["payload_bytes"] / steps,
                "remote_bytes_per_step": comm["remote_bytes"] / steps,
                "counts_bytes_per_step": comm["counts_bytes"] / steps,
                "payload_by_phase_per_step": {p: v / steps for p, v in comm["payload"].items()},
                "routed_pairs_per_step": pairs_per_step,
                "local_fraction": local_fraction,
                "counts": torch.stack(all_counts).tolist(),
            },
            "tapped_per_step": {
                "calls": tap_totals[0].item() / steps / W,
                "sent_bytes": tap_totals[1].item() / steps,
                "sent_remote_bytes": tap_totals[2].item() / steps,
                "received_remote_bytes": tap_totals[3].item() / steps,
            },
            "comm_seconds": sorted(comm_per_rank.tolist())[steps // 2],
            "imbalance": imbalance,
            "predicted": predicted,
            "predicted_balanced": predicted_balanced,
            "step_seconds": sorted(step_times.tolist())[len(times[1:]) // 2],
            "single_process_step_seconds": single,
        }
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tutorial_moe.parallel",
        description="Expert-parallel MoE demo: equivalence with one process, bytes moved, step time. "
                    "Started by torchrun, each process is one rank; started alone, it forks --nproc local "
                    "ranks itself (gloo on CPU).")
    parser.add_argument("--demo", action="store_true", help="run the demo (the only mode)")
    parser.add_argument("--nproc", type=int, nargs="+", default=[2],
                        help="world size(s) to run one after the other when not started by torchrun")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-hidden", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None, help="default: nccl on CUDA, else gloo")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a collective fails")
    parser.add_argument("--out", type=str, default=None, help="write the results (a JSON list, one per run) here")
    args = parser.parse_args(argv)
    if not args.demo:
        parser.error("nothing to do; pass --demo")
    demo = dict(tokens_per_rank=args.tokens, d_model=args.d_model, d_hidden=args.d_hidden,
                num_experts=args.experts, k=args.k, capacity_factor=args.capacity_factor, steps=args.steps,
                seed=args.seed, backend=args.backend, timeout_s=args.timeout)
    if "WORLD_SIZE" in os.environ:  # started by torchrun: this process is one rank
        results = [run_demo(**demo)]
        if results[0] is None:
            return 0
    else:
        results = []
        for n in args.nproc:
            t0 = time.perf_counter()
            run = run_ranks(run_demo, n, kwargs=demo, timeout_s=4 * args.timeout)[0]
            run["launch_seconds"] = time.perf_counter() - t0
            results.append(run)
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

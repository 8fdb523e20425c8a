"""Peers: our :class:`~tutorial_moe.MoELayer` next to the same layer in an existing engine.

torchtitan (PyPI ``torchtitan``, pinned at :data:`TORCHTITAN_VERSION`) is PyTorch's own
large-scale training stack. Its MoE block lives in ``torchtitan/models/common/moe.py``: a
``TokenChoiceTopKRouter`` (gate, scores, top-k), ``RoutedExperts`` (a token dispatcher from
``token_dispatcher.py`` around ``GroupedExperts``, which runs every expert through
``torch._grouped_mm``) and the ``MoE`` module that ties them together. This module builds that
block from our layer's configuration, copies our weights into it, and measures how far the two
disagree (:func:`torchtitan_equivalence`), on one process or with torchtitan's own
expert-parallel all-to-all on several gloo ranks (:func:`torchtitan_expert_parallel`).

Where the defaults differ, and how the peer is configured to match ``MoELayer``:

============================  =====================================  ===============================
setting                       torchtitan 0.3.0 default               set here to
============================  =====================================  ===============================
``score_func``                ``"sigmoid"``                          ``"softmax"`` (ours: softmax)
``route_norm``                ``False`` (raw scores as weights)      as ours: renormalise iff k > 1
``top_k``                     1                                      our k
score then top-k              softmax over all E, then top-k         the same (ours: top-k on the
                                                                     logits, softmax is monotone)
``route_scale``               1.0                                    1.0
``load_balance_coeff``        1e-3 (aux-loss-free expert bias)       ``None`` (no bias); ours: no
                                                                     bias and its aux losses are a
                                                                     separate term, not in the output
``shared_experts``            ``None``                               ``None``
``num_expert_groups``         ``None`` (no node-limited routing)     ``None``
expert arithmetic             bfloat16 (``GroupedExperts`` casts     ``precision="float"``: the same
                              inputs and weights), fp32 combine      grouped matmuls in the input's
                                                                     dtype (``"bfloat16"`` = as shipped)
============================  =====================================  ===============================

Weights: torchtitan stores ``w1``/``w3`` as (E, F, D) and ``w2`` as (E, D, F) (``nn.Linear``
layout, out x in); our :class:`~tutorial_moe.experts.ExpertBank` stores ``w_gate``/``w_up`` as
(E, D, F) and ``w_down`` as (E, F, D) (in x out). So ``w1 = w_gate^T``, ``w3 = w_up^T``,
``w2 = w_down^T`` (per expert), and the router gate is an ``nn.Linear(D, E, bias=False)`` in both.

Softmax top-k at any k, renormalised or not (as our router decides for its current k), with
no capacity limit, no noise and temperature 1 can be matched; the rest cannot, because
torchtitan's token-choice router has no capacity dropping, noise or temperature, and its
expert bias is added to the *scores* (after softmax or sigmoid) where ours is added to the
logits, so the two biased selections differ. :func:`torchtitan_peer` refuses the rest with a
``ValueError`` that says which setting.

Installing: ``pip install -e '.[peer]'`` brings torchtitan with its full trainer dependencies
(datasets, pyarrow, tensorboard, wandb, ...). The MoE module itself needs only torch, ``tyro``
and ``spmd_types`` at import; ``make test`` installs exactly that (``torchtitan`` with
``--no-deps``, see ``scripts/setup.sh``), so the peer test runs everywhere the suite does.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import check_choice, check_int, check_positive_float
from .moe import MoELayer
from .routing import TopKRouter

__all__ = [
    "TORCHTITAN_VERSION", "TORCHTITAN_MOE_FILE", "TORCHTITAN_GPU_COMMAND", "TORCHTITAN_CPU_NOTES",
    "torchtitan_available", "import_torchtitan", "torchtitan_config", "torchtitan_peer",
    "load_into_torchtitan", "torchtitan_equivalence", "torchtitan_expert_parallel",
    "torchtitan_defaults", "torchtitan_report", "main",
]

TORCHTITAN_VERSION = "0.3.0"
TORCHTITAN_MOE_FILE = "torchtitan/models/common/moe.py"
PRECISIONS = ("float", "bfloat16")

_INSTALL_HINT = (
    f"torchtitan=={TORCHTITAN_VERSION} is not installed. Install the optional extra with "
    "`pip install -e '.[peer]'` (torchtitan and its trainer dependencies), or run `make test`, which installs "
    f"torchtitan=={TORCHTITAN_VERSION} with --no-deps next to the two packages its MoE module imports "
    "(tyro, spmd_types)."
)

# What a reader runs once a single machine is not enough: torchtitan's own trainer, NCCL, GPUs.
# 0.3.0 has no TOML files: a config is a Python function in the model's config_registry, and
# every field can be overridden on the command line (tyro). run_train.sh and the debug model's
# tokenizer and test dataset (tests/assets/) come from the repository, not from the wheel.
TORCHTITAN_GPU_COMMAND = """\
# torchtitan 0.3.0 on one node with 4 CUDA GPUs: a small DeepSeek-V3-style model whose
# 8 routed experts are split over 2 expert-parallel ranks (NCCL all-to-all).
git clone https://github.com/pytorch/torchtitan && cd torchtitan
pip install torchtitan==0.3.0
NGPU=4 MODULE=deepseek_v3 CONFIG=deepseek_v3_debugmodel ./run_train.sh \\
    --parallelism.expert_parallel_degree 2 --training.disable_cuda_graphs
# EP takes its ranks from FSDP (and TP): dp_shard * cp * tp must equal efsdp * ep, so
# with 4 GPUs and ep=2 the experts' weights are also sharded over efsdp=2 ranks.
# The standard all-to-all dispatcher reads split sizes on the CPU, which CUDA graphs
# (on by default) forbid: hence --training.disable_cuda_graphs.
"""

TORCHTITAN_CPU_NOTES = (
    "What runs on CPU: the MoE module (router, local dispatch, GroupedExperts through torch._grouped_mm, "
    "combine) forward and backward; torch._grouped_mm on CPU takes float32 and bfloat16 (not float64) and needs "
    "row strides that are multiples of 16 bytes. Expert parallelism runs on gloo with "
    "set_spmd_backend('partial_dtensor'), where the dispatcher uses the functional all_to_all_single; torchtitan's "
    "default SPMD backend 'spmd_types' sends uneven splits with dist.all_to_all over lists of tensors, which gloo "
    "rejects ('invalid tensor size') when ranks exchange different numbers of rows. The trainer itself "
    "(torchtitan.train) takes device 'cuda' and the NCCL backend when no accelerator is visible and calls "
    "torch.cuda.set_device in Trainer.__init__, so on a CPU-only machine it stops there ('Found no NVIDIA "
    "driver'): training runs need GPUs (or another accelerator with a torch.distributed backend)."
)


def torchtitan_available() -> bool:
    """True when torchtitan's MoE module can be imported here (no exception escapes)."""
    try:
        import_torchtitan()
    except ImportError:
        return False
    return True


def import_torchtitan():
    """torchtitan's MoE modules as a namespace (``moe``, ``dispatcher``, ``linear``, ``version``).

    Imported on first use, so the package works without torchtitan; raises ``ImportError`` that
    names the extra to install when it is missing or broken.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchtitan
            from torchtitan.models.common import linear, moe, token_dispatcher
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} (import failed: {e})") from e
    # TokenChoiceTopKRouter asks for float32 autocast around its gate; CPU autocast has no
    # float32 mode, so torch warns and runs the gate in the input's dtype (what we compare).
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
    version = getattr(torchtitan, "__version__", "unknown")
    return _Namespace(moe=moe, dispatcher=token_dispatcher, linear=linear, version=version)


class _Namespace:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def torchtitan_defaults() -> dict:
    """torchtitan's own defaults for the settings that differ from ours, read from its Config classes."""
    tt = import_torchtitan()
    router = {f.name: f.default for f in dataclasses.fields(tt.moe.TokenChoiceTopKRouter.Config)
              if f.default is not dataclasses.MISSING}
    moe = {f.name: f.default for f in dataclasses.fields(tt.moe.MoE.Config) if f.default is not dataclasses.MISSING}
    return {
        "score_func": router["score_func"], "route_norm": router["route_norm"], "top_k": router["top_k"],
        "route_scale": router["route_scale"], "load_balance_coeff": moe["load_balance_coeff"],
        "shared_experts": moe["shared_experts"], "expert_dtype": "bfloat16",
    }


# ----------------------------------------------------------------------------- building the peer

_FULL_PRECISION_CLS = None


def _full_precision_experts(tt):
    """torchtitan's ``GroupedExperts`` with its bfloat16 casts removed (built once, on first use).

    Stock ``GroupedExperts.forward`` casts tokens and weights to bfloat16 before every grouped
    matmul (the GPU training recipe). This subclass runs the identical three grouped matmuls
    (``silu(x w1^T) * (x w3^T)``, then ``w2^T``) through the same ``_grouped_mm`` seam in the
    input's dtype, so the comparison measures the routing, dispatch and combine rather than
    bfloat16 rounding. Where ``torch._grouped_mm`` cannot take the operands (float64; rows not
    16-byte aligned) it computes the same product expert by expert.
    """
    global _FULL_PRECISION_CLS
    if _FULL_PRECISION_CLS is not None:
        return _FULL_PRECISION_CLS
    Grouped = tt.moe.GroupedExperts
    from torch.distributed.tensor import DTensor

    class FullPrecisionGroupedExperts(Grouped):
        @dataclasses.dataclass(kw_only=True, slots=True)
        class Config(Grouped.Config):
            pass

        def forward(self, x_RD, num_tokens_per_expert_E):
            w1, w2, w3 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD))
            offs = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
            h = F.silu(self._grouped_mm(A=x_RD, B_t=w1.transpose(-2, -1), offs=offs))
            h = h * self._grouped_mm(A=x_RD, B_t=w3.transpose(-2, -1), offs=offs)
            return self._grouped_mm(A=h, B_t=w2.transpose(-2, -1), offs=offs)

        def _grouped_mm(self, *, A, B_t, offs):
            if A.dtype in (torch.float32, torch.bfloat16) and _aligned(A) and _aligned(B_t):
                return super()._grouped_mm(A=A, B_t=B_t, offs=offs)
            counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
            parts = [a @ B_t[e] for e, a in enumerate(A[: int(offs[-1])].split(counts)) if a.shape[0]]
            return torch.cat(parts) if parts else A.new_zeros(0, B_t.shape[-1])

    _FULL_PRECISION_CLS = FullPrecisionGroupedExperts
    return FullPrecisionGroupedExperts


def _aligned(t: torch.Tensor) -> bool:
    # torch._grouped_mm (CPU and CUDA) wants every non-unit stride to be a multiple of 16 bytes.
    return all(s == 1 or (s * t.element_size()) % 16 == 0 for s in t.stride())


def torchtitan_config(d_model: int, d_hidden: int, num_experts: int, k: int, route_norm: bool = True,
                      precision: str = "float", expert_parallel: bool = False, local_experts: int | None = None):
    """A torchtitan ``MoE.Config`` set to compute what our ``MoELayer`` computes (see the module docstring).

    ``expert_parallel``: use torchtitan's ``AllToAllTokenDispatcher`` (EP; it falls back to the
    local reorder until a mesh is wired) instead of ``LocalTokenDispatcher``. ``local_experts``:
    how many experts this process holds (E / EP under expert parallelism; default E).
    """
    where = "torchtitan_config"
    check_int("d_model", d_model, low=1, where=where)
    check_int("d_hidden", d_hidden, low=1, where=where)
    check_int("num_experts", num_experts, low=1, where=where)
    check_int("k", k, low=1, high=num_experts, where=where)
    check_choice("precision", precision, PRECISIONS, where=where)
    if not isinstance(route_norm, bool):
        raise TypeError(f"{where}: route_norm must be a bool, got {type(route_norm).__name__} {route_norm!r}")
    local = num_experts if local_experts is None else check_int("local_experts", local_experts, low=1,
                                                                   high=num_experts, where=where)
    tt = import_torchtitan()
    experts_cls = _full_precision_experts(tt) if precision == "float" else tt.moe.GroupedExperts
    dispatcher_cls = tt.dispatcher.AllToAllTokenDispatcher if expert_parallel else tt.dispatcher.LocalTokenDispatcher
    return tt.moe.MoE.Config(
        num_experts=num_experts,
        routed_experts=tt.moe.RoutedExperts.Config(
            inner_experts=experts_cls.Config(dim=d_model, hidden_dim=d_hidden, num_experts=local),
            token_dispatcher=dispatcher_cls.Config(num_experts=num_experts, top_k=k),
        ),
        router=tt.moe.TokenChoiceTopKRouter.Config(
            num_experts=num_experts,
            gate=tt.linear.Linear.Config(in_features=d_model, out_features=num_experts, bias=False),
            top_k=k, score_func="softmax", route_norm=route_norm, route_scale=1.0,
        ),
        load_balance_coeff=None,
        shared_experts=None,
    )


def _route_norm(router: TopKRouter) -> bool:
    # Whether our router rescales the k chosen probabilities to sum to 1 at the next forward:
    # ``renormalizes()`` where the router has it (``normalize=None`` decides from the current k:
    # k > 1 renormalises, k = 1 keeps the raw probability, as Switch does), else ``normalize``.
    renormalizes = getattr(router, "renormalizes", None)
    if callable(renormalizes):
        return bool(renormalizes())
    norm = getattr(router, "normalize", None)
    return norm if isinstance(norm, bool) else router.k > 1


def _check_matchable(layer) -> TopKRouter:
    where = "torchtitan_peer"
    if not isinstance(layer, MoELayer):
        raise TypeError(f"{where}: layer must be a tutorial_moe.MoELayer, got {type(layer).__name__}")
    if layer.experts.kind != "swiglu":
        raise ValueError(f"{where}: layer has expert={layer.experts.kind!r}; torchtitan's GroupedExperts is a SwiGLU "
                         f"bank, so build the layer with expert='swiglu'")
    router = layer.router
    if type(router) is not TopKRouter or not isinstance(router.gate, nn.Linear) or router.gate.bias is not None:
        raise ValueError(f"{where}: layer.router is {type(router).__name__}; only the default TopKRouter with a "
                         f"bias-free linear gate has a torchtitan counterpart (TokenChoiceTopKRouter)")
    bad = {"noisy": (router.noisy, False), "temperature": (router.temperature, 1.0),
           "capacity_factor": (router.capacity_factor, None),
           "bias_update_rate": (getattr(router, "bias_update_rate", 0.0), 0.0)}
    for name, (value, allowed) in bad.items():
        if value != allowed:
            raise ValueError(f"{where}: router {name}={value!r}; torchtitan's TokenChoiceTopKRouter has no "
                             f"equivalent, so only {name}={allowed!r} can be matched")
    bias = getattr(router, "expert_bias", None)
    if isinstance(bias, torch.Tensor) and bool(bias.detach().abs().max() > 0):
        raise ValueError(f"{where}: router expert_bias is non-zero (max |b| = {float(bias.abs().max()):.3g}); "
                         f"torchtitan adds its bias to the scores after softmax, ours to the logits, so only "
                         f"an unbiased router can be matched")
    return router


def load_into_torchtitan(peer, layer: MoELayer, experts: range | None = None) -> None:
    """Copy ``layer``'s router and expert weights into torchtitan module ``peer`` (in place).

    ``experts``: which of our experts ``peer`` holds (a contiguous range, for an expert-parallel
    shard); default all. Weights are transposed into torchtitan's (out, in) layout.
    """
    where = "load_into_torchtitan"
    _check_matchable(layer)
    E = layer.num_experts
    experts = range(E) if experts is None else experts
    if not isinstance(experts, range) or experts.step != 1 or experts.start < 0 or experts.stop > E:
        raise ValueError(f"{where}: experts={experts!r} must be a contiguous range inside range({E})")
    inner = peer.routed_experts.inner_experts
    if inner.w1_EFD.shape[0] != len(experts):
        raise ValueError(f"{where}: peer holds {inner.w1_EFD.shape[0]} experts but experts={experts!r} has {len(experts)}")
    sl = slice(experts.start, experts.stop)
    bank = layer.experts
    with torch.no_grad():
        peer.router.gate.weight.copy_(layer.router.gate.weight)
        inner.w1_EFD.copy_(bank.w_gate[sl].transpose(1, 2))
        inner.w3_EFD.copy_(bank.w_up[sl].transpose(1, 2))
        inner.w2_EDF.copy_(bank.w_down[sl].transpose(1, 2))


def torchtitan_peer(layer: MoELayer, precision: str = "float", expert_parallel: bool = False,
                    experts: range | None = None):
    """torchtitan's ``MoE`` module computing what ``layer`` computes, with ``layer``'s weights.

    ``precision="float"`` runs the experts in the input's dtype (torchtitan's grouped matmuls
    without the bfloat16 casts); ``"bfloat16"`` is ``GroupedExperts`` exactly as shipped. The
    peer takes ``(batch, seq, d_model)`` input, in the dtype and on the device of ``layer``.
    """
    router = _check_matchable(layer)
    check_choice("precision", precision, PRECISIONS, where="torchtitan_peer")
    local = None if experts is None else len(experts)
    cfg = torchtitan_config(layer.d_model, layer.d_hidden, layer.num_experts, router.k, route_norm=_route_norm(router),
                            precision=precision, expert_parallel=expert_parallel, local_experts=local)
    ref = layer.experts.w_gate
    peer = cfg.build().to(device=ref.device, dtype=ref.dtype)
    load_into_torchtitan(peer, layer, experts)
    return peer


def _run_peer(peer, x3: torch.Tensor) -> torch.Tensor:
    # Kept as one seam for the tests and the EP ranks (the CPU-autocast warning is filtered
    # once, in import_torchtitan).
    return peer(x3)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0


_GRAD_PAIRS = (("router_grad", "router.gate.weight", None), ("w_gate_grad", "routed_experts.inner_experts.w1_EFD", "w_gate"),
               ("w_up_grad", "routed_experts.inner_experts.w3_EFD", "w_up"),
               ("w_down_grad", "routed_experts.inner_experts.w2_EDF", "w_down"))


def torchtitan_equivalence(layer: MoELayer, x: torch.Tensor, precision: str = "float", seed: int = 0) -> dict:
    """Run ``layer`` and its torchtitan peer on the same tokens; compare outputs and gradients.

    ``x``: (tokens, d_model) or (batch, seq, d_model). Both get the loss ``sum(out * g)`` for a
    fixed random ``g`` (seeded by ``seed``), so every gradient is exercised with a non-trivial
    upstream. Returns ``{"absolute": {...}, "relative": {...}, "dtype", "precision", "tokens",
    "torchtitan"}``: max |ours - theirs| of the output, the input gradient, the router gate's
    gradient and each expert weight's gradient (compared in our layout), and each divided by the
    largest |value| of our quantity. ``layer``'s own gradients are cleared and left filled.
    """
    where = "torchtitan_equivalence"
    _check_matchable(layer)
    check_choice("precision", precision, PRECISIONS, where=where)
    check_int("seed", seed, low=0, where=where)
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) or x.shape[-1] != layer.d_model:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{where}: x must be (tokens, {layer.d_model}) or (batch, seq, {layer.d_model}), got {shape}")
    peer = torchtitan_peer(layer, precision)
    x3 = x.detach().reshape(1, -1, layer.d_model) if x.dim() == 2 else x.detach()
    g = torch.randn(x3.shape, generator=torch.Generator().manual_seed(seed)).to(x3)

    ours_x = x3.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    ours = layer(ours_x)
    (ours * g).sum().backward()

    theirs_x = x3.clone().requires_grad_(True)
    theirs = _run_peer(peer, theirs_x)
    (theirs * g).sum().backward()

    params = dict(peer.named_parameters())
    absolute = {"output": _max_abs(ours, theirs), "input_grad": _max_abs(ours_x.grad, theirs_x.grad)}
    scale = {"output": float(ours.detach().abs().max()), "input_grad": float(ours_x.grad.abs().max())}
    for key, tt_name, our_name in _GRAD_PAIRS:
        mine = layer.router.gate.weight.grad if our_name is None else getattr(layer.experts, our_name).grad
        other = params[tt_name].grad
        other = other if our_name is None else other.transpose(1, 2)
        absolute[key] = _max_abs(mine, other)
        scale[key] = float(mine.abs().max())
    relative = {n: (v / scale[n] if scale[n] > 0 else v) for n, v in absolute.items()}
    return {"absolute": absolute, "relative": relative, "dtype": str(x3.dtype).replace("torch.", ""),
            "precision": precision, "tokens": int(x3.shape[0] * x3.shape[1]),
            "torchtitan": import_torchtitan().version}


# ----------------------------------------------------------------------------- expert parallelism

def _ep_rank(tokens_per_rank, d_model, d_hidden, num_experts, k, seed, precision, timeout_s):
    """One rank of :func:`torchtitan_expert_parallel` (runs under ``run_ranks``)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from .parallel import expert_shard, init_distributed

    rank, W, device = init_distributed("gloo", timeout_s)
    tt = import_torchtitan()
    from torchtitan.distributed import utils as tt_dist

    previous = tt_dist.get_spmd_backend()
    # The default backend ("spmd_types") exchanges uneven splits with dist.all_to_all on lists of
    # tensors, which gloo refuses; "partial_dtensor" makes the dispatcher call the functional
    # all_to_all_single (the same collective torchtitan uses under torch.compile).
    tt_dist.set_spmd_backend("partial_dtensor")
    try:
        torch.manual_seed(seed)  # every rank builds the same reference layer and the same global batch
        layer = MoELayer(d_model, d_hidden, num_experts, k, expert="swiglu", dispatch="dense", losses={})
        x_full = torch.randn(W * tokens_per_rank, d_model)
        g_full = torch.randn(W * tokens_per_rank, d_model)
        x_ref = x_full.clone().requires_grad_(True)
        out_ref = layer(x_ref)
        (out_ref * g_full).sum().backward()
        out_ref = out_ref.detach()

        mine = expert_shard(num_experts, W, rank)
        peer = torchtitan_peer(layer, precision, expert_parallel=True, experts=mine)
        mesh = init_device_mesh("cpu", (W,), mesh_dim_names=("ep",))
        dispatcher = peer.routed_experts.token_dispatcher
        dispatcher.wire_meshes(ep_mesh=mesh)
        sent = []
        exchange = dispatcher._dispatch_token_exchange

        def counted(routed_input, pg, output_splits, input_splits):
            # What this rank hands the dispatch all-to-all: rows per destination rank.
            sent.append([int(n) for n in input_splits])
            return exchange(routed_input, pg, output_splits, input_splits)

        dispatcher._dispatch_token_exchange = counted
        rows = slice(rank * tokens_per_rank, (rank + 1) * tokens_per_rank)
        x_mine = x_full[rows].clone().reshape(1, tokens_per_rank, d_model).requires_grad_(True)
        out = _run_peer(peer, x_mine).reshape(tokens_per_rank, d_model)
        (out * g_full[rows]).sum().backward()

        params = dict(peer.named_parameters())
        router_grad = params["router.gate.weight"].grad.clone()
        dist.all_reduce(router_grad)  # data parallelism over the token shards sums the replicated router's gradient
        diffs = [_max_abs(out, out_ref[rows]), _max_abs(x_mine.grad.reshape(tokens_per_rank, d_model), x_ref.grad[rows]),
                 _max_abs(router_grad, layer.router.gate.weight.grad)]
        shard = slice(mine.start, mine.stop)
        for _, tt_name, our_name in _GRAD_PAIRS[1:]:
            diffs.append(_max_abs(params[tt_name].grad.transpose(1, 2), getattr(layer.experts, our_name).grad[shard]))
        diffs = torch.tensor(diffs, dtype=torch.float64)
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        matrix = [torch.zeros(W, dtype=torch.int64) for _ in range(W)]
        dist.all_gather(matrix, torch.tensor(sent[0], dtype=torch.int64))
        names = ("output", "input_grad", "router_grad", "w_gate_grad", "w_up_grad", "w_down_grad")
        result = {"absolute": dict(zip(names, diffs.tolist())), "world_size": W, "backend": dist.get_backend(),
                  "spmd_backend": "partial_dtensor", "rows_sent": [m.tolist() for m in matrix],
                  "dispatcher": type(dispatcher).__name__, "precision": precision}
        dist.barrier()
        return result if rank == 0 else None
    finally:
        tt_dist.set_spmd_backend(previous)
        if dist.is_initialized():
            dist.destroy_process_group()


def torchtitan_expert_parallel(world_size: int = 2, tokens_per_rank: int = 64, d_model: int = 32, d_hidden: int = 64,
                               num_experts: int = 4, k: int = 2, seed: int = 0, precision: str = "float",
                               timeout_s: float = 120.0) -> dict:
    """torchtitan's expert-parallel MoE on ``world_size`` local gloo ranks, checked against one process.

    Every rank builds the same ``MoELayer`` (SwiGLU, dense dispatch: the oracle) and global
    batch; rank r holds experts ``expert_shard(E, W, r)`` inside torchtitan's ``MoE`` with its
    ``AllToAllTokenDispatcher`` wired to a 1-D ``"ep"`` device mesh, and runs its own slice of the
    tokens forward and backward. Returns (from rank 0) the max |difference| over all ranks of the
    outputs, input gradients, the router gradient (summed over ranks, as data parallelism would)
    and each local expert weight's gradient, plus ``rows_sent[r][s]``: rows rank r handed the
    dispatch all-to-all for rank s, read from the split sizes torchtitan passes the collective.
    Forks processes (:func:`tutorial_moe.parallel.run_ranks`): call it from a script or a test,
    not from a notebook kernel.
    """
    from .parallel import run_ranks

    where = "torchtitan_expert_parallel"
    check_int("world_size", world_size, low=1, where=where)
    check_int("tokens_per_rank", tokens_per_rank, low=1, where=where)
    check_int("num_experts", num_experts, low=1, where=where)
    check_int("k", k, low=1, high=num_experts, where=where)
    check_choice("precision", precision, PRECISIONS, where=where)
    timeout_s = check_positive_float("timeout_s", timeout_s, where=where)
    if num_experts % world_size:
        raise ValueError(f"{where}: num_experts={num_experts} must be a multiple of world_size={world_size}")
    import_torchtitan()  # fail here, with the install hint, rather than inside every rank
    results = run_ranks(_ep_rank, world_size, args=(tokens_per_rank, d_model, d_hidden, num_experts, k, seed, precision,
                                                    timeout_s), timeout_s=timeout_s)
    return results[0]


# ----------------------------------------------------------------------------- the script

def torchtitan_report(tokens: int = 256, d_model: int = 32, d_hidden: int = 64, num_experts: int = 8, k: int = 2,
                      seed: int = 0, expert_parallel: bool = True, world_size: int = 2,
                      timeout_s: float = 120.0) -> dict:
    """Everything chapter 16 shows about torchtitan, in one dict (what ``python -m tutorial_moe.peers`` prints).

    ``equivalence``: :func:`torchtitan_equivalence` for float32 and float64 with
    ``precision="float"`` and for float32 with the stock bfloat16 experts, each on a fresh
    SwiGLU ``MoELayer`` seeded by ``seed``; ``expert_parallel``: :func:`torchtitan_expert_parallel`
    on ``world_size`` gloo ranks (forks processes; ``None`` when ``expert_parallel=False``).
    """
    where = "torchtitan_report"
    check_int("tokens", tokens, low=1, where=where)
    runs = {"float32": (torch.float32, "float"), "float64": (torch.float64, "float"),
            "float32, stock bfloat16 experts": (torch.float32, "bfloat16")}
    equivalence = {}
    for name, (dtype, precision) in runs.items():
        torch.manual_seed(seed)
        layer = MoELayer(d_model, d_hidden, num_experts, k, expert="swiglu", losses={}).to(dtype)
        x = torch.randn(tokens, d_model, dtype=dtype)
        equivalence[name] = torchtitan_equivalence(layer, x, precision=precision, seed=seed)
    ep = None
    if expert_parallel:
        ep = torchtitan_expert_parallel(world_size, max(1, tokens // world_size), d_model, d_hidden, num_experts, k,
                                        seed, "float", timeout_s)
    shape = {"tokens": tokens, "d_model": d_model, "d_hidden": d_hidden, "num_experts": num_experts, "k": k}
    return {"torchtitan": import_torchtitan().version, "shape": shape, "defaults": torchtitan_defaults(),
            "equivalence": equivalence, "expert_parallel": ep}


def main(argv: list[str] | None = None) -> int:
    """``python -m tutorial_moe.peers [--json PATH] [--no-expert-parallel] ...``: run :func:`torchtitan_report`."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m tutorial_moe.peers",
                                     description="MoELayer vs torchtitan's MoE: outputs, gradients, expert parallelism")
    parser.add_argument("--json", help="write the report here as JSON (default: print it)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--d-hidden", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-expert-parallel", action="store_true", help="skip the gloo ranks")
    args = parser.parse_args(argv)
    if not torchtitan_available():
        print(_INSTALL_HINT, file=sys.stderr)
        return 3
    torch.set_num_threads(1)
    report = torchtitan_report(args.tokens, args.d_model, args.d_hidden, args.experts, args.k, args.seed,
                               not args.no_expert_parallel, args.world_size)
    text = json.dumps(report, indent=1)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

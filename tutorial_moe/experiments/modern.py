"""Chapter 13: how 2024-2026 MoE layers are built, measured on chapter 11's language model.

Every variant is chapter 11's :class:`~tutorial_moe.experiments.lm.TinyLM` with the feed-forward
layer of each block replaced by a different MoE layer, at equal active expert compute:

* ``baseline``: 4 experts of width 128, top-2, softmax router, Switch loss 0.01, no capacity
  (dropless); the shape of Mixtral's layer (8 experts, top-2) at toy size.
* ``fine_grained`` / ``fine_grained_m4``: DeepSeekMoE's segmentation (arXiv 2401.06066) at
  granularity m = 2 (8 experts of width 64, top-4) and m = 4 (16 of width 32, top-8).
* ``shared``: m = 2 with one of the fine experts made shared (1 shared + 7 routed, top-3).
* ``sigmoid_bias``: DeepSeek-V3's router (arXiv 2412.19437): sigmoid affinities, a
  selection-only bias moved by ``update_expert_bias`` (rate 1e-3, the paper's), no auxiliary loss.
* ``capacity_1.0`` / ``capacity_1.25``: the baseline with a capacity factor (tokens dropped).
* ``micro`` / ``global``: gradient accumulation over micro-batches with the Switch loss computed
  per micro-batch or over the whole accumulated batch (Qwen, arXiv 2501.11873), see
  :func:`train_accumulated`.

The embeddings, attention and read-out of a seed's models start identical across variants (the
model is built from the seed first, the feed-forward layers after); every variant of a seed sees
the same batches.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validate import check_choice, check_int
from ..balance import GlobalBalanceLoss
from ..metrics import specialization
from ..moe import MoELayer, moe_modules
from ..routing import TopKRouter
from ..runtime import seed_everything
from ..shared_experts import SharedExpertMoE, fine_grained
from .corpus import sample_batch
from .lm import LMConfig, TinyLM, collect_lm_routing, evaluate_lm, lm_loss, train_lm

__all__ = ["BASE", "VARIANTS", "ACCUMULATED", "make_ffn", "build_model", "active_counts", "max_violation",
           "dropped_share", "domain_specialisation", "train_accumulated", "RunResult", "run_variant"]

#: The chapter-11 model the variants share (d_hidden is the baseline expert's width).
BASE = LMConfig(context=32, d_model=64, n_layers=2, n_heads=4, ffn="moe", d_hidden=128, num_experts=4, k=2)
#: Variants trained with ``train_lm`` (the package's ``fit``).
VARIANTS = ("baseline", "fine_grained", "fine_grained_m4", "shared", "sigmoid_bias", "capacity_1.0",
            "capacity_1.25")
#: Variants trained by :func:`train_accumulated` (gradient accumulation).
ACCUMULATED = ("micro", "global")
SWITCH = {"switch": 0.01}
BIAS_RATE = 1e-3


def make_ffn(variant: str, cfg: LMConfig = BASE) -> nn.Module:
    """One feed-forward layer of ``variant`` (see the module docstring) for a model shaped ``cfg``."""
    check_choice("variant", variant, VARIANTS + ACCUMULATED, where="make_ffn")
    d, f, E, k = cfg.d_model, cfg.d_hidden, cfg.num_experts, cfg.k
    if variant in ("baseline",):
        return MoELayer(d, f, E, k, losses=dict(SWITCH))
    if variant in ACCUMULATED:  # the balance loss is added by the training loop
        return MoELayer(d, f, E, k, losses={})
    if variant.startswith("fine_grained"):
        m = 4 if variant.endswith("m4") else 2
        return fine_grained(d, f, E, k, granularity=m).build(losses=dict(SWITCH))
    if variant == "shared":
        return fine_grained(d, f, E, k, granularity=2, num_shared=1).build(losses=dict(SWITCH))
    if variant == "sigmoid_bias":
        router = TopKRouter(d, E, k, scoring="sigmoid", bias_update_rate=BIAS_RATE)
        return MoELayer(d, f, E, k, router=router, losses={})
    cf = float(variant.split("_")[1])
    return MoELayer(d, f, E, k, capacity_factor=cf, losses=dict(SWITCH))


def build_model(variant: str, seed: int, cfg: LMConfig = BASE) -> TinyLM:
    """A TinyLM whose every feed-forward layer is ``make_ffn(variant)``; the rest of the model is
    the same for every variant of a seed."""
    torch.manual_seed(seed)
    model = TinyLM(cfg)
    torch.manual_seed(10_000 + seed)
    for block in model.blocks:
        block.ffn = make_ffn(variant, cfg)
    return model


def _inner(ffn: nn.Module) -> MoELayer:
    return ffn.moe if isinstance(ffn, SharedExpertMoE) else ffn


def active_counts(model: TinyLM) -> dict:
    """Expert parameters per model: ``total`` stored and ``active`` per token (shared experts
    count fully, routed ones k/E), and expert ``macs`` per token (2 * d * width per expert used)."""
    total = active = macs = 0
    for block in model.blocks:
        ffn = block.ffn
        moe = _inner(ffn)
        routed = sum(p.numel() for p in moe.experts.parameters())
        total += routed
        active += routed * moe.k / moe.num_experts
        macs += moe.k * 2 * moe.d_model * moe.d_hidden
        if isinstance(ffn, SharedExpertMoE):
            shared = sum(p.numel() for p in ffn.shared.parameters())
            total += shared
            active += shared
            macs += ffn.num_shared * 2 * moe.d_model * ffn.shared.w1.shape[-1]
    return {"total": int(total), "active": int(round(active)), "macs": int(macs)}


def max_violation(mask: torch.Tensor) -> float:
    """DeepSeek's MaxVio: (max load - mean load) / mean load over experts, from a (T, E) choice
    mask. 0 is perfect balance; E - 1 is everything on one expert (at k = 1)."""
    load = mask.sum(0).double()
    mean = load.mean()
    return float((load.max() - mean) / mean) if mean > 0 else 0.0


@torch.no_grad()
def dropped_share(model: TinyLM, split, max_windows: int = 64) -> float:
    """Share of the router's (token, expert) choices that capacity dropped, on validation windows
    (forward batches of 64 windows), averaged over the MoE layers."""
    from .corpus import eval_windows

    x, _, d = eval_windows(split, model.cfg.context, max_windows=max_windows)
    was = model.training
    model.eval()
    chosen = kept = 0
    for s in range(0, len(x), 64):
        model(x[s:s + 64], d[s:s + 64])
        for m in moe_modules(model):
            r = m.last_routing
            chosen += int(r.chosen_mask.sum())
            kept += int(r.mask.sum())
    model.train(was)
    return 1 - kept / chosen if chosen else 0.0


def domain_specialisation(model: TinyLM, split, max_windows: int = 64, routing=None) -> float:
    """Normalised mutual information between expert and domain, mean over MoE layers
    (``routing``: the output of ``collect_lm_routing``, to reuse one pass)."""
    layers = routing if routing is not None else collect_lm_routing(model, split, max_windows=max_windows)
    per = [specialization(r["mask"], r["domain"]) for r in layers]
    return sum(per) / len(per)


def train_accumulated(model: TinyLM, split, steps: int, *, balance: str, batch_size: int = 32,
                      micro_batches: int = 4, weight: float = 0.01, lr: float = 6e-3, seed: int = 0,
                      clip_grad: float = 1.0, callback=None) -> list[float]:
    """Adam steps over batches of ``batch_size`` windows, each split into ``micro_batches``
    micro-batches whose gradients accumulate (one backward per step, see
    :class:`~tutorial_moe.balance.GlobalBalanceLoss`).

    The windows of a step are ordered by domain before the split, so a micro-batch holds mostly
    one domain, as it does when it is a few long documents from one source. ``balance="micro"``
    adds the mean of each micro-batch's own Switch loss; ``"global"`` the Switch loss of the whole
    step's batch. Draws the same windows as ``train_lm`` with the same seed. Returns the task
    loss per step.
    """
    where = "train_accumulated"
    check_choice("balance", balance, ("micro", "global"), where=where)
    check_int("steps", steps, low=1, where=where)
    M = check_int("micro_batches", micro_batches, low=1, high=batch_size, where=where)
    if batch_size % M:
        raise ValueError(f"{where}: batch_size={batch_size} must be divisible by micro_batches={M}")
    gen = seed_everything(seed)
    x, y, d = sample_batch(split, steps * batch_size, model.cfg.context, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    acc = GlobalBalanceLoss()
    losses = []
    model.train()
    for step in range(steps):
        sl = slice(step * batch_size, (step + 1) * batch_size)
        order = torch.argsort(d[sl, 0], stable=True)
        xb, yb, db = x[sl][order], y[sl][order], d[sl][order]
        task = 0.0
        for xm, ym, dm in zip(xb.chunk(M), yb.chunk(M), db.chunk(M)):
            task = task + lm_loss(model(xm, dm), ym) / M
            acc.add_model(model)
        bal = acc.loss() if balance == "global" else acc.micro_batch_loss()
        opt.zero_grad(set_to_none=True)
        (task + weight * bal).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        opt.step()
        acc.reset()
        losses.append(float(task.detach()))
        if callback is not None:
            callback(step, model)
    return losses


@dataclass
class RunResult:
    """One trained variant of one seed: validation loss, balance and timing."""

    variant: str
    seed: int
    val_loss: float
    per_domain: dict
    max_vio: float  # on validation windows, mean over layers
    specialisation: float
    dropped: float
    cpu_seconds: float
    counts: dict
    bias_trace: list = field(default_factory=list)  # (steps, E) expert_bias of layer 0 (sigmoid_bias)
    vio_trace: list = field(default_factory=list)  # MaxVio of layer 0 per training step


def _val_max_violation(layers) -> float:
    per = [max_violation(r["mask"]) for r in layers]
    return sum(per) / len(per)


def run_variant(variant: str, seed: int, split_train, split_val, steps: int, *, batch_size: int = 32,
                domain_names=None) -> RunResult:
    """Build, train and measure one variant for one seed."""
    model = build_model(variant, seed)
    bias_trace, vio_trace = [], []
    first = moe_modules(model)[0]

    def record(*_):
        vio_trace.append(max_violation(first.last_routing.chosen_mask))
        router = first.router
        if getattr(router, "bias_update_rate", 0) > 0:
            bias_trace.append(router.expert_bias.tolist())

    start = time.process_time()
    if variant in ACCUMULATED:
        train_accumulated(model, split_train, steps, balance=variant, batch_size=batch_size, seed=seed,
                          callback=record)
    else:
        train_lm(model, split_train, steps, batch_size=batch_size, seed=seed, show_progress=False,
                 callback=record)
    cpu = time.process_time() - start
    ev = evaluate_lm(model, split_val, domain_names=domain_names)
    layers = collect_lm_routing(model, split_val, max_windows=64)
    return RunResult(variant, seed, ev["loss"], ev["per_domain"], _val_max_violation(layers),
                     domain_specialisation(model, split_val, routing=layers), dropped_share(model, split_val),
                     cpu, active_counts(model), bias_trace, vio_trace)

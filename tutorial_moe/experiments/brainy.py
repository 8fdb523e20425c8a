"""Brainy (seed 000): a digit classifier, first dense, then a Mixture of Experts.

The experiments of Part I (chapters 02-05) live here so that the notebooks only tell the story:

* :func:`dense_brainy`, :func:`brainy_moe`, :func:`seed003_soft_moe` build the models;
* :func:`count_parameters`, :func:`macs_per_sample` measure their size and cost;
* :func:`gate_gradient_norms`, :func:`gate_snapshot`, :func:`gate_drift` show that a gate learns;
* :func:`train_digit_specialists` trains "one expert per digit" (chapter 04);
* :func:`regime_schedule`, :func:`train_regime`, :func:`accuracy_at_every_k` run seed 000's three
  top-k regimes (chapter 05); :func:`summarize` reports mean, spread and range over seeds (the
  book's evidence protocol, ``tutorial_moe.book.evidence``, judges differences); :func:`time_top_k` times sparse vs dense inference.

Images are (N, 1, S, S) floats in [0, 1], labels (N,) int64 in 0..9.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validate import check_choice, check_int, check_positive_float
from ..experts import ConvExpert, MLPExpert
from ..metrics import collapse_report, routing_entropy, specialization, utilization
from ..moe import MoE
from ..multiseed import register_stacking
from ..routing import SoftmaxRouter, TopKRouter
from ..schedules import constant_k, gradual_detachment, k_per_epoch
from ..train import collect_routing, fit, router_parameters, set_k

__all__ = [
    "count_parameters",
    "macs_per_sample",
    "predict",
    "dense_brainy",
    "dense_width_for",
    "conv_brainy",
    "FlattenGate",
    "brainy_moe",
    "seed003_soft_moe",
    "gate_gradient_norms",
    "gate_snapshot",
    "gate_drift",
    "auroc",
    "train_digit_specialists",
    "routing_summary",
    "RoutingTrace",
    "REGIMES",
    "BALANCE_LOSSES",
    "regime_schedule",
    "RegimeRun",
    "train_regime",
    "train_schedule",
    "accuracy_at_every_k",
    "summarize",
    "time_top_k",
]


# ----------------------------------------------------------------------------- size and cost


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_parameters: model must be an nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def macs_per_sample(model: nn.Module, x: torch.Tensor, *args) -> float:
    """Multiply-adds per sample of every ``nn.Linear`` and ``nn.Conv2d`` that runs in ``model(x)``.

    Counted with forward hooks on a real forward pass (eval mode), so sparse routing counts only the
    rows an expert actually processed: an MoE with ``dispatch="loop"`` at k=3 of 6 costs about half
    of the same MoE with ``dispatch="dense"``. Element-wise work (activations, softmax, the weighted
    sum) is not counted; it is small next to the matrix products.

    x: (N, ...) a batch; the total is divided by N.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"macs_per_sample: x must be a non-empty batch tensor (N, ...), got {getattr(x, 'shape', x)!r}")
    total = 0

    def linear_hook(mod, inputs, output):
        nonlocal total
        rows = inputs[0].numel() // mod.in_features
        total += rows * mod.in_features * mod.out_features

    def conv_hook(mod, inputs, output):
        nonlocal total
        kh, kw = mod.kernel_size
        total += output.numel() * (mod.in_channels // mod.groups) * kh * kw

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
    was_training = model.training
    model.eval()
    try:
        model(x.to(_device_of(model)), *args)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total / x.shape[0]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``model``'s outputs for ``x`` (N, ...) in eval mode, in batches, wherever the model lives
    (CPU or GPU); returned on the CPU as (N, C). The model's training mode is restored."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"predict: x must be a batch tensor (N, ...), got {type(x).__name__}")
    check_int("batch_size", batch_size, low=1, where="predict")
    dev = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i:i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ----------------------------------------------------------------------------- models


def dense_brainy(hidden: int = 128, depth: int = 1, image_size: int = 28, num_classes: int = 10) -> MLPExpert:
    """The dense baseline: flatten - Linear(S*S, hidden) - GELU - ... - Linear(hidden, 10) logits."""
    check_int("image_size", image_size, low=1, where="dense_brainy")
    return MLPExpert(image_size * image_size, hidden, num_classes, depth=depth)


def _mlp_params(d_in: int, hidden: int, d_out: int, depth: int) -> int:
    return d_in * hidden + hidden + (depth - 1) * (hidden * hidden + hidden) + hidden * d_out + d_out


def dense_width_for(num_params: int, image_size: int = 28, depth: int = 1, num_classes: int = 10) -> int:
    """The hidden width whose dense Brainy has the parameter count closest to ``num_params``.

    Used to compare an MoE with a dense net "at equal parameter count".
    """
    check_int("num_params", num_params, low=1, where="dense_width_for")
    d_in = image_size * image_size
    best, best_gap = 1, math.inf
    h = 1
    while True:
        n = _mlp_params(d_in, h, num_classes, depth)
        gap = abs(n - num_params)
        if gap < best_gap:
            best, best_gap = h, gap
        if n > num_params:
            return best
        h += 1


def conv_brainy(channels: int = 8, hidden: int = 128, kernel: int = 5, image_size: int = 28,
                num_classes: int = 10) -> nn.Sequential:
    """Brainy with one convolution in front (chapter 02): Conv2d(1, channels, kernel, stride 2) -
    ReLU - flatten - Linear(., hidden) - ReLU - Linear(hidden, 10) logits.

    Still dense in the MoE sense: every weight works on every image. The convolution's few
    weights are reused at every position of the image, so the network costs more multiply-adds
    per image than it has parameters (an MoE goes the other way).
    """
    where = "conv_brainy"
    for name, value in (("channels", channels), ("hidden", hidden), ("num_classes", num_classes)):
        check_int(name, value, low=1, where=where)
    check_int("kernel", kernel, low=1, where=where)
    check_int("image_size", image_size, low=kernel, where=where)
    side = (image_size - kernel) // 2 + 1  # positions of a stride-2 window without padding
    return nn.Sequential(
        nn.Conv2d(1, channels, kernel, stride=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(channels * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes),
    )


class FlattenGate(nn.Module):
    """A linear gate reading whole images: flatten - bias-free Linear(S*S, E) -> (N, E) logits.

    Initialised like the package's default gate (normal, std 0.02), so at step 0 it is nearly
    uniform: the gate "knows nothing" (seed 000's cold start).
    """

    def __init__(self, in_features: int, num_experts: int, hidden: int | None = None):
        super().__init__()
        check_int("in_features", in_features, low=1, where="FlattenGate")
        check_int("num_experts", num_experts, low=1, where="FlattenGate")
        self.in_features = in_features
        if hidden is None:
            self.net = nn.Linear(in_features, num_experts, bias=False)
            nn.init.normal_(self.net.weight, std=0.02)
        else:
            check_int("hidden", hidden, low=1, where="FlattenGate")
            self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"FlattenGate: input has {x.shape[1]} features (shape {tuple(x.shape)}), expected {self.in_features}")
        return self.net(x)


# fit_seeds stacks a FlattenGate as what it computes: flatten, then its net.
register_stacking(FlattenGate, lambda gate: nn.Sequential(nn.Flatten(), gate.net))


def brainy_moe(num_experts: int = 6, hidden: int = 32, k: int | None = None, *, image_size: int = 28,
               expert: str = "mlp", conv_width: int = 32, gate_hidden: int | None = None, combine: str = "probs",
               dispatch: str = "dense", losses: dict | None = None, num_classes: int = 10) -> MoE:
    """Brainy as a Mixture of Experts: E whole-image classifiers and a gate reading the same image.

    k=None: a soft gate (``SoftmaxRouter``; every expert, softmax weights). k=int: ``TopKRouter``
    with k (settable later, e.g. by a k schedule). expert="mlp": ``MLPExpert(S*S, hidden, 10)``;
    expert="conv": ``ConvExpert(width=conv_width, fc=hidden)`` (FULL mode, to reach 99 %).
    combine="probs" mixes the experts' probabilities, as seed 000 describes.
    """
    where = "brainy_moe"
    check_int("num_experts", num_experts, low=1, where=where)
    check_choice("expert", expert, ("mlp", "conv"), where=where)
    d_in = image_size * image_size
    if expert == "mlp":
        experts = [MLPExpert(d_in, hidden, num_classes) for _ in range(num_experts)]
    else:
        experts = [ConvExpert(1, num_classes, width=conv_width, fc=hidden, image_size=image_size)
                   for _ in range(num_experts)]
    gate = FlattenGate(d_in, num_experts, gate_hidden)
    if k is None:
        router = SoftmaxRouter(None, num_experts, gate=gate)
    else:
        router = TopKRouter(None, num_experts, k, gate=gate)
    return MoE(experts, router, dispatch=dispatch, combine=combine, losses=losses)


def seed003_soft_moe(num_experts: int = 4, units: int = 32, image_size: int = 28, num_classes: int = 10) -> nn.Sequential:
    """Seed 003's soft MoE layer, rebuilt in PyTorch, in front of a linear read-out.

    Each expert is one dense layer with ReLU (``units`` features); the gate is a dense layer with
    a softmax over the experts; the layer returns the gate-weighted sum of the experts' features
    (``combine="logits"`` sums raw outputs). A final Linear(units, 10) reads the digit out, as the
    seed's example puts a Dense layer after its MoE layer.
    """
    d_in = image_size * image_size
    experts = [nn.Sequential(nn.Linear(d_in, units), nn.ReLU()) for _ in range(num_experts)]
    layer = MoE(experts, SoftmaxRouter(d_in, num_experts), dispatch="dense", combine="logits")
    return nn.Sequential(nn.Flatten(), layer, nn.Linear(units, num_classes))


# ----------------------------------------------------------------------------- does the gate learn?


def gate_gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """One forward/backward of the task loss; L2 norms of the gradients of the gate and of the rest.

    The model's existing ``.grad`` fields are left as they were.
    """
    gate = router_parameters(model)
    if not gate:
        raise ValueError("gate_gradient_norms: model has no router parameters (no MoE module with a learned gate)")
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    dev = _device_of(model)
    F.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
    gate_ids = {id(p) for p in router_parameters(model)}
    norm = lambda ps: float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in ps if p.grad is not None)))  # noqa: E731
    return {"gate": norm([p for p in model.parameters() if id(p) in gate_ids]),
            "experts": norm([p for p in model.parameters() if id(p) not in gate_ids])}


def gate_snapshot(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the gate's parameters (to measure later how far training moved them)."""
    return [p.detach().clone() for p in router_parameters(model)]


def gate_drift(model: nn.Module, snapshot: list[torch.Tensor]) -> float:
    """||gate now - gate at snapshot|| / ||gate at snapshot||: how far the gate has moved."""
    now = router_parameters(model)
    if len(now) != len(snapshot):
        raise ValueError(f"gate_drift: snapshot has {len(snapshot)} tensors but the model's gate has {len(now)}")
    diff = math.sqrt(sum(float(((a.detach() - b) ** 2).sum()) for a, b in zip(now, snapshot)))
    base = math.sqrt(sum(float((b ** 2).sum()) for b in snapshot))
    return diff / max(base, 1e-12)


# ----------------------------------------------------------------------------- one expert per digit


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative
    (ties count one half). 0.5 = the score cannot tell the two apart, 1.0 = it separates them.

    scores (N,) floats, positive (N,) bool with at least one positive and one negative.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    positive = torch.as_tensor(positive).flatten()
    if positive.dtype != torch.bool or positive.shape != scores.shape:
        raise ValueError(f"auroc: positive must be a bool tensor shaped like scores {tuple(scores.shape)}, "
                         f"got {positive.dtype} {tuple(positive.shape)}")
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc: needs both classes, got {n_pos} positives and {n_neg} negatives")
    # Mann-Whitney U from average ranks (ties share their mean rank).
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    uniq, inverse = scores.unique(return_inverse=True)
    mean_rank = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    mean_rank /= torch.bincount(inverse, minlength=len(uniq)).double()
    u = mean_rank[inverse][positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def train_digit_specialists(experts, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 3, batch_size: int = 64,
                            lr: float = 1e-3, seed: int = 0) -> list[dict]:
    """Train expert i on the images of digit i only (seed 000's first plan); returns per-expert histories.

    Each expert is an ordinary 10-way classifier; it only ever sees label i, so cross-entropy can
    be driven to zero by answering "i" whatever the image shows ("a world of only 1s").
    """
    experts = list(experts)
    out = []
    for digit, expert in enumerate(experts):
        keep = y == digit
        if not bool(keep.any()):
            raise ValueError(f"train_digit_specialists: no training image of digit {digit} for expert {digit}")
        hist = fit(expert, (x[keep], y[keep]), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed + digit,
                   show_progress=False)
        out.append({"digit": digit, "images": int(keep.sum()), "final_loss": hist.steps[-1]["task"]})
    return out


# ----------------------------------------------------------------------------- top-k regimes (chapter 05)

#: seed 000's three ways to use top-k: all experts in training; top-k from the first step; k 6,5,4,3,3,3.
REGIMES = ("helicopter", "tough_love", "gradual")

#: the balancing losses of chapter 05's "+ balance" runs (see :func:`train_regime`).
BALANCE_LOSSES = {"switch": 0.05, "importance": 0.05}


def regime_schedule(regime: str, num_experts: int = 6, k: int = 3):
    """``epoch -> k`` for one of :data:`REGIMES` (helicopter = E every epoch, tough_love = k every
    epoch, gradual = E, E-1, ..., k, then k)."""
    check_choice("regime", regime, REGIMES, where="regime_schedule")
    check_int("k", k, low=1, high=num_experts, where="regime_schedule")
    if regime == "helicopter":
        return constant_k(num_experts)
    if regime == "tough_love":
        return constant_k(k)
    return gradual_detachment(num_experts, k)


@dataclass
class RegimeRun:
    """One trained model of one regime, with what chapter 05 measures about it."""

    regime: str
    balance: bool
    seed: int
    model: nn.Module
    history: object
    seconds: float
    snapshots: list = field(default_factory=list)  # routing of a probe batch at chosen steps
    at_k: dict = field(default_factory=dict)  # k -> {"acc", "utilization", "collapsed", ...}

    @property
    def label(self) -> str:
        return f"{self.regime}{' + balance' if self.balance else ''}"


def routing_summary(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int | None = None) -> dict:
    """How ``model``'s (first) MoE routes the images ``x`` with labels ``y`` (eval mode, no training).

    utilization (E,): share of routed pairs per expert; top1_share (E,): share of images whose
    highest-weight expert is e; entropy: mean routing entropy in nats (ln E = undecided);
    specialization: NMI between routed experts and labels; top1_specialization: the same for the
    top-1 expert only (meaningful also for a soft gate, whose mask routes every image everywhere);
    top_k_mass (k -> mean gate probability held by each image's k best experts).
    """
    r = collect_routing(model, x)
    E = r.probs.shape[1]
    top1 = r.probs.argmax(-1)
    ranked = r.probs.sort(-1, descending=True).values.cumsum(-1)
    return {"step": step, "utilization": utilization(r.mask).tolist(),
            "top1_share": torch.bincount(top1, minlength=E).float().div(len(top1)).tolist(),
            "mean_prob": r.probs.mean(0).tolist(),
            "entropy": float(routing_entropy(r.probs)), "specialization": specialization(r.mask, y),
            "top1_specialization": specialization(F.one_hot(top1, E).bool(), y),
            "top_k_mass": {k + 1: float(ranked[:, k].mean()) for k in range(E)}}


class RoutingTrace:
    """A ``fit`` callback that records :func:`routing_summary` of a probe batch at chosen steps.

    ``trace = RoutingTrace(x, y, steps=[0, 10, 100])``; call ``trace.start(model)`` before training
    (step 0, the untrained gate), pass ``callback=trace`` to ``fit``; read ``trace.rows``.
    Step s means "after s optimiser steps".
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps):
        self.x, self.y = x, y
        self.steps = sorted({check_int("step", int(s), low=0, where="RoutingTrace") for s in steps})
        self.rows: list[dict] = []

    def start(self, model: nn.Module) -> "RoutingTrace":
        if 0 in self.steps:
            self.rows.append(routing_summary(model, self.x, self.y, 0))
        return self

    def __call__(self, row: dict, model: nn.Module) -> None:
        step = row["step"] + 1
        if step in self.steps:
            self.rows.append(routing_summary(model, self.x, self.y, step))


def train_regime(regime: str, train, test, *, balance: bool = False, seed: int = 0, epochs: int = 6,
                 num_experts: int = 6, k: int = 3, hidden: int = 32, image_size: int = 28, expert: str = "mlp",
                 batch_size: int = 128, lr: float = 2e-3, balance_losses: dict | None = None,
                 probe=None, snapshot_steps=(), eval_every_k: bool = True) -> RegimeRun:
    """Train Brainy-MoE under one of :data:`REGIMES` and evaluate it at every k.

    balance: add the balancing losses ``balance_losses``, by default :data:`BALANCE_LOSSES`: Switch's
    loss (arXiv 2101.03961) pushes probability off busy experts, reaching even experts that are never
    chosen, but it is a constant when k = E (every expert is in every mask); Shazeer et al.'s
    importance loss (arXiv 1701.06538) acts on the combine weights, so it also works when k = E.
    probe: (x, y) images whose routing is recorded at ``snapshot_steps`` (step 0 = before training).
    The returned model is left at the inference k.
    """
    check_choice("regime", regime, REGIMES, where="train_regime")
    schedule = regime_schedule(regime, num_experts, k)
    return _train_moe(regime, [schedule(e) for e in range(epochs)], train, test, balance=balance, seed=seed,
                      num_experts=num_experts, k=k, hidden=hidden, image_size=image_size, expert=expert,
                      batch_size=batch_size, lr=lr, balance_losses=balance_losses, probe=probe,
                      snapshot_steps=snapshot_steps, eval_every_k=eval_every_k, where="train_regime")


def train_schedule(ks, train, test, *, k: int | None = None, num_experts: int = 6, **kwargs) -> RegimeRun:
    """Train Brainy-MoE with training k = ``ks[epoch]`` for ``len(ks)`` epochs (any schedule, e.g.
    ``[6, 4, 3]``), then evaluate at every k. ``k`` is the inference k the model is left at (default:
    the schedule's last value). Other keyword arguments as in :func:`train_regime`.
    """
    if isinstance(ks, (str, bytes)) or not hasattr(ks, "__iter__"):
        raise TypeError(f"train_schedule: ks must be a list of ints, got {type(ks).__name__} {ks!r}")
    ks = list(ks)
    if not ks:
        raise ValueError("train_schedule: ks is empty; give one k per epoch, e.g. [6, 5, 4, 3]")
    for i, kk in enumerate(ks):
        check_int(f"ks[{i}]", kk, low=1, high=num_experts, where="train_schedule")
    k = ks[-1] if k is None else k
    return _train_moe("custom", ks, train, test, k=k, num_experts=num_experts, where="train_schedule", **kwargs)


def _train_moe(regime, ks, train, test, *, balance=False, seed=0, num_experts=6, k=3, hidden=32, image_size=28,
               expert="mlp", batch_size=128, lr=2e-3, balance_losses=None, probe=None, snapshot_steps=(),
               eval_every_k=True, where="train_regime") -> RegimeRun:
    if not isinstance(balance, bool):
        raise TypeError(f"{where}: balance must be a bool, got {type(balance).__name__} {balance!r}")
    check_int("k", k, low=1, high=num_experts, where=where)
    losses = dict(balance_losses or BALANCE_LOSSES) if balance else None
    torch.manual_seed(seed)
    model = brainy_moe(num_experts, hidden, k=ks[0], image_size=image_size, expert=expert, losses=losses)
    trace = None if probe is None else RoutingTrace(probe[0], probe[1], snapshot_steps).start(model)
    t0 = time.perf_counter()
    hist = fit(model, train, test=None, epochs=len(ks), batch_size=batch_size, lr=lr, k_schedule=k_per_epoch(ks),
               seed=seed, show_progress=False, callback=trace)
    seconds = time.perf_counter() - t0
    run = RegimeRun(regime, balance, seed, model, hist, seconds, [] if trace is None else trace.rows)
    if eval_every_k:
        run.at_k = accuracy_at_every_k(model, test)
    set_k(model, k)
    return run


@torch.no_grad()
def _outputs_and_mask(model: MoE, x: torch.Tensor, batch_size: int = 1024):
    """(N, C) outputs and (N, E) routing mask of ``model`` on ``x`` in eval mode, both on the CPU."""
    dev = _device_of(model)
    was_training = model.training
    model.eval()
    outs, masks = [], []
    try:
        for i in range(0, len(x), batch_size):
            outs.append(model(x[i:i + batch_size].to(dev)).cpu())
            masks.append(model.last_routing.mask.cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs), torch.cat(masks)


def accuracy_at_every_k(model: nn.Module, test, ks=None) -> dict:
    """{k: {"acc", "utilization" (E,), "collapsed", "dead", "load_imbalance"}} on ``test`` = (x, y).

    The model's k is restored afterwards. Nothing is trained.
    """
    router = model.router if isinstance(model, MoE) else None
    if router is None or not hasattr(router, "k"):
        raise ValueError("accuracy_at_every_k: model must be an MoE with a top-k router (router.k)")
    E, old_k = router.num_experts, router.k
    ks = list(range(1, E + 1)) if ks is None else list(ks)
    out = {}
    try:
        for kk in ks:
            router.k = kk
            logits, mask = _outputs_and_mask(model, test[0])  # one pass: predictions and routing
            acc = float((logits.argmax(-1) == test[1].cpu()).float().mean())
            rep = collapse_report(mask)
            out[kk] = {"acc": acc, "utilization": rep["utilization"], "collapsed": rep["collapsed"],
                       "dead": rep["dead"], "load_imbalance": rep["load_imbalance"]}
    finally:
        router.k = old_k
    return out


# ----------------------------------------------------------------------------- statistics over seeds


def summarize(values) -> dict:
    """mean, sample std (0 for one value), min, max and n of a list of numbers."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize: values is empty; give at least one number")
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


# ----------------------------------------------------------------------------- inference cost


@torch.no_grad()
def time_top_k(model: MoE, x: torch.Tensor, k: int, repeats: int = 20) -> dict:
    """Wall time of top-k inference (``dispatch="loop"``: only the chosen experts run) vs running
    every expert (``dispatch="dense"``, k = E), on the same batch and weights.

    Returns the median seconds of each (and every repeat's time), their ratio ("speedup") and each
    one's MACs per sample. The two are interleaved so that changing machine load affects both alike.
    """
    if not isinstance(model, MoE) or not hasattr(model.router, "k"):
        raise ValueError("time_top_k: model must be an MoE with a top-k router")
    E = model.num_experts
    check_int("k", k, low=1, high=E, where="time_top_k")
    check_int("repeats", repeats, low=1, where="time_top_k")
    sparse, dense = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    sparse.dispatch, sparse.router.k = "loop", k
    dense.dispatch, dense.router.k = "dense", E
    x = x.to(_device_of(model))
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def clock(m):
        sync()
        t0 = time.perf_counter()
        m(x)
        sync()
        return time.perf_counter() - t0

    clock(sparse), clock(dense)  # warm-up
    ts, td = [], []
    for _ in range(repeats):
        ts.append(clock(sparse))
        td.append(clock(dense))
    return {"k": k, "num_experts": E, "batch": int(x.shape[0]),
            "top_k_s": statistics.median(ts), "all_s": statistics.median(td),
            "top_k_times": ts, "all_times": td,
            "speedup": statistics.median(td) / statistics.median(ts),
            "macs_top_k": macs_per_sample(sparse, x), "macs_all": macs_per_sample(dense, x)}

"""Seed 004's experiment: two image domains, two whole-network experts, and a gate between them.

The task has 20 classes: labels 0-9 are digits (domain 0), labels 10-19 come from a second image
domain (domain 1; Fashion-MNIST offline, CIFAR-10 grayscale in the seed). Every model has the form

    Y'(X) = softmax( sum_i g_i(X) NN_i(X) )          (``MoE(..., combine="logits")``)

with conv-net experts ``NN_i`` (:class:`~tutorial_moe.experts.ConvExpert`) and one of three gates:

* ``"oracle"`` - the baseline: g = [1, 0] for digits, [0, 1] otherwise (:class:`OracleRouter` on the domain),
* ``"conv"``   - seed 004's convolutional gate (:class:`ConvGate`),
* ``"dense"``  - seed 004's one-hidden-layer gate (:class:`DenseGate`).

This module builds those models, trains them (:func:`run`), measures the seed's activation-rate
table per domain and per class, names the outcome of each run with explicit thresholds
(:func:`classify_outcome`) and holds the grid of gate-loss settings of chapter 07
(:data:`LOSS_SETTINGS`, :func:`seed_gate_losses`). Chapters 06 and 07 only call it.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import torch

from .._validate import check_choice, check_int, check_positive_float
from ..experts import ConvExpert, ConvGate, DenseGate
from ..losses import check_loss_weights
from ..metrics import activation_rates, routing_entropy, specialization
from ..moe import MoE
from ..routing import OracleRouter, Routing, SoftmaxRouter, TopKRouter
from ..train import collect_routing, fit

__all__ = [
    "GATES", "DOMAINS", "ROUTERS", "OUTCOMES", "LOSS_SETTINGS", "ExperimentConfig", "RunResult",
    "load_data", "build_model", "gate_values", "measure_routing", "aligned_rates", "aligned_order", "domain_gap", "usage_imbalance", "classify_outcome",
    "run", "seed_loss_trainer", "run_seeds", "run_settings", "ROUTING_METRICS", "run_metric",
    "setting_rows", "plot_routing_summary", "param_count", "plot_seed_curves",
    "run_many", "seed_gate_losses", "outcome_counts", "activation_table_rows", "format_activation_table",
    "class_rate_rows", "summary_rows", "plot_curves", "plot_activation", "mean_std",
]

GATES = ("oracle", "conv", "dense")
DOMAINS = ("digits", "other")
ROUTERS = ("softmax", "top1", "noisy_top1")

#: outcome -> its definition (thresholds are the keyword defaults of :func:`classify_outcome`).
OUTCOMES = {
    "collapsed": "one expert's mean gate is above 0.99 on both domains (the other expert is ignored)",
    "split": "the domains' mean gate vectors differ by more than 0.8 (total variation): the gate separates them",
    "partial": "they differ by 0.2 to 0.8: one domain leans on its own expert, the other is shared",
    "shared": "both experts are used and the gate hardly depends on the domain (difference below 0.2)",
}

#: Chapter 07's gate-loss settings: router kind, ``{loss: weight}`` and extra router options.
#: The seed's losses act on its soft gate; Switch and the bias method need a hard top-1 choice
#: (on a soft gate every expert sees every sample, so the Switch loss is the constant 1);
#: Shazeer's load loss needs the noisy top-k router's smooth load estimate.
LOSS_SETTINGS = {
    "none": {"router": "softmax", "losses": {}},
    "entropy": {"router": "softmax", "losses": {"batch_entropy": 0.1, "sample_entropy": 0.01}},
    "variance": {"router": "softmax", "losses": {"batch_variance": 0.1, "sample_variance": 0.01}},
    "variance_literal": {"router": "softmax", "losses": {"neg_batch_variance": 0.1, "neg_sample_variance": 0.01}},
    "variance_samples": {"router": "softmax",
                         "losses": {"neg_cross_sample_variance": 0.1, "neg_sample_variance": 0.01}},
    "switch": {"router": "top1", "losses": {"switch": 0.01}},
    "importance_load": {"router": "noisy_top1", "losses": {"importance": 0.1, "load": 0.1}},
    "z": {"router": "softmax", "losses": {"z": 0.001}},
    "bias": {"router": "top1", "losses": {}, "bias_update_rate": 0.05},
}

_SEED_LOSS_KINDS = {
    "entropy": ("batch_entropy", "sample_entropy"),
    "variance": ("batch_variance", "sample_variance"),
    "variance_literal": ("neg_batch_variance", "neg_sample_variance"),
    "variance_samples": ("neg_cross_sample_variance", "neg_sample_variance"),
}


def seed_gate_losses(kind: str, alpha: float, beta: float) -> dict[str, float]:
    """Seed 004's gate loss ``alpha * batch term + beta * sample term`` as a ``losses=`` dict.

    kind "entropy": -H(mean gate) (balance) and mean H(gate) (decisive samples);
    kind "variance": the same with the variance over experts, each term kept in the entropy
    version's direction (minimising it balances the batch and sharpens each sample);
    kind "variance_literal": variance put in place of entropy with the signs unchanged, which
    maximises the batch variance (favours one expert) and minimises each sample's (favours 50/50).
    kind "variance_samples": the other reading of the batch variance, across the batch's samples
    (:func:`~tutorial_moe.losses.cross_sample_variance`), maximised; the sample term as literal.
    """
    check_choice("kind", kind, _SEED_LOSS_KINDS, where="seed_gate_losses")
    alpha = check_positive_float("alpha", alpha, where="seed_gate_losses", allow_zero=True)
    beta = check_positive_float("beta", beta, where="seed_gate_losses", allow_zero=True)
    batch, sample = _SEED_LOSS_KINDS[kind]
    return {batch: alpha, sample: beta}


@dataclass(frozen=True)
class ExperimentConfig:
    """Sizes of one two-domain experiment.

    The seed's sizes (``ExperimentConfig.seed_sizes()``): 32x32 images, experts conv128-conv128-fc128,
    conv gate conv64-conv64-fc64, dense gate fc64, batch 128, all training images. The default is
    scaled down to run on two CPU cores in seconds: 16x16 images, narrow experts, 2,000 images,
    4 epochs, and a larger learning rate (1e-2) so that so few steps still learn something.
    """

    image_size: int = 16
    width: int = 8          # expert conv channels (seed: 128)
    fc: int = 32            # expert hidden units (seed: 128)
    gate_width: int = 8     # conv gate channels (seed: 64)
    gate_fc: int = 32       # conv gate hidden units (seed: 64)
    dense_hidden: int = 64  # dense gate hidden units (seed: 64)
    num_experts: int = 2
    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-2
    train_limit: int | None = 2000
    test_limit: int | None = 1000
    oracle_fc: int | None = None  # the oracle's expert hidden units (None: ``fc``); see ``matched``

    def __post_init__(self):
        where = "ExperimentConfig"
        for name in ("image_size", "width", "fc", "gate_width", "gate_fc", "dense_hidden", "epochs", "batch_size"):
            check_int(name, getattr(self, name), low=1, where=where)
        check_int("image_size", self.image_size, low=8, where=where)
        check_int("num_experts", self.num_experts, low=2, where=where)
        check_positive_float("lr", self.lr, where=where)
        if self.oracle_fc is not None:
            check_int("oracle_fc", self.oracle_fc, low=1, where=where)
        for name in ("train_limit", "test_limit"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), low=20, where=where)

    @classmethod
    def seed_sizes(cls, **changes) -> "ExperimentConfig":
        """The seed's network sizes on all the data (what ``TUTORIAL_MOE_FULL=1`` runs)."""
        base = cls(image_size=32, width=128, fc=128, gate_width=64, gate_fc=64, dense_hidden=64, epochs=10,
                   lr=1e-3, train_limit=None, test_limit=None)
        return replace(base, **changes)

    @classmethod
    def book_sizes(cls, **changes) -> "ExperimentConfig":
        """Chapter 06's default mode: the seed's 32x32 images and layer pattern, narrow layers.

        Experts conv4-conv4-fc64, conv gate conv2-conv2-fc32, dense gate fc4, three epochs over
        43,000 training images (21,500 per domain; 336 steps an epoch, 1,008 in all: the
        book's minimum for a routing-dynamics claim is 1,000), 4,000 test images, batch 128,
        lr 3e-3; the oracle's experts get a wider hidden layer so that the three models have
        (nearly) the same number of parameters (:meth:`matched`).
        """
        base = cls(image_size=32, width=4, fc=64, gate_width=2, gate_fc=32, dense_hidden=4, epochs=3,
                   lr=3e-3, train_limit=43000, test_limit=4000)
        return replace(base, **changes).matched()

    def matched(self) -> "ExperimentConfig":
        """This config with ``oracle_fc`` chosen so the oracle model (two experts, no gate) has
        as many parameters as the mean of the two gated models (it has no gate to pay for)."""
        gated = (param_count("conv", self) + param_count("dense", self)) / 2
        best = min(range(1, 4 * self.fc + 1),
                   key=lambda f: abs(param_count("oracle", replace(self, oracle_fc=f)) - gated))
        return replace(self, oracle_fc=best)

    def replace(self, **changes) -> "ExperimentConfig":
        return replace(self, **changes)

    def describe(self) -> str:
        ofc = "" if self.oracle_fc in (None, self.fc) else f" (oracle's experts fc{self.oracle_fc})"
        return (f"{self.image_size}x{self.image_size} images, experts conv{self.width}-conv{self.width}-fc{self.fc}{ofc}, "
                f"conv gate conv{self.gate_width}-conv{self.gate_width}-fc{self.gate_fc}, dense gate fc{self.dense_hidden}, "
                f"{self.num_experts} experts, {self.epochs} epochs, batch {self.batch_size}, lr {self.lr:g}, "
                f"{'all' if self.train_limit is None else self.train_limit} training images")


def load_data(cfg: ExperimentConfig, source: str = "auto"):
    """(train, test) :class:`~tutorial_moe.data.DataSplit` of the 20-class two-domain task at ``cfg``'s sizes."""
    from ..data import load_two_domains

    train = load_two_domains("train", source=source, limit=cfg.train_limit, image_size=cfg.image_size)
    test = load_two_domains("test", source=source, limit=cfg.test_limit, image_size=cfg.image_size)
    return train, test


def build_model(gate: str, cfg: ExperimentConfig, *, router: str = "softmax", losses: dict | None = None,
                bias_update_rate: float = 0.0, num_classes: int = 20) -> MoE:
    """Seed 004's model: ``cfg.num_experts`` :class:`ConvExpert` s combined by the chosen gate.

    gate: "oracle" (expert = domain; call the model with ``ids=domain``), "conv" or "dense".
    router: how the learned gate's scores become weights: "softmax" (the seed: every expert, soft
    weights), "top1" (Switch: the best expert only, weight = its probability) or "noisy_top1"
    (Shazeer's noisy gating with k=1, which provides the smooth load for the "load" loss).
    ``bias_update_rate`` > 0 (top-1 routers) adds auxiliary-loss-free bias balancing.
    """
    where = "build_model"
    check_choice("gate", gate, GATES, where=where)
    check_choice("router", router, ROUTERS, where=where)
    check_loss_weights(losses, where)
    check_positive_float("bias_update_rate", bias_update_rate, where=where, allow_zero=True)
    if bias_update_rate > 0 and router == "softmax":
        raise ValueError(f"{where}: bias_update_rate={bias_update_rate} needs router='top1' or 'noisy_top1' "
                         "(the bias only changes which expert is selected); the softmax router selects all")
    E, S = cfg.num_experts, cfg.image_size
    experts = [ConvExpert(1, num_classes, cfg.width, cfg.fc, S) for _ in range(E)]
    if gate == "oracle":
        if router != "softmax" or losses or bias_update_rate:
            raise ValueError(f"{where}: gate='oracle' is fixed; it takes no router={router!r}, losses or bias")
        fc = cfg.fc if cfg.oracle_fc is None else cfg.oracle_fc
        experts = [ConvExpert(1, num_classes, cfg.width, fc, S) for _ in range(E)]
        return MoE(experts, OracleRouter(E, assignment=[0, 1]), combine="logits")
    net = ConvGate(E, 1, cfg.gate_width, cfg.gate_fc, S) if gate == "conv" else DenseGate(S * S, E, cfg.dense_hidden)
    if router == "softmax":
        r = SoftmaxRouter(None, E, gate=net)
    else:
        # normalize=False keeps the chosen expert's probability as its weight, so the gate learns
        # from the task loss (a renormalised top-1 weight would be the constant 1).
        r = TopKRouter(S * S if router == "noisy_top1" else None, E, 1, noisy=router == "noisy_top1",
                       normalize=False, bias_update_rate=bias_update_rate, gate=net)
    return MoE(experts, r, combine="logits", losses=losses)


def param_count(gate: str, cfg: ExperimentConfig) -> int:
    """Number of trainable parameters of :func:`build_model` ``(gate, cfg)``."""
    return sum(p.numel() for p in build_model(gate, cfg).parameters())


def gate_values(routing: Routing) -> torch.Tensor:
    """(N, E) the gate each sample actually received, rows summing to 1.

    For a soft router (every expert selected) this is its softmax ``probs``, the seed's Gate(X);
    for a hard router it is the one-hot choice (which includes any balancing bias).
    """
    if bool(routing.mask.all()):
        return routing.probs.float()
    m = routing.mask.float()
    return m / m.sum(-1, keepdim=True).clamp_min(1)


def measure_routing(model: MoE, split, num_classes: int = 20) -> dict:
    """Activation rates and routing statistics of ``model`` on a DataSplit (x, y, domain, info).

    Returns: ``rates`` (2, E) mean gate per domain, ``class_rates`` (num_classes, E) per class,
    ``entropy`` mean per-sample entropy of the router's distribution (nats), ``specialization``
    NMI between each sample's top expert and its domain, ``top_share`` (E,) share of samples whose
    top expert is e, ``usage`` (E,) mean gate over all samples, ``max_gate`` mean over samples of
    the largest gate value (1: every sample uses a single expert; seed 004's remark (a)).
    """
    routing = collect_routing(model, split.x, ids=split.domain)
    g = gate_values(routing)
    top = torch.nn.functional.one_hot(g.argmax(-1), g.shape[1]).bool()
    return {
        "rates": activation_rates(g, split.domain, 2),
        "class_rates": activation_rates(g, split.y, num_classes),
        "entropy": float(routing_entropy(routing.probs)),
        "specialization": specialization(top, split.domain),
        "top_share": top.float().mean(0),
        "usage": g.mean(0),
        "max_gate": float(g.max(-1).values.mean()),
    }


def aligned_rates(rates) -> list:
    """A (2, E) activation table with its experts reordered so that NN0 leans most to digits.

    Which expert a seed calls NN0 is arbitrary, so a mean over seeds of raw tables can average
    a gate that sends digits to NN0 with one that sends them to NN1 and read 0.5. Sorting the
    experts by (digits' rate - other domain's rate), largest first, makes seeds comparable.
    """
    r = torch.as_tensor(rates, dtype=torch.float64)
    return r[:, aligned_order(r)].tolist()


def aligned_order(rates) -> list[int]:
    """The expert order :func:`aligned_rates` uses: experts by (digits' rate - other's rate),
    largest first (ties keep their index order). ``order[0]`` is the digits' expert."""
    r = torch.as_tensor(rates, dtype=torch.float64)
    if r.dim() != 2 or r.shape[0] != 2:
        raise ValueError(f"aligned_rates: rates must have shape (2, E), got {tuple(r.shape)}")
    return torch.argsort(r[0] - r[1], descending=True, stable=True).tolist()


def domain_gap(rates) -> float:
    """Total-variation distance between the two domains' mean gate vectors (rows of ``rates`` (2, E)).

    0 = the gate ignores the domain; 1 = the domains use disjoint experts (for E = 2 this is
    ``|rates[0, 0] - rates[1, 0]|``).
    """
    r = torch.as_tensor(rates, dtype=torch.float64)
    if r.dim() != 2 or r.shape[0] != 2:
        raise ValueError(f"domain_gap: rates must have shape (2, E), got {tuple(r.shape)}")
    return float(0.5 * (r[0] - r[1]).abs().sum())


def usage_imbalance(usage) -> float:
    """max_e |usage_e - 1/E| for the (E,) mean gate over all samples: 0 = every expert used equally,
    1 - 1/E = one expert takes everything."""
    u = torch.as_tensor(usage, dtype=torch.float64)
    if u.dim() != 1 or u.numel() < 1:
        raise ValueError(f"usage_imbalance: usage must have shape (E,), got {tuple(u.shape)}")
    return float((u - 1 / u.numel()).abs().max())


def classify_outcome(rates, collapse: float = 0.99, split: float = 0.8, partial: float = 0.2) -> str:
    """Name a run's routing from its (2, E) per-domain activation rates; see :data:`OUTCOMES`.

    "collapsed" if some expert's mean gate exceeds ``collapse`` on both domains; otherwise by the
    :func:`domain_gap`: "split" (> ``split``), "partial" (> ``partial``) or "shared".
    """
    if not 0 < partial < split <= 1:
        raise ValueError(f"classify_outcome: need 0 < partial < split <= 1, got partial={partial}, split={split}")
    if not 0 < collapse <= 1:
        raise ValueError(f"classify_outcome: collapse={collapse} must lie in (0, 1]")
    r = torch.as_tensor(rates, dtype=torch.float64)
    if r.dim() != 2 or r.shape[0] != 2:
        raise ValueError(f"classify_outcome: rates must have shape (2, E), got {tuple(r.shape)}")
    if bool((r.min(0).values > collapse).any()):
        return "collapsed"
    gap = domain_gap(r)
    return "split" if gap > split else "partial" if gap > partial else "shared"


@dataclass
class RunResult:
    """One trained model's record: curves, activation tables and summary numbers (all JSON-able)."""

    gate: str
    setting: str
    seed: int
    step_epochs: list          # x of each training step, in epochs (step i ends at (i + 1) / steps per epoch)
    train_acc_steps: list      # training accuracy accumulated over the epoch before each step
    test_acc_epochs: list      # test accuracy after each epoch
    rates: dict                # split -> (2, E) mean gate per domain
    class_rates: dict          # split -> (classes, E) mean gate per class
    test_acc: float
    entropy: float
    specialization: float
    domain_gap: float
    outcome: str
    seconds: float
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The headline numbers (no curves, no per-class table)."""
        return {"gate": self.gate, "setting": self.setting, "seed": self.seed, "test_acc": self.test_acc,
                "final_train_acc": self.train_acc_steps[-1], "entropy": self.entropy,
                "specialization": self.specialization, "domain_gap": self.domain_gap, "outcome": self.outcome,
                "rates_test": self.rates["test"], "rates_train": self.rates["train"], "seconds": self.seconds,
                **self.extra}

    def to_dict(self) -> dict:
        return asdict(self)


def _tolist(t):
    return t.tolist() if isinstance(t, torch.Tensor) else t


def _run_result(gate: str, label: str, seed: int, hist, per_epoch: int, m_train: dict, m_test: dict,
                seconds: float, extra: dict) -> RunResult:
    """A :class:`RunResult` from a training history and the two :func:`measure_routing` records;
    ``extra`` is merged over the routing summary (top share, usage, imbalance, max gate)."""
    return RunResult(
        gate=gate, setting=label, seed=seed,
        step_epochs=[(row["step"] + 1) / per_epoch for row in hist.steps],
        train_acc_steps=[row["train_acc"] for row in hist.steps],
        test_acc_epochs=[row["test_acc"] for row in hist.epochs],
        rates={"train": _tolist(m_train["rates"]), "test": _tolist(m_test["rates"])},
        class_rates={"train": _tolist(m_train["class_rates"]), "test": _tolist(m_test["class_rates"])},
        test_acc=hist.epochs[-1]["test_acc"], entropy=m_test["entropy"], specialization=m_test["specialization"],
        domain_gap=domain_gap(m_test["rates"]), outcome=classify_outcome(m_test["rates"]), seconds=seconds,
        extra={"top_share": _tolist(m_test["top_share"]), "usage": _tolist(m_test["usage"]),
               "imbalance": usage_imbalance(m_test["usage"]), "max_gate": m_test["max_gate"], **extra},
    )


def run(gate: str, train, test, cfg: ExperimentConfig, *, seed: int = 0, setting: str = "none",
        losses: dict | None = None, router: str | None = None, bias_update_rate: float | None = None,
        gate_lr: float | None = None, label: str | None = None, show_progress: bool = False,
        keep_model: bool = False) -> RunResult:
    """Build, train and measure one model.

    ``setting`` names an entry of :data:`LOSS_SETTINGS` (router, losses, bias); ``losses``,
    ``router`` and ``bias_update_rate`` override its parts (e.g. the widget's alpha/beta grid).
    ``gate_lr``: a separate learning rate for the gate (seed 004's first improvement).
    ``label``: the name stored as ``RunResult.setting`` (default: ``setting``).
    The model is seeded by ``seed`` (weights and batch order), so a run repeats exactly on CPU.
    """
    where = "run"
    check_choice("setting", setting, LOSS_SETTINGS, where=where)
    base = LOSS_SETTINGS[setting]
    router = base["router"] if router is None else router
    losses = dict(base["losses"]) if losses is None else losses
    bias = base.get("bias_update_rate", 0.0) if bias_update_rate is None else bias_update_rate
    if gate == "oracle":
        router, losses, bias = "softmax", {}, 0.0
    for name, split in (("train", train), ("test", test)):
        if getattr(split, "domain", None) is None:
            raise ValueError(f"{where}: {name} must be a two-domain DataSplit (x, y, domain, info), got domain=None")
    torch.manual_seed(seed)
    model = build_model(gate, cfg, router=router, losses=losses, bias_update_rate=bias)
    t0 = time.perf_counter()
    hist = fit(model, (train.x, train.y, train.domain), (test.x, test.y, test.domain), epochs=cfg.epochs,
               batch_size=cfg.batch_size, lr=cfg.lr, gate_lr=gate_lr, seed=seed, show_progress=show_progress)
    seconds = time.perf_counter() - t0
    per_epoch = math.ceil(len(train.x) / cfg.batch_size)
    result = _run_result(gate, setting if label is None else str(label), seed, hist, per_epoch,
                         measure_routing(model, train), measure_routing(model, test), seconds,
                         {"losses": dict(losses), "router": router, "gate_lr": gate_lr,
                          "num_experts": cfg.num_experts})
    if keep_model:
        result.extra["model"] = model  # not JSON-able; for inspection in a notebook only
    return result


def seed_loss_trainer(gate: str, train, test, cfg: ExperimentConfig, seed: int = 0):
    """A function ``(kind, alpha, beta) -> RunResult`` training ``gate`` with seed 004's gate loss
    ``seed_gate_losses(kind, alpha, beta)`` on the soft gate (for the chapter 07 explorer)."""
    check_choice("gate", gate, ("conv", "dense"), where="seed_loss_trainer")

    def train_fn(kind: str, alpha: float, beta: float) -> RunResult:
        losses = seed_gate_losses(kind, alpha, beta)
        # One seed as a stacked model of one: the same result as run, in about 60 % of the time.
        return run_seeds(gate, train, test, cfg, [seed], setting="none", losses=losses,
                         label=f"{kind} (alpha={alpha:g}, beta={beta:g})", test_points=1)[0]

    return train_fn


def run_many(gates, seeds, train, test, cfg: ExperimentConfig, *, show_progress: bool = True, **kwargs) -> list[RunResult]:
    """:func:`run` for every (seed, gate) pair, with one progress bar over all runs."""
    from ..runtime import progress

    gates, seeds = list(gates), list(seeds)
    for g in gates:
        check_choice("gate", g, GATES, where="run_many")
    if not seeds:
        raise ValueError("run_many: seeds is empty; give at least one int seed")
    out = []
    with progress(total=len(gates) * len(seeds), desc="runs", disable=not show_progress) as bar:
        for s in seeds:
            for g in gates:
                out.append(run(g, train, test, cfg, seed=s, **kwargs))
                bar.update(1)
    return out


def outcome_counts(results: list[RunResult], key: str = "gate") -> dict[str, dict[str, int]]:
    """``{group: {outcome: count}}`` over runs grouped by ``key`` ("gate" or "setting"); every outcome listed."""
    if key not in ("gate", "setting"):
        raise ValueError(f"outcome_counts: key={key!r} is unknown; choose 'gate' or 'setting'")
    counts: dict[str, Counter] = {}
    for r in results:
        counts.setdefault(getattr(r, key), Counter())[r.outcome] += 1
    return {g: {o: c.get(o, 0) for o in OUTCOMES} for g, c in counts.items()}


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    v = torch.as_tensor(list(values), dtype=torch.float64)
    if v.numel() == 0:
        raise ValueError("mean_std: values is empty")
    return float(v.mean()), float(v.std()) if v.numel() > 1 else 0.0


def activation_table_rows(results: dict) -> list[dict]:
    """Seed 004's table: one row per (model, domain), columns train NN0.. and test NN0.. .

    ``results``: ``{label: RunResult}`` (e.g. {"conv gate": r1, "oracle": r0}); rows are labelled
    "<label>, <domain>".
    """
    rows = []
    for label, r in results.items():
        E = len(r.rates["test"][0])
        for d, name in enumerate(DOMAINS):
            row = {"model, domain": f"{label}, {name}"}
            for split in ("train", "test"):
                for e in range(E):
                    row[f"{split} NN{e}"] = float(r.rates[split][d][e])
            rows.append(row)
    return rows


def format_activation_table(rows: list[dict], digits: int = 8) -> str:
    """Plain-text version of :func:`activation_table_rows`, laid out like the seed's table
    (a blank column between the train and the test block)."""
    if not rows:
        return "(no rows)"
    label = next(iter(rows[0]))
    train_cols = [c for c in rows[0] if c.startswith("train")]
    test_cols = [c for c in rows[0] if c.startswith("test")]
    width = max(len(label), *(len(str(r[label])) for r in rows)) + 2
    fmt = lambda v: f"{v:.{digits}g}".ljust(16)  # noqa: E731
    lines = [" " * width + "".join(c.ljust(16) for c in train_cols) + "  " + "".join(c.ljust(16) for c in test_cols)]
    for r in rows:
        lines.append(str(r[label]).ljust(width) + "".join(fmt(r[c]) for c in train_cols) + "  "
                     + "".join(fmt(r[c]) for c in test_cols))
    return "\n".join(line.rstrip() for line in lines)


def class_rate_rows(results: dict, class_names, split: str = "test") -> list[dict]:
    """Per-class activation rates: one row per class, a column per (model, expert)."""
    check_choice("split", split, ("train", "test"), where="class_rate_rows")
    rows = []
    for c, name in enumerate(class_names):
        row = {"class": f"{c} {name}"}
        for label, r in results.items():
            for e, v in enumerate(r.class_rates[split][c]):
                row[f"{label} NN{e}"] = float(v)
        rows.append(row)
    return rows


def summary_rows(results: list[RunResult], label=lambda r: f"{r.setting}, {r.gate} gate") -> list[dict]:
    """One row per run: activation rates (test), accuracy, routing entropy, specialisation, outcome."""
    rows = []
    for r in results:
        rates = r.rates["test"]
        row = {"run": label(r)}
        for d, name in enumerate(DOMAINS):
            row[f"{name}: gate"] = " / ".join(f"{v:.2f}" for v in rates[d])
        row.update({"test acc": r.test_acc, "entropy (nats)": r.entropy, "specialisation": r.specialization,
                    "domain gap": r.domain_gap, "outcome": r.outcome})
        rows.append(row)
    return rows


def plot_curves(results: dict, ax=None, title: str = "Training (accumulated) and test accuracy"):
    """Seed 004's six curves: per model, training accuracy accumulated before each step (thin) and
    test accuracy after each epoch (markers). ``results``: ``{label: RunResult}``. Returns the Axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 3.6), dpi=90)
    for i, (label, r) in enumerate(results.items()):
        color = f"C{i}"
        ax.plot(r.step_epochs, r.train_acc_steps, color=color, lw=1, alpha=0.8, label=f"{label}: train")
        epochs = list(range(1, len(r.test_acc_epochs) + 1))
        ax.plot(epochs, r.test_acc_epochs, color=color, ls="--", marker="o", label=f"{label}: test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return ax


def plot_activation(rates, ax=None, title: str = "Activation rate", split_label: str = ""):
    """Heat map of a (2, E) activation table with the numbers written in the cells. Returns the Axes."""
    import matplotlib.pyplot as plt

    r = torch.as_tensor(rates, dtype=torch.float64)
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 2.2), dpi=90)
    ax.imshow(r.numpy(), vmin=0, vmax=1, cmap="Blues")
    E = r.shape[1]
    ax.set_xticks(range(E), [f"NN{e}" for e in range(E)])
    ax.set_yticks(range(r.shape[0]), list(DOMAINS)[: r.shape[0]])
    for d in range(r.shape[0]):
        for e in range(E):
            v = float(r[d, e])
            ax.text(e, d, f"{v:.2f}", ha="center", va="center", color="white" if v > 0.6 else "black", fontsize=9)
    ax.set_xlabel("expert" + (f" ({split_label})" if split_label else ""))
    ax.set_title(title, fontsize=9)
    return ax


@torch.no_grad()
def _stacked_accuracy(stacked, split, batch_size: int = 1000) -> list[float]:
    """Per-seed accuracy of a stacked model on a two-domain split (eval mode, restored after)."""
    was = stacked.training
    stacked.eval()
    S, correct = stacked.S, torch.zeros(stacked.S)
    for i in range(0, len(split.x), batch_size):
        x, y = split.x[i:i + batch_size], split.y[i:i + batch_size]
        ids = split.domain[i:i + batch_size].unsqueeze(0).expand(S, -1)
        out = stacked(x.unsqueeze(0).expand(S, *x.shape), ids)
        correct += (out.argmax(-1) == y).sum(1).float()
    stacked.train(was)
    return (correct / len(split.x)).tolist()


def _probe(split, n: int, seed: int = 0):
    """A fixed random subset of ``n`` images of a DataSplit (all of it if smaller)."""
    if n >= len(split.x):
        return split
    idx = torch.randperm(len(split.x), generator=torch.Generator().manual_seed(seed))[:n]
    return type(split)(split.x[idx], split.y[idx], split.domain[idx], split.info)


def run_seeds(gate: str, train, test, cfg: ExperimentConfig, seeds, *, setting: str = "none",
              losses: dict | None = None, gate_lr: float | None = None, label: str | None = None,
              test_points: int = 3, rate_images: int = 2000, show_progress: bool = False) -> list[RunResult]:
    """:func:`run` for several seeds at once, trained together by
    :func:`tutorial_moe.multiseed.fit_seeds` (the same result as one ``fit`` per seed).

    Every setting stacks: soft gates, the top-1 routers of Switch and of noisy gating, and
    auxiliary-loss-free bias balancing (one bias row per seed).
    ``test_points``: test accuracy is measured this many times per epoch (evenly spaced; the
    last is the epoch's end), so a one-epoch run still draws a test curve.
    ``rate_images``: the training activation table is measured on this many training images
    (a fixed random subset; the test table uses the whole test split).
    """
    from ..multiseed import fit_seeds

    where = "run_seeds"
    check_choice("gate", gate, GATES, where=where)
    check_choice("setting", setting, LOSS_SETTINGS, where=where)
    check_int("test_points", test_points, low=1, where=where)
    check_int("rate_images", rate_images, low=20, where=where)
    seeds = list(seeds)
    if not seeds:
        raise ValueError(f"{where}: seeds is empty; give at least one int seed")
    base = LOSS_SETTINGS[setting]
    losses = dict(base["losses"]) if losses is None else dict(losses)
    router = base["router"]
    if gate == "oracle":
        losses, router = {}, "softmax"
    for name, split in (("train", train), ("test", test)):
        if getattr(split, "domain", None) is None:
            raise ValueError(f"{where}: {name} must be a two-domain DataSplit (x, y, domain, info), got domain=None")
    per_epoch = math.ceil(len(train.x) / cfg.batch_size)
    checkpoints = {round(per_epoch * i / test_points) - 1 for i in range(1, test_points)}
    mid_acc: list[tuple[int, list[float]]] = []

    def callback(rows, stacked):
        step = rows[0]["step"]
        if step % per_epoch in checkpoints:
            mid_acc.append((step, _stacked_accuracy(stacked, test)))

    t0 = time.perf_counter()
    bias = 0.0 if gate == "oracle" else base.get("bias_update_rate", 0.0)
    runs = fit_seeds(lambda: build_model(gate, cfg, router=router, losses=losses, bias_update_rate=bias), (train.x, train.y, train.domain),
                     (test.x, test.y, test.domain), seeds=seeds, epochs=cfg.epochs, batch_size=cfg.batch_size,
                     lr=cfg.lr, gate_lr=gate_lr, show_progress=show_progress,
                     callback=callback if test_points > 1 else None)
    seconds = time.perf_counter() - t0
    rate_split = _probe(train, rate_images)
    out = []
    for s, (seed, model, hist) in enumerate(zip(seeds, runs.models, runs.histories)):
        m_train, m_test = measure_routing(model, rate_split), measure_routing(model, test)
        points = [((step + 1) / per_epoch, acc[s]) for step, acc in mid_acc]
        points += [(float(row["epoch"] + 1), row["test_acc"]) for row in hist.epochs]
        points.sort()
        out.append(_run_result(gate, setting if label is None else str(label), seed, hist, per_epoch,
                               m_train, m_test, seconds / len(seeds),
                               {"losses": losses, "router": router, "gate_lr": gate_lr,
                                "num_experts": cfg.num_experts, "test_curve": points}))
    return out


def run_settings(specs, train, test, cfg: ExperimentConfig, seeds, *, test_points: int = 1,
                 show_progress: bool = True) -> dict:
    """Train each setting of ``specs`` on every seed; ``{(gate, label, seed): RunResult}``.

    A spec is ``(gate, setting)`` or ``(gate, setting, options)`` with options ``label`` (the
    name stored in the result, default the setting), ``gate_lr`` and ``num_experts``. Each
    setting trains its seeds as one stacked model (:func:`run_seeds`); one progress bar counts
    the settings.
    """
    from ..runtime import progress

    seeds = list(seeds)
    if not seeds:
        raise ValueError("run_settings: seeds is empty; give at least one int seed")
    parsed = []
    for spec in specs:
        if not isinstance(spec, tuple) or len(spec) not in (2, 3):
            raise ValueError(f"run_settings: each spec must be (gate, setting) or (gate, setting, options), "
                             f"got {spec!r}")
        gate, setting, options = (*spec, {}) if len(spec) == 2 else spec
        check_choice("gate", gate, GATES, where="run_settings")
        check_choice("setting", setting, LOSS_SETTINGS, where="run_settings")
        unknown = set(options) - {"label", "gate_lr", "num_experts"}
        if unknown:
            raise ValueError(f"run_settings: options {sorted(unknown)} are unknown; allowed: label, gate_lr, "
                             "num_experts")
        parsed.append((gate, setting, dict(options)))
    out = {}
    for gate, setting, options in progress(parsed, desc="settings", disable=not show_progress):
        label = options.get("label", setting)
        c = cfg.replace(num_experts=options["num_experts"]) if "num_experts" in options else cfg
        runs = run_seeds(gate, train, test, c, seeds, setting=setting, gate_lr=options.get("gate_lr"),
                         label=label, test_points=test_points)
        for r in runs:
            out[gate, label, r.seed] = r
    return out


#: The routing numbers chapter 07 reads off each run: name -> (axis label, what it means).
ROUTING_METRICS = {
    "imbalance": ("usage imbalance", "0: both experts used equally; 0.5: one expert ignored"),
    "domain_gap": ("domain gap", "0: the gate ignores the domain; 1: one expert per domain"),
    "max_gate": ("mean largest gate", "1: every image uses a single expert; 1/E: every image split evenly"),
}


def run_metric(r: RunResult, name: str) -> float:
    """One of :data:`ROUTING_METRICS` (or ``"test_acc"``) of a run."""
    if name == "domain_gap":
        return r.domain_gap
    if name == "test_acc":
        return r.test_acc
    if name in ROUTING_METRICS:
        return r.extra[name]
    raise ValueError(f"run_metric: name={name!r} is unknown; choose test_acc or one of {list(ROUTING_METRICS)}")


def _group(results: dict, gate: str, label: str) -> list[RunResult]:
    runs = [r for (g, lab, _), r in sorted(results.items(), key=lambda kv: kv[0][2]) if (g, lab) == (gate, label)]
    if not runs:
        raise ValueError(f"no runs for gate={gate!r}, label={label!r}")
    return runs


def setting_rows(results: dict, rows) -> list[dict]:
    """One row per ``(gate, label)`` of ``rows`` from :func:`run_settings`' dict: the number of
    seeds, mean test accuracy, the mean of each routing metric and the outcome counts."""
    out = []
    for gate, label in rows:
        runs = _group(results, gate, label)
        row = {"gate": gate, "setting": label, "seeds": len(runs),
               "test acc": sum(r.test_acc for r in runs) / len(runs)}
        for name, (axis, _) in ROUTING_METRICS.items():
            row[axis] = sum(run_metric(r, name) for r in runs) / len(runs)
        counts = Counter(r.outcome for r in runs)
        row["outcomes"] = ", ".join(f"{o} {counts[o]}" for o in OUTCOMES if counts[o])
        out.append(row)
    return out


def plot_routing_summary(results: dict, rows, metrics=tuple(ROUTING_METRICS), colors: dict | None = None,
                         title: str | None = None):
    """One panel per metric, one line per ``(gate, label)`` of ``rows``: a dot per seed and a bar
    at the mean. ``colors``: gate -> colour. Returns the figure."""
    import matplotlib.pyplot as plt

    colors = colors or {}
    fig, axes = plt.subplots(1, len(metrics), figsize=(7.0, 0.32 * len(rows) + 1.4), sharey=True)
    axes = [axes] if len(metrics) == 1 else list(axes)
    ys = list(range(len(rows)))[::-1]
    for ax, name in zip(axes, metrics):
        for y, (gate, label) in zip(ys, rows):
            values = [run_metric(r, name) for r in _group(results, gate, label)]
            c = colors.get(gate, "C0")
            ax.scatter(values, [y] * len(values), s=14, color=c, alpha=0.7, zorder=3)
            ax.plot([sum(values) / len(values)] * 2, [y - 0.35, y + 0.35], color=c, lw=2.5)
        ax.set_xlabel(ROUTING_METRICS[name][0] if name in ROUTING_METRICS else name)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, [f"{g}: {lab}" for g, lab in rows])
    if title:
        fig.suptitle(title)
    return fig


def plot_seed_curves(results: dict, ax=None, title: str = "Training (accumulated) and test accuracy",
                     ylim=(0.0, 1.0)):
    """Seed 004's six curves with bands over seeds: ``results`` is ``{label: [RunResult per seed]}``.

    Thin line and shaded band: accumulated training accuracy, mean and min-max over seeds;
    markers and dashed line: test accuracy (mean, error bars min-max). Returns the Axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7.0, 4.0))
    for i, (label, runs) in enumerate(results.items()):
        color = f"C{i}"
        x = torch.tensor(runs[0].step_epochs)
        tr = torch.tensor([r.train_acc_steps for r in runs])
        ax.plot(x, tr.mean(0), color=color, lw=1.2, label=f"{label}: train")
        ax.fill_between(x, tr.min(0).values, tr.max(0).values, color=color, alpha=0.2, lw=0)
        tx = [p[0] for p in runs[0].extra["test_curve"]]
        te = torch.tensor([[p[1] for p in r.extra["test_curve"]] for r in runs])
        m = te.mean(0)
        ax.errorbar(tx, m, yerr=torch.stack([m - te.min(0).values, te.max(0).values - m]), color=color,
                    ls="--", marker="o", capsize=3, label=f"{label}: test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, loc="lower right")
    return ax

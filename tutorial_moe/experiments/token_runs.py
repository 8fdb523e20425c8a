"""Experiments on the mixture-of-regimes task (chapters 08-10): one config, one training helper.

:class:`TokenConfig` fixes the task, the model sizes and the training budget (default and full
mode); :func:`train_token_model` wraps any feed-forward block (an ``MoELayer``, a Soft MoE in
``TokenGroups``, or a dense ``MLPExpert``) in a :class:`~tutorial_moe.blocks.TokenRegressor`, trains
it with :func:`tutorial_moe.train.fit` on the MSE loss and returns a :class:`TokenRun` with the
test R^2, the routing summary on the test set, compute per token and wall time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks import TokenRegressor
from ..moe import moe_modules
from ..monitoring import RoutingMonitor, compute_per_token, routing_summary
from ..runtime import seed_everything
from .tasks import MixtureOfRegimes, RegimeSplit, r2_score
from ..train import History, collect_routing, fit

__all__ = ["TokenConfig", "TokenRun", "train_token_model", "score_token_model"]


@dataclass(frozen=True)
class TokenConfig:
    """Task, model and budget of the token-level chapters (defaults: the CPU-sized default mode)."""

    num_regimes: int = 8
    d_in: int = 16
    d_out: int = 4
    frequency: float = 0.75
    n_train: int = 2048
    n_test: int = 1024
    n_val: int = 512
    n_probe: int = 512
    d_model: int = 32
    d_hidden: int = 32
    num_experts: int = 8
    batch_size: int = 128
    epochs: int = 8
    lr: float = 3e-3
    task_seed: int = 0

    @classmethod
    def full(cls) -> "TokenConfig":
        """Full mode: 8x the data and 3x the epochs (the conclusions should not depend on size)."""
        return cls(n_train=16384, n_test=4096, n_val=2048, epochs=24)

    def replace(self, **changes) -> "TokenConfig":
        return replace(self, **changes)

    def describe(self) -> str:
        return (f"{self.num_regimes} regimes, x in R^{self.d_in} -> y in R^{self.d_out}; {self.n_train} train / "
                f"{self.n_test} test tokens; d_model={self.d_model}, expert hidden={self.d_hidden}, "
                f"E={self.num_experts}; {self.epochs} epochs of batch {self.batch_size}, Adam lr={self.lr}")

    def task(self) -> MixtureOfRegimes:
        return MixtureOfRegimes(self.num_regimes, self.d_in, self.d_out, frequency=self.frequency, seed=self.task_seed)

    def data(self) -> tuple[RegimeSplit, RegimeSplit, RegimeSplit]:
        """(train, val, test): independent samples of :meth:`task` with disjoint ids. The validation
        split is for decisions (early stopping, choosing E); the test split only scores."""
        task = self.task()
        train, test = task.splits(self.n_train, self.n_test)
        val = task.sample(self.n_val, seed=999, first_index=self.n_train + self.n_test)
        return train, val, test


@dataclass
class TokenRun:
    """One trained token model and its measurements."""

    name: str
    model: nn.Module
    history: History
    r2: float
    summary: dict = field(default_factory=dict)
    compute: dict = field(default_factory=dict)
    seconds: float = float("nan")
    monitor: RoutingMonitor | None = None

    def row(self) -> dict:
        """A flat dict for tables: R^2, routing numbers and compute (NaN-free keys only)."""
        out = {"model": self.name, "test R2": self.r2}
        if self.summary:
            out.update({"imbalance": self.summary["load_imbalance"], "dropped %": 100 * self.summary["dropped"],
                        "entropy": self.summary["entropy"], "specialisation": self.summary.get("specialization")})
        if self.compute:
            out.update({"expert evals/token": self.compute["expert_evals"], "FLOPs/token": self.compute["flops"]})
        out["train s"] = self.seconds
        return out


@torch.no_grad()
def score_token_model(model: nn.Module, split: RegimeSplit, ids: bool = False) -> dict:
    """Test R^2 and (for an MoE model) the routing summary and compute per token on ``split``.

    The whole split goes through in one batch, so capacity-limited routers see it all at once.
    """
    was_training = model.training
    model.eval()
    pred = model(split.x, split.index) if ids else model(split.x)
    model.train(was_training)
    out = {"r2": r2_score(pred, split.y)}
    mods = moe_modules(model)
    if mods:
        routing = collect_routing(model, split.x, split.index if ids else None, batch_size=len(split))
        out["summary"] = routing_summary(routing, split.regime)
        ffn = model.ffn if isinstance(model, TokenRegressor) else mods[0]
        out["compute"] = compute_per_token(ffn, routing)
    return out


def train_token_model(ffn: nn.Module, cfg: TokenConfig, train: RegimeSplit, test: RegimeSplit, *, name: str = "",
                      val: RegimeSplit | None = None, ids: bool = False, seed: int = 0,
                      monitor_every: int | None = None, callbacks=(), prepare=None, **fit_kwargs) -> TokenRun:
    """Train ``TokenRegressor(cfg.d_in, cfg.d_model, cfg.d_out, ffn)`` and score it on ``test``.

    ``val`` (optional) is evaluated after every epoch (``fit``'s ``test`` argument): early stopping
    watches it, never the test split. The routing monitor probes the first ``cfg.n_probe`` test
    tokens: it only watches, it decides nothing.

    Args:
        ffn: the feed-forward block (built after ``seed_everything(seed)`` by the caller or here:
            pass a zero-argument callable to build it under the run's seed).
        ids: route by sample id (hash routing): the model gets (x, ids).
        monitor_every: attach a :class:`RoutingMonitor` on the first ``cfg.n_probe`` test tokens.
        callbacks: more ``fit`` callbacks (e.g. a ``GradientMonitor``).
        prepare: ``prepare(model)`` runs before training (e.g. to give it a deliberately bad start).
        fit_kwargs: passed to :func:`fit` (epochs, lr, clip_grad, early_stopping, ...); by default
            ``cfg.epochs``, ``cfg.lr``, ``cfg.batch_size`` and the MSE loss.
    """
    seed_everything(seed)
    if callable(ffn) and not isinstance(ffn, nn.Module):
        ffn = ffn()
    if not isinstance(ffn, nn.Module):
        raise TypeError(f"train_token_model: ffn must be an nn.Module or a callable building one, got {type(ffn).__name__}")
    model = TokenRegressor(cfg.d_in, cfg.d_model, cfg.d_out, ffn)
    if prepare is not None:
        prepare(model)
    monitor = None
    cbs = list(callbacks)
    if monitor_every is not None:
        probe = test.subset(min(cfg.n_probe, len(test)))
        monitor = RoutingMonitor(probe.x, probe.regime, probe.index if ids else None, every=monitor_every)
        cbs.insert(0, monitor)
    kwargs = {"epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "loss_fn": F.mse_loss,
              "show_progress": False, "seed": seed}
    kwargs.update(fit_kwargs)
    if kwargs.get("early_stopping") is not None:
        kwargs.setdefault("stop_on", "test_loss")
    callback = None
    if cbs:
        def callback(row, m):
            for cb in cbs:
                cb(row, m)
    t0 = time.perf_counter()
    history = fit(model, train.tensors(ids), None if val is None else val.tensors(ids), callback=callback, **kwargs)
    seconds = time.perf_counter() - t0
    scored = score_token_model(model, test, ids)
    return TokenRun(name or type(ffn).__name__, model, history, scored["r2"], scored.get("summary", {}),
                    scored.get("compute", {}), seconds, monitor)

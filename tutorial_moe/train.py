"""One training loop for every chapter, with the bookkeeping an MoE needs.

``fit`` records, per step: the task loss, each auxiliary loss, the training accuracy accumulated
over the epoch *before* the step's update (seed 004's definition) and each MoE module's expert
utilisation; per epoch: test accuracy and loss, k, temperature and wall time.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import check_int, check_positive_float
from .metrics import utilization
from .moe import collect_routing, moe_modules
from .routing import update_expert_biases
from .runtime import device as default_device, progress, seed_everything

__all__ = ["History", "fit", "check_fit_arguments", "evaluate", "collect_routing", "set_k", "set_temperature", "router_parameters",
           "save_checkpoint", "load_checkpoint", "batches"]


@dataclass
class History:
    steps: list = field(default_factory=list)
    epochs: list = field(default_factory=list)
    stopped_early: bool = False
    best_epoch: int | None = None

    def series(self, key: str, level: str = "steps") -> list:
        rows = self.steps if level == "steps" else self.epochs
        return [row.get(key) for row in rows]

    def to_dict(self) -> dict:
        return {"steps": self.steps, "epochs": self.epochs, "stopped_early": self.stopped_early,
                "best_epoch": self.best_epoch}

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(list(d["steps"]), list(d["epochs"]), d.get("stopped_early", False), d.get("best_epoch"))


def _as_tensors(data, where: str, name: str):
    if isinstance(data, (tuple, list)) and 2 <= len(data) <= 3 and all(isinstance(t, torch.Tensor) for t in data):
        n = len(data[0])
        if n == 0:
            raise ValueError(f"{where}: {name} is empty; it needs at least one sample")
        for i, t in enumerate(data[1:], 1):
            if len(t) != n:
                raise ValueError(f"{where}: {name}[{i}] has {len(t)} rows but {name}[0] has {n}")
        return tuple(data)
    raise TypeError(f"{where}: {name} must be a tuple (x, y) or (x, y, ids) of tensors with equal first dims, "
                    f"got {type(data).__name__}")


def batches(data, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None):
    """Yield tuples of tensor slices (x, y[, ids]) of at most ``batch_size`` rows."""
    n = len(data[0])
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield tuple(t[idx] for t in data)


def _call(model, batch, dev):
    x = batch[0].to(dev)
    if len(batch) == 3:
        return model(x, batch[2].to(dev))
    return model(x)


def set_k(model: nn.Module, k: int) -> None:
    """Set k on every router of ``model`` that has one (TopKRouter, HierarchicalRouter)."""
    for m in moe_modules(model):
        if hasattr(m.router, "k"):
            m.router.k = k


def set_temperature(model: nn.Module, temperature: float) -> None:
    for m in moe_modules(model):
        if hasattr(m.router, "temperature"):
            m.router.temperature = temperature


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of every router (gate) inside ``model``."""
    seen, out = set(), []
    for m in moe_modules(model):
        router = getattr(m, "router", None)
        for p in ([] if router is None else router.parameters()):
            if id(p) not in seen:
                seen.add(id(p)); out.append(p)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 512, loss_fn=F.cross_entropy, device=None) -> dict:
    """Accuracy and mean loss of ``model`` on (x, y[, ids]) in eval mode."""
    data = _as_tensors(data, "evaluate", "data")
    dev = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for batch in batches(data, batch_size):
        out = _call(model, batch, dev)
        y = batch[1].to(dev)
        loss_sum += float(loss_fn(out, y)) * len(y)
        if out.dim() == 2 and y.dim() == 1:
            correct += int((out.argmax(-1) == y).sum())
        total += len(y)
    model.train(was_training)
    return {"acc": correct / total, "loss": loss_sum / total}


def check_fit_arguments(where: str, train, test, *, epochs, batch_size, lr, gate_lr, clip_grad, early_stopping,
                        stop_on, max_steps):
    """The argument checks ``fit`` and its multi-seed sibling share; returns (train, test) as tensor tuples."""
    train = _as_tensors(train, where, "train")
    if test is not None:
        test = _as_tensors(test, where, "test")
    check_int("epochs", epochs, low=1, where=where)
    check_int("batch_size", batch_size, low=1, where=where)
    check_positive_float("lr", lr, where=where)
    if gate_lr is not None:
        check_positive_float("gate_lr", gate_lr, where=where)
    if clip_grad is not None:
        check_positive_float("clip_grad", clip_grad, where=where)
    if early_stopping is not None:
        check_int("early_stopping", early_stopping, low=1, where=where)
        if test is None:
            raise ValueError(f"{where}: early_stopping={early_stopping} needs test data to watch, but test=None; "
                             "pass test=(x, y)")
    if stop_on not in ("test_acc", "test_loss"):
        raise ValueError(f"{where}: stop_on={stop_on!r} is unknown; choose 'test_acc' or 'test_loss'")
    if max_steps is not None:
        check_int("max_steps", max_steps, low=1, where=where)
    return train, test


def fit(
    model: nn.Module,
    train,
    test=None,
    *,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 1e-3,
    gate_lr: float | None = None,
    weight_decay: float = 0.0,
    loss_fn=F.cross_entropy,
    clip_grad: float | None = None,
    early_stopping: int | None = None,
    k_schedule=None,
    temperature_schedule=None,
    seed: int = 0,
    device=None,
    show_progress: bool = True,
    callback=None,
    max_steps: int | None = None,
    stop_on: str = "test_acc",
) -> History:
    """Train ``model`` with Adam on ``train`` = (x, y) or (x, y, ids); evaluate on ``test`` each epoch.

    Args:
        gate_lr: a separate learning rate for router parameters (seed 004's first improvement).
        clip_grad: max global gradient norm (seed 002's best practice); None = no clipping.
        early_stopping: patience in epochs on test accuracy (needs ``test``); the best weights are
            restored at the end.
        k_schedule: ``epoch -> k`` (see ``tutorial_moe.schedules``), applied to every router with k.
        temperature_schedule: ``step -> temperature`` applied to every router.
        callback: ``callback(step_row, model)`` after every step (for live plots or extra logging).
        max_steps: stop after this many optimiser steps in total (for quick demos).
        stop_on: what early stopping watches: "test_acc" (higher is better, the default) or
            "test_loss" (lower is better; use it for regression, where there is no accuracy).

    After every optimiser step, every router with auxiliary-loss-free balancing applies one bias
    step (``update_expert_bias()``) from the load its forwards counted since the last one.

    Raises ``FloatingPointError`` naming the step and each loss part if the loss is not finite.
    Same seed, same data, CPU: bit-identical history and weights.
    """
    train, test = check_fit_arguments("fit", train, test, epochs=epochs, batch_size=batch_size, lr=lr,
                                      gate_lr=gate_lr, clip_grad=clip_grad, early_stopping=early_stopping,
                                      stop_on=stop_on, max_steps=max_steps)

    gen = seed_everything(seed)
    dev = torch.device(device) if device is not None else default_device()
    model.to(dev)
    gate_params = router_parameters(model) if gate_lr is not None else []
    gate_ids = {id(p) for p in gate_params}
    groups = [{"params": [p for p in model.parameters() if id(p) not in gate_ids], "lr": lr}]
    if gate_params:
        groups.append({"params": gate_params, "lr": gate_lr})
    opt = torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)

    hist = History()
    mods = moe_modules(model)
    best_acc, best_state, bad_epochs, step = -1.0, None, 0, 0
    n_batches = math.ceil(len(train[0]) / batch_size)
    bar = progress(total=epochs * n_batches, desc="training", disable=not show_progress)
    for epoch in range(epochs):
        if k_schedule is not None:
            set_k(model, k_schedule(epoch))
        model.train()
        t0 = time.perf_counter()
        correct = seen = 0
        for batch in batches(train, batch_size, shuffle=True, generator=gen):
            if temperature_schedule is not None:
                set_temperature(model, temperature_schedule(step))
            y = batch[1].to(dev)
            out = _call(model, batch, dev)
            task = loss_fn(out, y)
            aux = {name: v for m in mods for name, v in m.aux_losses.items()} if len(mods) == 1 else {
                f"{name}[{i}]": v for i, m in enumerate(mods) for name, v in m.aux_losses.items()}
            loss = task + (torch.stack([m.aux_loss for m in mods]).sum() if mods else 0.0)
            if not torch.isfinite(loss):
                parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in {"task": task, **aux}.items())
                raise FloatingPointError(
                    f"fit: non-finite loss {float(loss.detach())} at step {step} (epoch {epoch}); parts: {parts}. "
                    "Lower the learning rate, enable clip_grad, or add the z loss."
                )
            if out.dim() == 2 and y.dim() == 1:
                correct += int((out.detach().argmax(-1) == y).sum())
            seen += len(y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = None
            if clip_grad is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad))
            opt.step()
            # Auxiliary-loss-free balancing: one bias step per optimiser step, from the load
            # every forward since the last one counted.
            update_expert_biases(model)
            row = {"step": step, "epoch": epoch, "loss": float(loss.detach()), "task": float(task.detach()),
                   "train_acc": correct / seen, **{k: float(v.detach()) for k, v in aux.items()}}
            if grad_norm is not None:
                row["grad_norm"] = grad_norm
            if mods:
                row["utilization"] = [utilization(m.last_routing.mask).tolist() for m in mods]
                row["dropped"] = [float(m.last_routing.dropped.float().mean()) for m in mods]
            hist.steps.append(row)
            if callback is not None:
                callback(row, model)
            step += 1
            bar.update(1)
            if max_steps is not None and step >= max_steps:
                break
        erow = {"epoch": epoch, "train_acc": correct / max(seen, 1), "seconds": time.perf_counter() - t0}
        if mods and hasattr(getattr(mods[0], "router", None), "k"):  # Soft MoE has no router
            erow["k"] = mods[0].router.k
        if test is not None:
            ev = evaluate(model, test, loss_fn=loss_fn, device=dev)
            erow.update(test_acc=ev["acc"], test_loss=ev["loss"])
            bar.set_postfix(test_acc=f"{ev['acc']:.3f}")
        hist.epochs.append(erow)
        if early_stopping is not None:
            # Score to maximise: accuracy, or minus the loss (so one comparison serves both).
            score = erow["test_acc"] if stop_on == "test_acc" else -erow["test_loss"]
            if best_state is None or score > best_acc:
                best_acc, bad_epochs, hist.best_epoch = score, 0, epoch
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_epochs += 1
                if bad_epochs >= early_stopping:
                    hist.stopped_early = True
                    break
        if max_steps is not None and step >= max_steps:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return hist


def save_checkpoint(path, model: nn.Module, optimizer=None, history: History | None = None, **meta) -> Path:
    """Save weights (+ optimiser state, history, metadata); ``load_checkpoint`` restores them exactly."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise ValueError(f"save_checkpoint: path={str(path)!r} is a directory; give a file name like 'model.pt'")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": None if optimizer is None else optimizer.state_dict(),
                "history": None if history is None else history.to_dict(), "meta": meta}, path)
    return path


def load_checkpoint(path, model: nn.Module, optimizer=None):
    """Load a checkpoint into ``model`` (and ``optimizer``); returns (history, meta)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {str(path)!r}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    hist = None if state.get("history") is None else History.from_dict(state["history"])
    return hist, state.get("meta", {})

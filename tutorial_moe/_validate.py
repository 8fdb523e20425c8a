"""Argument checks shared by the package. Every message names the argument, the value and what is allowed."""
from __future__ import annotations

import math

import torch


def check_int(name: str, value, *, low: int | None = None, high: int | None = None, where: str = "") -> int:
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{prefix}{name} must be an int, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        allowed = f"{low} <= {name}" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{prefix}{name}={value} is out of range; allowed: {allowed}")
    if high is not None and value > high:
        allowed = (f"{low} <= " if low is not None else "") + f"{name} <= {high}"
        raise ValueError(f"{prefix}{name}={value} is out of range; allowed: {allowed}")
    return value


def check_positive_float(name: str, value, *, where: str = "", allow_zero: bool = False) -> float:
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{prefix}{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not math.isfinite(value) or not ok:
        rule = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{prefix}{name}={value} is not allowed; it must be a finite number {rule}")
    return value


def check_choice(name: str, value, choices, *, where: str = "") -> str:
    prefix = f"{where}: " if where else ""
    if value not in choices:
        raise ValueError(f"{prefix}{name}={value!r} is unknown; choose one of {sorted(choices)}")
    return value


def check_tokens(x, d_model: int | None, *, where: str, name: str = "x") -> torch.Tensor:
    """A (T, d_model) float tensor with finite values."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{where}: {name} must have shape (tokens, d_model), got shape {tuple(x.shape)}")
    if d_model is not None and x.shape[-1] != d_model:
        raise ValueError(
            f"{where}: {name} has width {x.shape[-1]} (shape {tuple(x.shape)}), but d_model={d_model}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    check_finite(x, where=where, name=name)
    return x


FINITE_CHECK_MODES = ("cpu", "always", "off")
_finite_checks = "cpu"


def set_finite_checks(mode: str) -> str:
    """When routers and layers check their input for NaN/inf; returns the previous mode.

    "cpu" (default): only tensors on the CPU, where the check is one cheap reduction; on an
    accelerator it would force a device sync on every router call (and break ``torch.compile``
    graphs), so there it is skipped. "always": every device (for debugging a NaN on a GPU).
    "off": never.
    """
    global _finite_checks
    if mode not in FINITE_CHECK_MODES:
        raise ValueError(f"set_finite_checks: mode={mode!r} is unknown; choose one of {list(FINITE_CHECK_MODES)}")
    previous, _finite_checks = _finite_checks, mode
    return previous


def check_finite(x: torch.Tensor, *, where: str, name: str = "x") -> None:
    if _finite_checks == "off" or (_finite_checks == "cpu" and x.device.type != "cpu"):
        return
    if torch.compiler.is_compiling():  # a data-dependent branch would split the graph
        return
    # NaN and inf survive a sum, so a finite sum proves every entry finite: one cheap reduction
    # (isfinite(x).all() costs 4 passes, ~2 % of an MoE layer). A non-finite sum may be overflow
    # of finite values, so only then is every entry checked.
    if x.is_floating_point() and bool(torch.isfinite(x.sum())):
        return
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{where}: {name} contains {bad} non-finite values (NaN or inf); inputs must be finite")


def check_labels(labels, n: int, *, where: str, name: str = "labels") -> torch.Tensor:
    if labels is None:
        raise ValueError(f"{where}: {name} is required by this router (one integer per token), got None")
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{where}: {name} must have shape ({n},) to match the tokens, got shape {tuple(labels.shape)}")
    if labels.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise TypeError(f"{where}: {name} must be an integer tensor, got dtype {labels.dtype}")
    if n and labels.min().item() < 0:
        raise ValueError(f"{where}: {name} must be >= 0, got minimum {labels.min().item()}")
    return labels.long()


def check_capacity_factor(value, *, where: str):
    if value is None:
        return None
    return check_positive_float("capacity_factor", value, where=where)


def check_prob_matrix(name: str, p, *, where: str) -> torch.Tensor:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(p).__name__}")
    if p.dim() != 2:
        raise ValueError(f"{where}: {name} must have shape (tokens, experts), got shape {tuple(p.shape)}")
    return p

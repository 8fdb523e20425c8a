"""Schedules for k and temperature over training (a schedule maps an epoch or step to a value)."""
from __future__ import annotations

import math

from ._validate import check_choice, check_int, check_positive_float

__all__ = ["constant_k", "k_per_epoch", "gradual_detachment", "temperature_annealing"]


def constant_k(k: int):
    """k(epoch) = k for every epoch ("tough love" when k < E, "helicopter" training when k = E)."""
    check_int("k", k, low=1, where="constant_k")
    return lambda epoch: k


def k_per_epoch(ks):
    """k(epoch) = ks[epoch], repeating the last value after the list ends.

    Seed 000's "gradual detachment" is ``k_per_epoch([6, 5, 4, 3, 3, 3])``.
    """
    ks = list(ks)
    if not ks:
        raise ValueError("k_per_epoch: ks must be a non-empty list of ints >= 1, got []")
    for i, k in enumerate(ks):
        check_int(f"ks[{i}]", k, low=1, where="k_per_epoch")
    return lambda epoch: ks[min(check_int("epoch", epoch, low=0, where="k_per_epoch"), len(ks) - 1)]


def gradual_detachment(num_experts: int = 6, final_k: int = 3):
    """Start with every expert and drop one per epoch down to ``final_k`` (seed 000's option 3)."""
    check_int("num_experts", num_experts, low=1, where="gradual_detachment")
    check_int("final_k", final_k, low=1, high=num_experts, where="gradual_detachment")
    return k_per_epoch(list(range(num_experts, final_k - 1, -1)))


def temperature_annealing(start: float, end: float, steps: int, kind: str = "exp"):
    """temperature(step) from ``start`` to ``end`` over ``steps`` steps, then held at ``end``.

    "exp" interpolates log-temperature (a constant factor per step), "linear" the value itself.
    A high start keeps routing soft while the gate knows nothing (the cold start); a low end
    makes it decisive.
    """
    start = check_positive_float("start", start, where="temperature_annealing")
    end = check_positive_float("end", end, where="temperature_annealing")
    steps = check_int("steps", steps, low=1, where="temperature_annealing")
    check_choice("kind", kind, ("exp", "linear"), where="temperature_annealing")

    def schedule(step: int) -> float:
        frac = min(max(step, 0), steps) / steps
        if kind == "linear":
            return start + (end - start) * frac
        return math.exp(math.log(start) + (math.log(end) - math.log(start)) * frac)

    return schedule

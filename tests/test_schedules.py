"""Schedules for k and temperature."""
from __future__ import annotations

import math

import pytest

from tutorial_moe.schedules import constant_k, gradual_detachment, k_per_epoch, temperature_annealing


def test_constant_k():
    s = constant_k(2)
    assert [s(e) for e in range(5)] == [2] * 5


def test_k_per_epoch_repeats_the_last_value():
    s = k_per_epoch([4, 3, 1])
    assert [s(e) for e in range(6)] == [4, 3, 1, 1, 1, 1]


def test_gradual_detachment_is_seed_000s_schedule():
    s = gradual_detachment(6, 3)
    assert [s(e) for e in range(8)] == [6, 5, 4, 3, 3, 3, 3, 3]
    assert [gradual_detachment(3, 3)(e) for e in range(3)] == [3, 3, 3]


@pytest.mark.parametrize("kind", ["exp", "linear"])
def test_temperature_annealing_endpoints_and_hold(kind):
    s = temperature_annealing(4.0, 0.25, steps=10, kind=kind)
    assert s(0) == pytest.approx(4.0)
    assert s(10) == pytest.approx(0.25)
    assert s(50) == pytest.approx(0.25)  # held at the end
    assert s(-3) == pytest.approx(4.0)
    values = [s(i) for i in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing


def test_temperature_annealing_shapes():
    exp = temperature_annealing(4.0, 0.25, steps=10, kind="exp")
    lin = temperature_annealing(4.0, 0.25, steps=10, kind="linear")
    assert exp(5) == pytest.approx(1.0)  # geometric midpoint sqrt(4 * 0.25)
    assert lin(5) == pytest.approx(2.125)  # arithmetic midpoint
    ratios = [exp(i + 1) / exp(i) for i in range(10)]
    assert max(ratios) == pytest.approx(min(ratios))  # a constant factor per step
    assert ratios[0] == pytest.approx(math.exp(math.log(0.25 / 4.0) / 10))

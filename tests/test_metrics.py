"""Monitoring metrics at known points."""
from __future__ import annotations

import math

import pytest
import torch

from tutorial_moe.metrics import (
    activation_rates,
    collapse_report,
    dropped_fraction,
    load_imbalance,
    routing_changes,
    routing_entropy,
    specialization,
    utilization,
)

E = 4


def _onehot(experts, E=E):
    return torch.nn.functional.one_hot(torch.as_tensor(experts), E).bool()


def test_utilization_sums_to_one_and_counts_assignments():
    mask = torch.rand(50, E) > 0.5
    mask[0] = True  # at least one assignment
    u = utilization(mask)
    assert u.shape == (E,) and u.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(u, mask.float().sum(0) / mask.sum())
    assert torch.equal(utilization(torch.zeros(3, E, dtype=torch.bool)), torch.zeros(E))


def test_routing_entropy_bounds():
    assert routing_entropy(torch.full((5, E), 1 / E)).item() == pytest.approx(math.log(E), rel=1e-6)
    assert routing_entropy(_onehot([0, 1, 2]).float()).item() == pytest.approx(0.0, abs=1e-9)


def test_activation_rates_table_with_nan_for_an_empty_group():
    gates = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.2, 0.8]])
    groups = torch.tensor([0, 0, 2, 2])
    table = activation_rates(gates, groups, num_groups=3)
    assert table.shape == (3, 2)
    assert torch.allclose(table[0], torch.tensor([0.75, 0.25]))
    assert torch.allclose(table[2], torch.tensor([0.1, 0.9]))
    assert torch.isnan(table[1]).all()
    # rows of non-empty groups still sum to 1 (rows of the gates did)
    assert torch.allclose(table[[0, 2]].sum(-1), torch.ones(2))
    assert activation_rates(gates, groups).shape == (3, 2)  # G inferred from the largest group id


def test_specialization_perfect_and_independent():
    labels = torch.arange(40) % E
    assert specialization(_onehot(labels), labels) == pytest.approx(1.0, abs=1e-9)
    # a relabelled one-to-one mapping is just as specialised
    assert specialization(_onehot((labels + 1) % E), labels) == pytest.approx(1.0, abs=1e-9)
    # every (expert, label) pair equally often: the expert says nothing about the label
    experts = (torch.arange(40) // E) % E
    assert specialization(_onehot(experts), labels) == pytest.approx(0.0, abs=1e-9)
    # random routing of many tokens: close to 0
    g = torch.Generator().manual_seed(0)
    rand_labels = torch.randint(0, 10, (5000,), generator=g)
    rand_experts = torch.randint(0, E, (5000,), generator=g)
    assert specialization(_onehot(rand_experts), rand_labels) < 0.01


def test_specialization_of_a_single_expert_is_zero():
    labels = torch.arange(12) % 3
    assert specialization(torch.ones(12, 1, dtype=torch.bool), labels) == 0.0


def test_load_imbalance_and_dropped_fraction():
    assert load_imbalance(_onehot(torch.arange(8) % E)) == pytest.approx(1.0)
    assert load_imbalance(_onehot([0] * 8)) == pytest.approx(E)
    assert dropped_fraction(torch.tensor([True, False, False, False])) == 0.25
    assert dropped_fraction(torch.zeros(0, dtype=torch.bool)) == 0.0


def test_collapse_report_flags_collapse_not_balance():
    collapsed = collapse_report(_onehot([0] * 30 + [1] * 2))
    assert collapsed["collapsed"] and collapsed["dominant"] == [0]
    assert collapsed["dead"] == [2, 3]
    balanced = collapse_report(_onehot(torch.arange(32) % E))
    assert not balanced["collapsed"] and balanced["dead"] == [] and balanced["dominant"] == []
    assert balanced["utilization"] == [0.25] * 4
    half_dead = collapse_report(_onehot([0, 1] * 10))  # 2 of 4 experts never used, none dominant
    assert half_dead["collapsed"] and half_dead["dominant"] == []


def test_routing_changes():
    a = _onehot([0, 1, 2, 3])
    b = _onehot([0, 1, 3, 3])
    assert routing_changes(a, a) == 0.0
    assert routing_changes(a, b) == 0.25

"""The mixture-of-regimes task: shapes, determinism, ground truth, and the R^2 metric."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from tutorial_moe.experiments.tasks import MixtureOfRegimes, RegimeSplit, r2_score


def test_shapes_dtypes_and_balanced_regimes():
    task = MixtureOfRegimes(num_regimes=4, d_in=5, d_out=3, seed=1)
    s = task.sample(103, seed=2)
    assert isinstance(s, RegimeSplit) and len(s) == 103
    assert s.x.shape == (103, 5) and s.x.dtype == torch.float32
    assert s.y.shape == (103, 3) and s.y.dtype == torch.float32
    assert s.regime.dtype == torch.int64 and s.index.tolist() == list(range(103))
    counts = torch.bincount(s.regime, minlength=4)
    assert counts.max() - counts.min() <= 1  # equal shares up to the remainder


def test_same_seed_same_data_and_different_seeds_differ():
    a, b = MixtureOfRegimes(seed=3), MixtureOfRegimes(seed=3)
    assert torch.equal(a.sample(64, seed=0).x, b.sample(64, seed=0).x)
    assert not torch.equal(a.sample(64, seed=0).x, a.sample(64, seed=1).x)
    assert not torch.equal(a.centres, MixtureOfRegimes(seed=4).centres)


def test_targets_follow_the_regime_function_exactly_without_noise():
    task = MixtureOfRegimes(num_regimes=3, d_in=4, d_out=2, noise=0.0)
    s = task.sample(50)
    torch.testing.assert_close(task.target(s.x, s.regime), s.y)
    # The same input under another regime gets another target: regimes are different functions.
    other = (s.regime + 1) % 3
    assert (task.target(s.x, other) - s.y).abs().mean() > 0.1


def test_noise_is_added_with_the_requested_std():
    task = MixtureOfRegimes(num_regimes=2, d_in=3, d_out=2, noise=0.5)
    s = task.sample(4000)
    resid = s.y - task.target(s.x, s.regime)
    assert abs(float(resid.std()) - 0.5) < 0.03


def test_each_regime_has_unit_scale_targets():
    task = MixtureOfRegimes(num_regimes=4, d_in=8, d_out=4, seed=0)
    s = task.sample(8000)
    for r in range(4):
        std = float(s.y[s.regime == r].std(0).mean())
        assert 0.8 < std < 1.2, (r, std)


def test_regime_is_readable_from_the_input_by_nearest_centre():
    task = MixtureOfRegimes(num_regimes=8, d_in=16, separation=4.0)
    s = task.sample(2000)
    nearest = torch.cdist(s.x, task.centres).argmin(1)
    assert (nearest == s.regime).float().mean() > 0.95


def test_splits_have_disjoint_ids_and_different_samples():
    tr, te = MixtureOfRegimes().splits(100, 40)
    assert set(tr.index.tolist()).isdisjoint(te.index.tolist())
    assert len(tr) == 100 and len(te) == 40
    assert tr.tensors()[0] is tr.x and len(tr.tensors(with_ids=True)) == 3
    assert len(tr.subset(10)) == 10


@pytest.mark.parametrize("kwargs, err", [
    ({"num_regimes": 0}, ValueError), ({"d_in": 2.5}, TypeError), ({"frequency": -1.0}, ValueError),
    ({"noise": float("nan")}, ValueError), ({"separation": -1}, ValueError),
])
def test_bad_task_arguments_name_the_argument(kwargs, err):
    with pytest.raises(err, match=next(iter(kwargs))):
        MixtureOfRegimes(**kwargs)


def test_bad_target_inputs():
    task = MixtureOfRegimes(num_regimes=2, d_in=3)
    with pytest.raises(ValueError, match="x must have shape"):
        task.target(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="regime values"):
        task.target(torch.zeros(4, 3), torch.full((4,), 2))
    with pytest.raises(ValueError, match="n=0"):
        task.sample(0)


def test_r2_score_oracle():
    y = torch.randn(200, 3)
    assert r2_score(y, y) == pytest.approx(1.0)
    assert r2_score(y.mean(0).expand_as(y), y) == pytest.approx(0.0, abs=1e-12)
    pred = y + 0.3 * torch.randn_like(y)
    manual = 1 - ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert r2_score(pred, y) == pytest.approx(float(manual), rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        r2_score(y[:5], y)
    with pytest.raises(ValueError, match="constant"):
        r2_score(y, torch.ones_like(y))


@given(st.floats(0.0, 3.0), st.floats(0.0, 3.0))
def test_r2_falls_as_the_error_grows(a, b):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(100, 2, generator=g)
    err = torch.randn(100, 2, generator=g)
    lo, hi = sorted((a, b))
    assert r2_score(y + lo * err, y) >= r2_score(y + hi * err, y) - 1e-12

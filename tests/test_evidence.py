"""The evidence protocol: verdicts on constructed inputs, the interval by hand, bad input."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tutorial_moe.book import evidence as ev

# Student-t 97.5 % quantiles from printed tables (6 significant digits).
T975 = {1: 12.7062, 2: 4.30265, 4: 2.77645, 9: 2.26216, 29: 2.04523, 100: 1.98397}


@pytest.mark.parametrize("df, q", sorted(T975.items()))
def test_t_quantile_matches_tables(df, q):
    assert ev.t_quantile(0.975, df) == pytest.approx(q, abs=2e-5)
    assert ev.t_quantile(0.025, df) == pytest.approx(-q, abs=2e-5)


def test_interval_by_hand():
    a, b = [0.91, 0.93, 0.92, 0.95, 0.94], [0.90, 0.90, 0.91, 0.92, 0.90]
    d = [0.01, 0.03, 0.01, 0.03, 0.04]
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    half = 2.776445 * sd / math.sqrt(5)
    out = ev.compare(a, b, ">")
    assert out.n == 5 and out.diff == pytest.approx(mean)
    assert out.ci == pytest.approx((mean - half, mean + half), abs=1e-6)
    assert out.detectable == pytest.approx(half, abs=1e-6)
    assert out.verdict == ev.HOLDS


def test_each_verdict():
    base = [1.0, 2.0, 3.0, 4.0, 5.0]
    up = [x + 1 + 0.01 * i for i, x in enumerate(base)]
    noisy = [x + s for x, s in zip(base, [0.5, -0.4, 0.3, -0.6, 0.1])]
    assert ev.compare(up, base, ">").verdict == ev.HOLDS
    assert ev.compare(up, base, "<").verdict == ev.FAILS
    assert ev.compare(noisy, base, ">").verdict == ev.INCONCLUSIVE
    tiny = [x + 0.001 * (1 + (i % 2)) for i, x in enumerate(base)]
    assert ev.compare(tiny, base, ">").verdict == ev.HOLDS  # real but tiny ...
    assert ev.compare(tiny, base, ">", margin=0.05).verdict == ev.FAILS  # ... and below the margin
    out = ev.compare(up, base, ">", scale_note="2,000 images instead of 60,000")
    assert out.verdict == ev.NOT_REPRODUCED and "2,000" in str(out)
    assert ev.shown(0.25, "share").verdict == ev.SHOWN


def test_inconclusive_states_detectable_effect():
    out = ev.compare([1.0, 2.0, 3.0], [1.5, 1.0, 3.2], ">")
    assert out.verdict == ev.INCONCLUSIVE
    assert "smallest detectable effect" in str(out)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5)), min_size=2, max_size=12),
       st.sampled_from([">", "<"]))
def test_swapping_a_and_b_with_the_opposite_prediction_gives_the_same_verdict(pairs, predicted):
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    other = "<" if predicted == ">" else ">"
    one, two = ev.compare(a, b, predicted), ev.compare(b, a, other)
    assert one.verdict == two.verdict
    assert one.diff == pytest.approx(-two.diff, abs=1e-9)


@pytest.mark.parametrize("a, b, predicted, kwargs, match", [
    ([1.0], [2.0], ">", {}, "at least 2"),
    ([1.0, 2.0], [1.0], ">", {}, "paired"),
    ([1.0, float("nan")], [1.0, 2.0], ">", {}, "non-finite"),
    ([1.0, 2.0], [1.0, 2.0], "=", {}, "predicted"),
    ([1.0, 2.0], [1.0, 2.0], ">", {"margin": -1}, "margin"),
    ([1.0, 2.0], [1.0, 2.0], ">", {"scale_note": ""}, "scale_note"),
    (["x", 2.0], [1.0, 2.0], ">", {}, "sequence of numbers"),
])
def test_bad_input(a, b, predicted, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ev.compare(a, b, predicted, **kwargs)


def test_to_dict_round_trips_the_text():
    out = ev.compare([2.0, 3.0, 4.0], [1.0, 1.5, 2.0], ">", what="accuracy")
    d = out.to_dict()
    assert d["verdict"] == out.verdict and d["text"] == str(out) and d["ci"] == list(out.ci)

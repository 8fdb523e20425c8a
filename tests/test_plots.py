"""The monitoring dashboard and the small plot helpers return labelled figures (Agg backend)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tutorial_moe import MoELayer  # noqa: E402
from tutorial_moe.blocks import TokenRegressor  # noqa: E402
from tutorial_moe.book.plots import DASHBOARD_PANELS, plot_bars, plot_dashboard, plot_lines  # noqa: E402
from tutorial_moe.train import fit  # noqa: E402


def _records(n=6, E=4, collapse=False):
    recs = []
    for i in range(n):
        u = [1.0] + [0.0] * (E - 1) if collapse else [1 / E] * E
        recs.append({"step": 2 * i, "task": 1.0 / (i + 1), "utilization": u, "entropy": 0.5, "specialization": 0.1 * i,
                     "load_imbalance": 1.2, "dropped": 0.01, "train_dropped": 0.02,
                     "changes": None if i == 0 else 0.1})
    return recs


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_dashboard_draws_every_panel_with_titles_and_axis_labels():
    fig = plot_dashboard(_records(), num_experts=4, title="run")
    assert len(fig.axes) == len(DASHBOARD_PANELS)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [v[0] for v in DASHBOARD_PANELS.values()]
    assert all(ax.get_xlabel() == "training step" and ax.get_ylabel() for ax in fig.axes)
    util = fig.axes[titles.index("Expert utilisation")]
    assert len(util.lines) == 4 + 1  # one line per expert and the fair share
    dropped = fig.axes[titles.index("Dropped tokens")]
    assert len(dropped.lines) == 2  # probe and training batch


def test_dashboard_panel_subset_and_overlaid_runs():
    fig = plot_dashboard({"healthy": _records(), "collapse": _records(collapse=True)},
                         panels=["utilization", "entropy"])
    assert len(fig.axes) == 2
    util = fig.axes[0]
    assert util.get_legend() is not None and fig.axes[1].get_legend() is None  # one legend names the runs
    assert [t.get_text() for t in util.get_legend().get_texts()] == ["healthy", "collapse"]
    assert len(util.lines) == 2 * 2 + 2  # busiest and idlest per run, fair-share line per run
    assert "busiest" in util.get_title()


def test_dashboard_accepts_a_fit_history_and_a_monitor_like_object():
    x, y = torch.randn(32, 3), torch.randn(32, 2)
    hist = fit(TokenRegressor(3, 8, 2, MoELayer(8, 8, 4, 2)), (x, y), epochs=1, batch_size=8,
               loss_fn=F.mse_loss, show_progress=False)
    fig = plot_dashboard(hist)
    titles = [ax.get_title() for ax in fig.axes]
    assert "Expert utilisation" in titles and "Dropped tokens" in titles

    class Mon:
        records = _records()
    assert len(plot_dashboard(Mon()).axes) == len(DASHBOARD_PANELS)


def test_dashboard_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown"):
        plot_dashboard(_records(), panels=["accuracy"])
    with pytest.raises(TypeError, match="RoutingMonitor"):
        plot_dashboard(42)
    with pytest.raises(ValueError, match="empty"):
        plot_dashboard({})
    with pytest.raises(ValueError, match="no recorded metric"):
        plot_dashboard([{"step": 0}])


def test_line_and_bar_helpers():
    fig = plot_lines([1, 2, 4], {"a": [1, 2, 3], "b": [3, 2, 1]}, "x", "y", "t", logx=True, hline=1.0)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_title() == "t" and len(ax.lines) == 3
    fig = plot_bars(["p", "q"], {"s": [1, 2], "u": [2, 1]}, "y", "bars")
    assert len(fig.axes[0].patches) == 4
    with pytest.raises(ValueError, match="has 1 values"):
        plot_lines([1, 2], {"a": [1]}, "x", "y", "t")
    with pytest.raises(ValueError, match="labels"):
        plot_bars(["p"], {"s": [1, 2]}, "y", "t")

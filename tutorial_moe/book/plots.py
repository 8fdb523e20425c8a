"""Plot helpers for the token-level chapters; every function returns a matplotlib Figure.

The main one is :func:`plot_dashboard`, the monitoring dashboard of seed 002's list: task loss,
expert utilisation, routing entropy, specialisation, load imbalance, dropped tokens and routing
instability over training, for one run or several runs overlaid.
"""
from __future__ import annotations

import math

from .style import tidy_layout

__all__ = ["DASHBOARD_PANELS", "plot_dashboard", "plot_lines", "plot_bars"]

#: key -> (panel title, y label). Keys are those of ``RoutingMonitor.records``.
DASHBOARD_PANELS = {
    "task": ("Task loss (training step)", "loss"),
    "utilization": ("Expert utilisation", "share of assignments"),
    "entropy": ("Routing entropy", "nats per token"),
    "specialization": ("Specialisation vs true label", "NMI"),
    "load_imbalance": ("Load imbalance", "max load / mean load"),
    "dropped": ("Dropped tokens", "share of tokens"),
    "changes": ("Routing instability", "share of tokens that changed expert"),
}


def _records_of(run) -> list[dict]:
    """Accept a RoutingMonitor, a list of record dicts, or a fit History (its step rows)."""
    if hasattr(run, "records"):
        return list(run.records)
    if hasattr(run, "steps") and hasattr(run, "epochs"):
        rows = []
        for r in run.steps:  # fit's rows hold one utilisation list per MoE module: show the first
            row = dict(r)
            if isinstance(row.get("utilization"), list) and row["utilization"] and isinstance(row["utilization"][0], list):
                row["utilization"] = row["utilization"][0]
            if isinstance(row.get("dropped"), list):
                row["dropped"] = row["dropped"][0] if row["dropped"] else None
            rows.append(row)
        return rows
    if isinstance(run, list) and all(isinstance(r, dict) for r in run):
        return run
    raise TypeError(f"plot_dashboard: a run must be a RoutingMonitor, a list of dicts or a History, got {type(run).__name__}")


def _figure(n_panels: int, ncols: int, panel_size=(3.3, 2.5), dpi: int = 90):
    import matplotlib.pyplot as plt

    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), dpi=dpi,
                             squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n_panels:]:
        fig.delaxes(ax)
    return fig, flat[:n_panels]


def plot_dashboard(runs, panels=None, title: str | None = None, ncols: int = 4, num_experts: int | None = None):
    """The monitoring dashboard: one panel per metric, x axis = training step.

    Args:
        runs: one run (a ``RoutingMonitor``, its ``records`` list, or a fit ``History``) or a dict
            ``{name: run}`` to overlay several runs (e.g. healthy vs collapsing).
        panels: keys of :data:`DASHBOARD_PANELS` to draw (default: every key some run has).
        num_experts: draws ln(E) on the entropy panel (the entropy of a router that cannot decide).

    With one run, the utilisation panel has one line per expert (the fair share 1/E dashed); with
    several, it shows each run's busiest (solid) and idlest (dotted) expert, and only the first panel
    has a legend. Returns the Figure.
    """
    import matplotlib.pyplot as plt  # noqa: F401 - imported for its side effect of choosing a backend

    named = dict(runs) if isinstance(runs, dict) else {None: runs}
    if not named:
        raise ValueError("plot_dashboard: runs is empty; give at least one run")
    data = {name: _records_of(run) for name, run in named.items()}
    if panels is None:
        panels = [k for k in DASHBOARD_PANELS if any(any(r.get(k) is not None for r in recs) for recs in data.values())]
    else:
        unknown = [p for p in panels if p not in DASHBOARD_PANELS]
        if unknown:
            raise ValueError(f"plot_dashboard: panels {unknown} are unknown; choose from {list(DASHBOARD_PANELS)}")
    if not panels:
        raise ValueError("plot_dashboard: the runs have no recorded metric to plot")
    fig, axes = _figure(len(panels), ncols)
    colors = [f"C{i}" for i in range(10)]
    for ax, key in zip(axes, panels):
        head, ylabel = DASHBOARD_PANELS[key]
        for i, (name, recs) in enumerate(data.items()):
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
            if not pts:
                continue
            steps = [p[0] for p in pts]
            if key == "utilization":
                E = len(pts[0][1])
                if len(data) == 1:
                    for e in range(E):  # no legend: E coloured lines need none, and it would hide them
                        ax.plot(steps, [p[1][e] for p in pts], lw=1)
                    ax.axhline(1 / E, color="k", ls="--", lw=0.8, label="fair share 1/E")
                else:
                    ax.plot(steps, [max(p[1]) for p in pts], color=colors[i % 10], lw=1.3, label=name)
                    ax.plot(steps, [min(p[1]) for p in pts], color=colors[i % 10], lw=1, ls=":")
                    ax.axhline(1 / E, color="k", ls="--", lw=0.8)
            else:
                ax.plot(steps, [p[1] for p in pts], color=colors[i % 10], lw=1.3,
                        label=("probe tokens" if key == "dropped" and len(data) == 1 else name))
                extra = [(r["step"], r["train_dropped"]) for r in recs if r.get("train_dropped") is not None]
                if key == "dropped" and extra and len(data) == 1:
                    ax.plot([p[0] for p in extra], [p[1] for p in extra], color="C1", lw=1, ls="--",
                            label="training batch")
        if key == "entropy" and num_experts:
            ax.axhline(math.log(num_experts), color="k", ls="--", lw=0.8, label="ln E (undecided)")
        if key == "load_imbalance":
            ax.axhline(1.0, color="k", ls="--", lw=0.8, label="perfect balance")
        if key == "utilization" and len(data) > 1:
            head = head + " (solid: busiest, dotted: idlest)"
        ax.set_title(head, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        handles, labels = ax.get_legend_handles_labels()
        # Several runs: one legend (on the first panel) names them all; more would hide the curves.
        if handles and any(labels) and (len(data) == 1 or ax is axes[0]):
            ax.legend(fontsize=6, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    tidy_layout(fig)
    return fig


def plot_lines(x, series: dict, xlabel: str, ylabel: str, title: str, logx: bool = False, markers: bool = True,
               ax=None, hline: float | None = None):
    """Several named y-series against one x (a sweep). Returns the Figure."""
    import matplotlib.pyplot as plt

    if not series:
        raise ValueError("plot_lines: series is empty")
    for name, ys in series.items():
        if len(ys) != len(x):
            raise ValueError(f"plot_lines: series {name!r} has {len(ys)} values but x has {len(x)}")
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 3), dpi=90)
    else:
        fig = ax.figure
    for name, ys in series.items():
        ax.plot(x, ys, marker="o" if markers else None, ms=4, label=name)
    if hline is not None:
        ax.axhline(hline, color="k", ls="--", lw=0.8)
    if logx:
        ax.set_xscale("log")
        ax.minorticks_off()  # label the swept values themselves, not the decades
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{v:g}" for v in x], fontsize=7)
    ax.set_xlabel(xlabel); ax.set_ylabel(ylabel); ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    tidy_layout(fig)
    return fig


def plot_bars(labels, series: dict, ylabel: str, title: str, ax=None, rotate: int = 30):
    """Grouped bars: one group per label, one bar per named series. Returns the Figure."""
    import matplotlib.pyplot as plt

    if not series:
        raise ValueError("plot_bars: series is empty")
    for name, ys in series.items():
        if len(ys) != len(labels):
            raise ValueError(f"plot_bars: series {name!r} has {len(ys)} values but there are {len(labels)} labels")
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.5, 0.55 * len(labels) * max(1, len(series))), 3), dpi=90)
    else:
        fig = ax.figure
    width = 0.8 / len(series)
    for i, (name, ys) in enumerate(series.items()):
        ax.bar([j + i * width - 0.4 + width / 2 for j in range(len(labels))], ys, width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=rotate, ha="right" if rotate else "center", fontsize=8)
    ax.set_ylabel(ylabel); ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=7)
    tidy_layout(fig)
    return fig

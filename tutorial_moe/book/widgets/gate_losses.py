"""Chapter 07's explorer for seed 004's gate loss ``alpha * batch term + beta * sample term``.

* :class:`GateLossGrid` - results of one training function on a small grid of (kind, alpha, beta),
  computed once, so that looking a setting up costs nothing.
* :class:`GateLossExplorer` - sliders for alpha and beta and a selector for the loss kind
  ("entropy", "variance", "variance_literal" or "variance_samples"). A slider move shows the nearest precomputed
  setting at once (and says when it is not the exact one); the button trains the exact setting
  and adds it to the grid.
* :func:`grid_animation` - the whole grid as a matplotlib animation, for the static book
  (``HTML(grid_animation(grid).to_jshtml())`` gives a scrubber that needs no running kernel).

A "result" is anything with the fields of :class:`tutorial_moe.experiments.two_domains.RunResult` that the
plots read: ``rates`` ({"train", "test"} -> (2, E)), ``step_epochs``, ``train_acc_steps``,
``test_acc_epochs`` and ``test_acc``.
"""
from __future__ import annotations

import math

from ..style import tidy_layout

__all__ = ["LOSS_KINDS", "GateLossGrid", "GateLossExplorer", "grid_key", "nearest_value", "plot_setting",
           "grid_animation"]

LOSS_KINDS = ("entropy", "variance", "variance_literal", "variance_samples")  # see tutorial_moe.experiments.two_domains.seed_gate_losses


def _check_weight(name: str, value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: {name}={value!r} must be a finite number >= 0")
    return float(value)


def grid_key(kind: str, alpha: float, beta: float) -> tuple[str, float, float]:
    """The canonical key of a setting; (alpha, beta) = (0, 0) is the same model for every kind,
    and with alpha = 0 both variance readings are the same model (only the sample term)."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"grid_key: kind={kind!r} is unknown; choose one of {list(LOSS_KINDS)}")
    alpha, beta = _check_weight("alpha", alpha, "grid_key"), _check_weight("beta", beta, "grid_key")
    if alpha == 0 and beta == 0:
        kind = LOSS_KINDS[0]
    elif alpha == 0 and kind == "variance_samples":
        kind = "variance_literal"  # the two readings differ only in the batch term
    return (kind, round(alpha, 12), round(beta, 12))


def nearest_value(value: float, choices) -> float:
    """The element of ``choices`` closest to ``value`` on a log scale (so 0.05 is nearer 0.1 than 0).

    Zero is placed one decade below the smallest positive choice, which keeps it reachable.
    """
    choices = sorted(set(float(c) for c in choices))
    if not choices:
        raise ValueError("nearest_value: choices is empty")
    value = _check_weight("value", value, "nearest_value")
    positive = [c for c in choices if c > 0]
    floor = (min(positive) if positive else 1.0) / 10

    def pos(v):
        return math.log10(max(v, floor))

    return min(choices, key=lambda c: (abs(pos(c) - pos(value)), c))


class GateLossGrid:
    """``{(kind, alpha, beta): result}`` over ``kinds x alphas x betas`` (see :func:`grid_key`)."""

    def __init__(self, alphas, betas, kinds=LOSS_KINDS, results: dict | None = None):
        self.alphas = sorted(set(_check_weight("alphas[i]", a, "GateLossGrid") for a in alphas))
        self.betas = sorted(set(_check_weight("betas[i]", b, "GateLossGrid") for b in betas))
        self.kinds = list(kinds)
        if not self.alphas or not self.betas or not self.kinds:
            raise ValueError("GateLossGrid: alphas, betas and kinds must each hold at least one value")
        for k in self.kinds:
            grid_key(k, 0, 0)  # validates the kind
        self.results: dict = {}
        for key, value in (results or {}).items():
            self.add(key, value)

    def points(self) -> list[tuple[str, float, float]]:
        """Every distinct grid key, ordered by kind, beta, alpha."""
        seen, out = set(), []
        for kind in self.kinds:
            for b in self.betas:
                for a in self.alphas:
                    key = grid_key(kind, a, b)
                    if key not in seen:
                        seen.add(key)
                        out.append(key)
        return out

    @classmethod
    def compute(cls, train_fn, alphas, betas, kinds=LOSS_KINDS, known: dict | None = None,
                show_progress: bool = True) -> "GateLossGrid":
        """Call ``train_fn(kind, alpha, beta)`` once per distinct grid point not already in ``known``
        (``{(kind, alpha, beta): result}``, e.g. runs a chapter has made anyway)."""
        grid = cls(alphas, betas, kinds, results=known)
        grid.fill(train_fn, show_progress=show_progress)
        return grid

    def missing(self) -> list[tuple[str, float, float]]:
        """Grid points that have no result yet."""
        return [key for key in self.points() if key not in self.results]

    def fill(self, train_fn, show_progress: bool = True) -> int:
        """Train every missing grid point with ``train_fn(kind, alpha, beta)``; returns how many ran."""
        from ...runtime import progress

        if not callable(train_fn):
            raise TypeError(f"GateLossGrid.fill: train_fn must be callable, got {type(train_fn).__name__}")
        todo = self.missing()
        for key in progress(todo, desc="grid", disable=not show_progress):
            self.add(key, train_fn(*key))
        return len(todo)

    def add(self, key, result) -> None:
        self.results[grid_key(*key)] = result

    def __contains__(self, key) -> bool:
        return grid_key(*key) in self.results

    def __getitem__(self, key):
        k = grid_key(*key)
        if k not in self.results:
            raise KeyError(f"GateLossGrid: no result for kind={k[0]!r}, alpha={k[1]}, beta={k[2]}")
        return self.results[k]

    def __len__(self) -> int:
        return len(self.results)

    def nearest(self, kind: str, alpha: float, beta: float) -> tuple[str, float, float]:
        """The key of the exact setting if it was trained, else of the nearest grid point."""
        exact = grid_key(kind, alpha, beta)
        if exact in self.results:
            return exact
        return grid_key(kind, nearest_value(alpha, self.alphas), nearest_value(beta, self.betas))


def _title(key) -> str:
    kind, alpha, beta = key
    if alpha == 0 and beta == 0:
        return "no gate loss (alpha = beta = 0)"
    return f"{kind} loss, alpha = {alpha:g}, beta = {beta:g}"


def plot_setting(result, key, fig=None):
    """Train and test activation tables and the accuracy curves of one setting, in one figure."""
    import matplotlib.pyplot as plt

    from ...experiments.two_domains import plot_activation, plot_curves

    if fig is None:
        fig = plt.figure(figsize=(9, 2.8), dpi=80)
    fig.clf()
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 2.2]})
    plot_activation(result.rates["train"], ax=axes[0], title="activation rate (train)")
    plot_activation(result.rates["test"], ax=axes[1], title="activation rate (test)")
    plot_curves({"model": result}, ax=axes[2], title=f"accuracy, final test {result.test_acc:.3f}")
    fig.suptitle(_title(key), fontsize=10)
    tidy_layout(fig)
    return fig


def grid_animation(grid: GateLossGrid, keys=None, interval_ms: int = 900):
    """A matplotlib ``FuncAnimation`` with one frame per grid point (default: all, kind-beta-alpha order).

    In a notebook: ``HTML(grid_animation(grid).to_jshtml())`` - a scrubber that works in static HTML.
    """
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation

    keys = [k for k in (grid.points() if keys is None else [grid_key(*k) for k in keys]) if k in grid]
    if not keys:
        raise ValueError("grid_animation: none of the requested grid points has a result")
    fig = plt.figure(figsize=(9, 2.8), dpi=60)

    def draw(i):
        plot_setting(grid[keys[i]], keys[i], fig=fig)
        return fig.axes

    anim = FuncAnimation(fig, draw, frames=len(keys), interval=interval_ms, repeat=False)
    plt.close(fig)  # the animation keeps the figure; do not also show it as a still image
    return anim


class GateLossExplorer:
    """Sliders (alpha, beta), a loss-kind selector and a retrain button over a :class:`GateLossGrid`.

    ``retrain_fn(kind, alpha, beta) -> result`` trains one exact setting (the button); without it
    the button is disabled. After every change, ``shown_key`` is the setting on display and
    ``shown_exact`` whether it equals the sliders' setting; ``table_text`` holds its activation table.
    """

    def __init__(self, grid: GateLossGrid, retrain_fn=None, alpha_max: float | None = None,
                 beta_max: float | None = None):
        import ipywidgets as w

        if not isinstance(grid, GateLossGrid):
            raise TypeError(f"GateLossExplorer: grid must be a GateLossGrid, got {type(grid).__name__}")
        if len(grid) == 0:
            raise ValueError("GateLossExplorer: grid has no results; compute it first")
        if retrain_fn is not None and not callable(retrain_fn):
            raise TypeError(f"GateLossExplorer: retrain_fn must be callable or None, got {type(retrain_fn).__name__}")
        self.grid, self.retrain_fn = grid, retrain_fn
        a_max = alpha_max if alpha_max is not None else max(grid.alphas) or 1.0
        b_max = beta_max if beta_max is not None else max(grid.betas) or 1.0
        start = grid.points()[0]
        seed_like = grid_key(grid.kinds[0], nearest_value(0.1, grid.alphas), nearest_value(0.01, grid.betas))
        if seed_like in grid:
            start = seed_like
        self.kind = w.Dropdown(options=list(grid.kinds), value=start[0], description="loss")
        self.alpha = w.FloatSlider(value=start[1], min=0.0, max=a_max, step=a_max / 100, description="alpha",
                                   readout_format=".3f", continuous_update=False)
        self.beta = w.FloatSlider(value=start[2], min=0.0, max=b_max, step=b_max / 100, description="beta",
                                  readout_format=".3f", continuous_update=False)
        self.button = w.Button(description="Retrain this exact setting", disabled=retrain_fn is None,
                               layout=w.Layout(width="auto"))
        self.status = w.HTML()
        self.out = w.Output()
        for control in (self.kind, self.alpha, self.beta):
            control.observe(lambda change: self.update(), names="value")
        self.button.on_click(lambda _: self.retrain())
        self.shown_key, self.shown_exact, self.table_text = None, False, ""
        self.widget = w.VBox([w.HBox([self.kind, self.button]), self.alpha, self.beta, self.status, self.out])
        self.update()

    def setting(self) -> tuple[str, float, float]:
        """The key of the sliders' exact setting."""
        return grid_key(self.kind.value, self.alpha.value, self.beta.value)

    def update(self) -> None:
        """Show the exact setting if it was trained, else the nearest grid point (and say so)."""
        from ...experiments.two_domains import activation_table_rows, format_activation_table

        want = self.setting()
        key = self.grid.nearest(*want)
        self.shown_key, self.shown_exact = key, key == want
        result = self.grid[key]
        self.table_text = format_activation_table(activation_table_rows({_title(key): result}), digits=3)
        note = "" if self.shown_exact else (
            f" (nearest precomputed setting to alpha = {want[1]:g}, beta = {want[2]:g}; "
            "press the button to train the exact one)")
        self.status.value = f"<b>Showing:</b> {_title(key)}{note}"
        self._render(result, key)

    def _render(self, result, key) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import Markdown, clear_output, display

        fig = plot_setting(result, key)
        with self.out:
            clear_output(wait=True)
            display(Markdown("```\n" + self.table_text + "\n```"))
            display(fig)
        plt.close(fig)

    def retrain(self):
        """Train the sliders' exact setting with ``retrain_fn``, add it to the grid and show it."""
        if self.retrain_fn is None:
            raise RuntimeError("GateLossExplorer.retrain: no retrain_fn was given, so nothing can be trained")
        key = self.setting()
        self.button.disabled = True
        self.status.value = f"<b>Training</b> {_title(key)} ..."
        try:
            self.grid.add(key, self.retrain_fn(*key))
        finally:
            self.button.disabled = False
        self.update()
        return self.grid[key]

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

"""Chapter 05's widgets: look at trained top-k models at any k, and retrain a tiny one.

* :class:`TopKExplorer` - a k slider and a regime selector. Moving either re-evaluates the
  *already-trained* models of that regime at that k (results are cached; nothing is trained) and
  redraws accuracy against k and the experts' utilisation in one figure.
* :class:`RetrainPanel` - a k schedule (one k per epoch) and a button. A click trains a tiny
  Brainy-MoE with that schedule in a few seconds and draws its accuracy at every inference k and its
  experts' utilisation over training.
* :func:`topk_animation` - the static page's stand-in for the slider: a matplotlib animation that
  steps through k, rendered to HTML with ``to_jshtml`` (Python callbacks do not run in a static page).

The state a widget shows is kept in ``.state`` / ``.result`` as well, so tests (and readers) can set
widget values programmatically and check what changed.
"""
from __future__ import annotations

import statistics

import matplotlib.pyplot as plt
import torch

from ...experiments.brainy import accuracy_at_every_k, train_schedule
from ...moe import MoE
from ..style import tidy_layout

__all__ = ["TopKExplorer", "RetrainPanel", "parse_schedule", "table_from_runs", "topk_animation"]


def _check_test(test, where):
    if not (isinstance(test, (tuple, list)) and len(test) == 2 and all(isinstance(t, torch.Tensor) for t in test)
            and len(test[0]) == len(test[1]) and len(test[0]) > 0):
        raise TypeError(f"{where}: test must be a non-empty (x, y) pair of tensors with equal first dims, "
                        f"got {type(test).__name__}")
    return tuple(test)


def _mean(values):
    return statistics.fmean(values)


# ----------------------------------------------------------------------------- explorer


class TopKExplorer:
    """Slider over the inference k and a selector over trained regimes.

    Args:
        models: ``{label: [trained MoE, ...]}`` (one model per seed); each MoE needs a top-k router,
            and all must have the same number of experts.
        test: (x, y) images the models are evaluated on.
        k: the slider's starting value.
        draw: False skips matplotlib (state is still computed), for tests.

    ``state`` after each update: label, k, acc (per model), acc_mean, utilization (per model),
    utilization_mean (E,), curve ({k: mean accuracy} for the selected label).
    ``evaluations`` counts model evaluations (a cached (label, k) is never evaluated twice).
    """

    def __init__(self, models: dict, test, k: int = 3, draw: bool = True):
        import ipywidgets as widgets

        where = "TopKExplorer"
        if not isinstance(models, dict) or not models:
            raise TypeError(f"{where}: models must be a non-empty dict {{label: [MoE, ...]}}, got {type(models).__name__}")
        sizes = set()
        for label, group in models.items():
            if not isinstance(group, (list, tuple)) or not group:
                raise ValueError(f"{where}: models[{label!r}] must be a non-empty list of trained MoE models")
            for m in group:
                if not isinstance(m, MoE) or not hasattr(m.router, "k"):
                    raise TypeError(f"{where}: models[{label!r}] holds a {type(m).__name__}; expected MoE with a top-k router")
                sizes.add(m.num_experts)
        if len(sizes) != 1:
            raise ValueError(f"{where}: all models must have the same number of experts, got {sorted(sizes)}")
        self.num_experts = sizes.pop()
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ValueError(f"{where}: k={k!r} must be an int in 1..{self.num_experts}")
        self.models = {str(label): list(group) for label, group in models.items()}
        self.test = _check_test(test, where)
        self.draw = draw
        self.evaluations = 0
        self._cache: dict = {}
        self.state: dict = {}
        self.figure = None

        self.k_slider = widgets.IntSlider(value=k, min=1, max=self.num_experts, step=1, description="inference k",
                                          continuous_update=False)
        self.regime = widgets.Dropdown(options=list(self.models), value=next(iter(self.models)), description="regime")
        self.out = widgets.Output()
        self.widget = widgets.VBox([widgets.HBox([self.regime, self.k_slider]), self.out])
        self.k_slider.observe(self._changed, names="value")
        self.regime.observe(self._changed, names="value")
        self.update()

    def _changed(self, change):
        self.update()

    def evaluate(self, label: str, k: int) -> dict:
        """Accuracy and utilisation of every model of ``label`` at inference ``k`` (cached)."""
        key = (label, k)
        if key not in self._cache:
            rows = [accuracy_at_every_k(m, self.test, ks=[k])[k] for m in self.models[label]]
            self.evaluations += len(rows)
            self._cache[key] = {"acc": [r["acc"] for r in rows], "utilization": [r["utilization"] for r in rows]}
        return self._cache[key]

    def update(self) -> dict:
        label, k = self.regime.value, self.k_slider.value
        now = self.evaluate(label, k)
        curve = {kk: _mean(self.evaluate(label, kk)["acc"]) for kk in range(1, self.num_experts + 1)}
        util = torch.tensor(now["utilization"])
        self.state = {"label": label, "k": k, "acc": list(now["acc"]), "acc_mean": _mean(now["acc"]),
                      "utilization": now["utilization"], "utilization_mean": util.mean(0).tolist(), "curve": curve}
        if self.draw:
            self._redraw()
        return self.state

    def _redraw(self):
        from IPython.display import display

        st = self.state
        E = self.num_experts
        fig, (ax_acc, ax_util) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=80)
        ks = list(st["curve"])
        ax_acc.plot(ks, [st["curve"][kk] for kk in ks], marker="o", color="tab:blue", label="mean over seeds")
        for kk in ks:
            accs = self._cache[(st["label"], kk)]["acc"]
            ax_acc.vlines(kk, min(accs), max(accs), color="tab:blue", alpha=0.4)
        ax_acc.scatter([st["k"]], [st["acc_mean"]], s=120, facecolors="none", edgecolors="red", zorder=3,
                       label=f"k = {st['k']}: {st['acc_mean']:.3f}")
        ax_acc.set(xlabel="inference k", ylabel="test accuracy", title=f"{st['label']}: accuracy vs k", xticks=ks)
        ax_acc.legend(fontsize=8, loc="lower right")
        ax_acc.grid(alpha=0.3)
        util = torch.tensor(st["utilization"])
        ax_util.bar(range(E), util.mean(0).numpy(), yerr=util.std(0).numpy() if len(util) > 1 else None, capsize=3,
                    color="tab:orange")
        ax_util.axhline(1 / E, color="gray", ls="--", lw=1, label="fair share 1/E")
        ax_util.set(xlabel="expert", ylabel="share of routed pairs", xticks=range(E), ylim=(0, 1),
                    title=f"utilisation at k = {st['k']} (mean over seeds)")
        ax_util.legend(fontsize=8)
        tidy_layout(fig)
        self.figure = fig
        self.out.clear_output(wait=True)
        with self.out:
            display(fig)
        plt.close(fig)


# ----------------------------------------------------------------------------- retrain button


def parse_schedule(text, num_experts: int) -> list[int]:
    """"6, 5, 4, 3" -> [6, 5, 4, 3]: one k per epoch, each in 1..num_experts."""
    if not isinstance(text, str):
        raise TypeError(f"parse_schedule: text must be a str like '6,5,4,3', got {type(text).__name__}")
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    if not parts:
        raise ValueError(f"parse_schedule: text={text!r} names no k; write one k per epoch, e.g. '6,5,4,3'")
    ks = []
    for p in parts:
        if not p.isdigit() or not 1 <= int(p) <= num_experts:
            raise ValueError(f"parse_schedule: {p!r} in {text!r} is not a k in 1..{num_experts}")
        ks.append(int(p))
    if len(ks) > 12:
        raise ValueError(f"parse_schedule: {len(ks)} epochs is too many for a quick demo; use at most 12")
    return ks


class RetrainPanel:
    """Choose a k schedule, press the button, get a freshly trained tiny Brainy-MoE in a few seconds.

    Args:
        train, test: (x, y) image data (a few hundred to a thousand training images keep it quick).
        presets: ``{name: "k per epoch"}`` offered in the dropdown; the text box accepts any schedule.
        num_experts, hidden: the tiny model's size; other keyword arguments go to ``train_schedule``.
        draw: False skips matplotlib, for tests.

    After a click, ``result`` is the :class:`~tutorial_moe.experiments.brainy.RegimeRun` and ``runs`` keeps
    every click's result; a bad schedule leaves them unchanged and shows the error in ``message``.
    """

    DEFAULT_PRESETS = {"helicopter (6,6,6)": "6,6,6", "tough love (3,3,3)": "3,3,3",
                       "gradual detachment (6,5,4,3)": "6,5,4,3"}

    def __init__(self, train, test, presets: dict | None = None, num_experts: int = 6, hidden: int = 8,
                 draw: bool = True, **train_kwargs):
        import ipywidgets as widgets

        self.train = _check_test(train, "RetrainPanel")
        self.test = _check_test(test, "RetrainPanel")
        self.presets = dict(presets or self.DEFAULT_PRESETS)
        for name, text in self.presets.items():
            parse_schedule(text, num_experts)  # fail early on a bad preset
        self.num_experts, self.hidden, self.draw = num_experts, hidden, draw
        self.train_kwargs = {"batch_size": 128, "lr": 3e-3, "seed": 0, **train_kwargs}
        self.result = None
        self.runs: list = []
        self.figure = None
        first = next(iter(self.presets.values()))
        self.preset = widgets.Dropdown(options=list(self.presets), description="preset")
        self.schedule = widgets.Text(value=first, description="k per epoch")
        self.button = widgets.Button(description="Retrain", button_style="primary", icon="refresh")
        self.message = widgets.HTML(value="")
        self.out = widgets.Output()
        self.widget = widgets.VBox([widgets.HBox([self.preset, self.schedule, self.button]), self.message, self.out])
        self.preset.observe(lambda change: setattr(self.schedule, "value", self.presets[change["new"]]), names="value")
        self.button.on_click(self._clicked)

    def _clicked(self, _button=None):
        self.retrain()

    def retrain(self):
        try:
            ks = parse_schedule(self.schedule.value, self.num_experts)
        except (TypeError, ValueError) as e:
            self.message.value = f"<b>Not trained:</b> {e}"
            return None
        self.message.value = f"training with k per epoch = {ks} ..."
        run = train_schedule(ks, self.train, self.test, num_experts=self.num_experts, hidden=self.hidden,
                             image_size=self.train[0].shape[-1], **self.train_kwargs)
        self.result = run
        self.runs.append(run)
        best = max(run.at_k, key=lambda kk: run.at_k[kk]["acc"])
        self.message.value = (f"k per epoch {ks}: trained in {run.seconds:.1f} s; accuracy at k = {run.model.router.k}: "
                              f"{run.at_k[run.model.router.k]['acc']:.3f}, best k = {best}")
        if self.draw:
            self._redraw(ks)
        return run

    def _redraw(self, ks):
        from IPython.display import display

        run, E = self.result, self.num_experts
        fig, (ax_acc, ax_util) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=80)
        kk = sorted(run.at_k)
        ax_acc.plot(kk, [run.at_k[k]["acc"] for k in kk], marker="o")
        ax_acc.set(xlabel="inference k", ylabel="test accuracy", xticks=kk, title=f"trained with k per epoch {ks}")
        ax_acc.grid(alpha=0.3)
        util = torch.tensor([row["utilization"][0] for row in run.history.steps])  # (steps, E)
        ax_util.stackplot(range(len(util)), util.t().numpy(), labels=[f"expert {e}" for e in range(E)])
        ax_util.set(xlabel="training step", ylabel="share of routed pairs", ylim=(0, 1),
                    title="utilisation during training")
        ax_util.legend(fontsize=6, loc="upper right", ncol=2)
        tidy_layout(fig)
        self.figure = fig
        self.out.clear_output(wait=True)
        with self.out:
            display(fig)
        plt.close(fig)


# ----------------------------------------------------------------------------- static stand-in


def table_from_runs(runs: dict) -> dict:
    """``{label: [RegimeRun, ...]}`` -> ``{label: {k: {"acc": [...], "utilization": [[...], ...]}}}``
    from the evaluations each run already holds (``run.at_k``); nothing is recomputed."""
    if not isinstance(runs, dict) or not runs:
        raise TypeError("table_from_runs: runs must be a non-empty dict {label: [RegimeRun, ...]}")
    table = {}
    for label, group in runs.items():
        if not group or not all(getattr(r, "at_k", None) for r in group):
            raise ValueError(f"table_from_runs: runs[{label!r}] has a run without at_k (train with eval_every_k=True)")
        ks = sorted(group[0].at_k)
        table[label] = {k: {"acc": [r.at_k[k]["acc"] for r in group],
                            "utilization": [r.at_k[k]["utilization"] for r in group]} for k in ks}
    return table


def topk_animation(table: dict, interval: int = 900, dpi: int = 60) -> str:
    """An HTML animation (``FuncAnimation.to_jshtml``) stepping through the inference k.

    Left: mean test accuracy against k for every label, the current k marked. Right: mean per-expert
    utilisation at the current k, one row per label (a heat map). Returns the HTML string.
    """
    from matplotlib import animation

    if not isinstance(table, dict) or not table:
        raise TypeError("topk_animation: table must be a non-empty dict as made by table_from_runs")
    labels = list(table)
    ks = sorted(next(iter(table.values())))
    E = len(next(iter(table.values()))[ks[0]]["utilization"][0])
    acc = {lab: [_mean(table[lab][k]["acc"]) for k in ks] for lab in labels}
    util = {k: torch.tensor([torch.tensor(table[lab][k]["utilization"]).mean(0).tolist() for lab in labels]) for k in ks}

    fig, (ax_acc, ax_util) = plt.subplots(1, 2, figsize=(10, 3.4), dpi=dpi, gridspec_kw={"width_ratios": [1.1, 1]})
    for lab in labels:
        ax_acc.plot(ks, acc[lab], marker="o", ms=3, label=lab)
    lo = min(min(v) for v in acc.values())
    hi = max(max(v) for v in acc.values())
    ax_acc.set(xlabel="inference k", ylabel="test accuracy (mean over seeds)", xticks=ks,
               ylim=(lo - 0.01, hi + 0.005), title="accuracy against inference k")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=6, loc="lower right")
    marker = ax_acc.axvline(ks[0], color="red", lw=1.5)
    image = ax_util.imshow(util[ks[0]].numpy(), cmap="viridis", vmin=0, vmax=max(float(u.max()) for u in util.values()),
                           aspect="auto")
    ax_util.set(xlabel="expert", xticks=range(E), yticks=range(len(labels)), yticklabels=labels)
    ax_util.tick_params(axis="y", labelsize=7)
    fig.colorbar(image, ax=ax_util, label="share of routed pairs")
    title = ax_util.set_title("")
    tidy_layout(fig)

    def frame(i):
        k = ks[i]
        marker.set_xdata([k, k])
        image.set_data(util[k].numpy())
        title.set_text(f"utilisation at k = {k}")
        return marker, image, title

    anim = animation.FuncAnimation(fig, frame, frames=len(ks), interval=interval, blit=False)
    html = anim.to_jshtml(default_mode="once")
    plt.close(fig)
    return html

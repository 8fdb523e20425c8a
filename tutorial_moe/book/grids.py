"""A labelled grid of example images per class (chapter 00 and anyone showing a dataset)."""
from __future__ import annotations

import torch


def class_grid(split, per_class: int = 3) -> tuple[torch.Tensor, list[str]]:
    """The first ``per_class`` images of every class tiled into one canvas (ink dark on white).

    Returns ``(canvas, labels)``: canvas (per_class * (H + 2) - 2, C * (W + 2) - 2), one column
    per class with a 2-pixel gap, and one label per column ("3", or "12: Sandal" where a class
    has a name other than its index). A class with fewer images leaves its cells blank.
    """
    if not hasattr(split, "x") or not hasattr(split, "y") or not hasattr(split, "class_names"):
        raise TypeError(f"class_grid: split must be a DataSplit (x, y, class_names), got {type(split).__name__}")
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"class_grid: per_class={per_class!r} must be an int >= 1")
    names = list(split.class_names)
    size, gap = split.x.shape[-1], 2
    step = size + gap
    canvas = torch.ones(per_class * step - gap, len(names) * step - gap)
    for c in range(len(names)):
        for r, i in enumerate((split.y == c).nonzero().flatten()[:per_class].tolist()):
            canvas[r * step:r * step + size, c * step:c * step + size] = 1 - split.x[i, 0]
    labels = [n if n == str(c) else f"{c}: {n}" for c, n in enumerate(names)]
    return canvas, labels


def show_class_grid(split, per_class: int = 3, title: str = ""):
    """Draw :func:`class_grid` with the class labels under the columns; returns the figure."""
    import matplotlib.pyplot as plt

    canvas, labels = class_grid(split, per_class)
    many = len(labels) > 10  # twenty names need rotating
    step = canvas.shape[1] / len(labels)
    fig, ax = plt.subplots(figsize=(7.0, 0.45 * per_class * (10 / max(len(labels), 10)) + (1.6 if many else 0.9)))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([(c + 0.5) * step - 1 for c in range(len(labels))])
    ax.set_xticklabels(labels, rotation=60 if many else 0, ha="right" if many else "center", fontsize=9)
    ax.set_yticks([])
    ax.grid(False)
    ax.set_title(title)
    plt.show()
    return fig

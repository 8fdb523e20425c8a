"""The book's one plot style: sizes readable at page width, one colour per expert everywhere.

Call :func:`use_book_style` once per chapter (the chapter's hidden set-up cell does); use
:func:`expert_color` for anything drawn per expert, so expert 3 has the same colour in every
figure of the book, and :data:`CONDITION_COLORS` for the recurring non-expert conditions.
"""
from __future__ import annotations

__all__ = ["EXPERT_COLORS", "CONDITION_COLORS", "FIGURE_WIDTH", "expert_color", "use_book_style", "book_rc",
           "tidy_layout"]

#: Inches. The book's text column is about 7 inches wide; figures are drawn at that width so
#: 10-pt text stays about 10 pt on the page.
FIGURE_WIDTH = 7.0

# Okabe-Ito (colour-blind safe) first, then Tableau's extras: 16 distinct colours, so up to 16
# experts never share one; beyond that they repeat (figures with more experts use heatmaps).
EXPERT_COLORS = (
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000",
    "#8c564b", "#7f7f7f", "#bcbd22", "#17becf", "#9467bd", "#ff9896", "#aec7e8", "#98df8a",
)

#: Colours of the conditions that recur across chapters (not experts).
CONDITION_COLORS = {
    "dense": "#4D4D4D",
    "moe": "#0072B2",
    "baseline": "#4D4D4D",
    "oracle": "#999999",
    "helicopter": "#E69F00",
    "tough_love": "#D55E00",
    "gradual_detachment": "#009E73",
}


def expert_color(index: int) -> str:
    """The colour of expert ``index`` (0-based), the same in every figure of the book."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"expert_color: index={index!r} must be an int >= 0")
    return EXPERT_COLORS[index % len(EXPERT_COLORS)]


def book_rc() -> dict:
    """The matplotlib rcParams of the book's style."""
    from cycler import cycler

    return {
        "figure.figsize": (FIGURE_WIDTH, FIGURE_WIDTH * 0.5),
        "figure.dpi": 100,
        "savefig.dpi": 150,
        "font.size": 10,
        "axes.titlesize": 11,
        "axes.labelsize": 10,
        "xtick.labelsize": 9,
        "ytick.labelsize": 9,
        "legend.fontsize": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.prop_cycle": cycler(color=list(EXPERT_COLORS)),
        "figure.constrained_layout.use": True,
    }


def use_book_style() -> None:
    """Apply the book's style to every figure drawn after this call."""
    import matplotlib as mpl

    mpl.rcParams.update(book_rc())


def tidy_layout(fig) -> None:
    """Tighten ``fig``'s layout unless a layout engine already does (the book style turns on
    constrained layout; calling ``tight_layout`` on such a figure after a colorbar raises)."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()

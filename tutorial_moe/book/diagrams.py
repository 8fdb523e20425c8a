"""Diagrams drawn with matplotlib, so they follow the book's style (``tutorial_moe.book.style``).

* :func:`moe_flow_diagram` - the data flow of a top-k MoE layer: tokens -> router -> top-k ->
  dispatch -> experts -> combine, with each expert in its book-wide colour and the experts no
  token chose drawn faded (they cost nothing for this batch).
"""
from __future__ import annotations

from .style import FIGURE_WIDTH, expert_color, use_book_style

__all__ = ["moe_flow_diagram", "default_choices"]

_INK = "#333333"
_BOX = "#F2F2F2"


def _check_count(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"moe_flow_diagram: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f"{low} <= {name}" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"moe_flow_diagram: {name}={value} is out of range; allowed: {allowed}")
    return value


def default_choices(num_tokens: int, num_experts: int, k: int) -> list[tuple[int, ...]]:
    """A fixed, varied routing for the picture: token t takes experts (2t + j) mod E for j < k,
    except that the last expert is never chosen when E > k, to show an idle expert."""
    pool = num_experts - 1 if num_experts > k else num_experts
    return [tuple((2 * t + j) % pool for j in range(k)) for t in range(num_tokens)]


def _check_choices(choices, num_tokens: int, num_experts: int, k: int) -> list[tuple[int, ...]]:
    if hasattr(choices, "tolist"):
        choices = choices.tolist()
    try:
        rows = [tuple(row) for row in choices]
    except TypeError as err:
        raise TypeError(f"moe_flow_diagram: choices must be a (num_tokens, k) list of expert ids, got {choices!r:.80}") from err
    if len(rows) != num_tokens or any(len(r) != k for r in rows):
        raise ValueError(f"moe_flow_diagram: choices must have shape ({num_tokens}, {k}) "
                         f"(num_tokens, k), got {[len(r) for r in rows]} ids per token")
    for t, row in enumerate(rows):
        if any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < num_experts for e in row):
            raise ValueError(f"moe_flow_diagram: choices[{t}]={row!r} must hold expert ids in 0..{num_experts - 1}")
        if len(set(row)) != k:
            raise ValueError(f"moe_flow_diagram: choices[{t}]={row!r} names an expert twice; a token's k experts differ")
    return rows


def _check_weights(weights, choices) -> list[tuple[float, ...]] | None:
    if weights is None:
        return None
    if hasattr(weights, "tolist"):
        weights = weights.tolist()
    try:
        rows = [tuple(float(w) for w in row) for row in weights]
    except (TypeError, ValueError) as err:
        raise TypeError(f"moe_flow_diagram: weights must be a (num_tokens, k) list of numbers, got {weights!r:.80}") from err
    if [len(r) for r in rows] != [len(r) for r in choices]:
        raise ValueError(f"moe_flow_diagram: weights must have the shape of choices ({len(choices)}, {len(choices[0])})")
    if any(not 0.0 <= w <= 1.0 for r in rows for w in r):
        raise ValueError(f"moe_flow_diagram: weights={rows!r} must lie in [0, 1] (combine weights)")
    return rows


def _text_on(face: str) -> str:
    """White text on dark faces, dark text on light ones (relative luminance, sRGB weights)."""
    r, g, b = (int(face[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return "white" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.55 else _INK


def _rows(n: int, height: float) -> list[float]:
    """n row centres spread over [0, height], top to bottom."""
    step = height / n
    return [height - step * (i + 0.5) for i in range(n)]


def moe_flow_diagram(num_experts: int = 4, k: int = 2, num_tokens: int = 3, choices=None, weights=None,
                     ax=None):
    """The data flow of a token-level top-k MoE layer, as a matplotlib Figure.

    Args:
        num_experts, k, num_tokens: E, experts per token, tokens drawn (1 <= k <= E).
        choices: (num_tokens, k) expert ids each token is sent to (default :func:`default_choices`).
        weights: optional (num_tokens, k) combine weights, written on the dispatch arrows.
        ax: an Axes to draw into (default: a new figure at the book's page width).

    Returns the Figure. Expert boxes carry ``gid="expert-<i>"`` and the arrows that carry a token
    to an expert ``gid="dispatch-<t>-<i>"``, so tests (and readers) can find them.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    E = _check_count("num_experts", num_experts, 1)
    k = _check_count("k", k, 1, E)
    T = _check_count("num_tokens", num_tokens, 1, 8)
    choices = _check_choices(default_choices(T, E, k) if choices is None else choices, T, E, k)
    weights = _check_weights(weights, choices)

    if ax is None:
        use_book_style()
        fig, ax = plt.subplots(figsize=(FIGURE_WIDTH, 0.45 * max(T, E) + 1.3), layout="constrained")
    else:
        fig = ax.figure
    height = float(max(T, E))
    ax.set_xlim(0, 10)
    ax.set_ylim(-0.9, height + 0.55)
    ax.axis("off")

    token_y, expert_y = _rows(T, height), _rows(E, height)
    used = {e for row in choices for e in row}

    def box(x, y, w, h, text, face=_BOX, edge=_INK, alpha=1.0, gid=None, color=_INK, size=9):
        patch = FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                               facecolor=face, edgecolor=edge, linewidth=1.0, alpha=alpha)
        patch.set_gid(gid)
        ax.add_patch(patch)
        ax.text(x, y, text, ha="center", va="center", fontsize=size, color=color, alpha=max(alpha, 0.6))
        return patch

    def arrow(x0, y0, x1, y1, color=_INK, width=1.0, gid=None, alpha=1.0):
        patch = FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=9, color=color,
                                linewidth=width, alpha=alpha, shrinkA=0, shrinkB=0)
        patch.set_gid(gid)
        ax.add_patch(patch)
        return patch

    # Columns (x centres) and the widths of their boxes.
    x_tok, x_router, x_topk, x_exp, x_comb, x_out = 0.45, 1.9, 3.55, 6.1, 8.15, 9.55
    w_tall, h_tall = 1.25, height - 0.1
    for t, y in enumerate(token_y):
        box(x_tok, y, 0.6, 0.55, f"$x_{t + 1}$")
        arrow(x_tok + 0.3, y, x_router - w_tall / 2, y)
    box(x_router, height / 2, w_tall, h_tall, "router\n\n$p = $\nsoftmax\n$(x W_r)$")
    for y in token_y:
        arrow(x_router + w_tall / 2, y, x_topk - w_tall / 2, y)
    box(x_topk, height / 2, w_tall, h_tall, f"top-$k$\n($k$ = {k})\n\nkeep $k$ of\n{E} weights")
    for e, y in enumerate(expert_y):
        idle = e not in used
        box(x_exp, y, 1.35, min(0.8, 0.8 * height / E), f"expert {e}" + ("\n(idle)" if idle else ""),
            face=expert_color(e), edge=expert_color(e), alpha=0.25 if idle else 0.9,
            gid=f"expert-{e}", color=_INK if idle else _text_on(expert_color(e)))
    box(x_comb, height / 2, w_tall, h_tall, "combine\n\n$y = $\n$\\Sigma_i\\, g_i\\, f_i(x)$")
    for t, (y, row) in enumerate(zip(token_y, choices)):
        for j, e in enumerate(row):
            lw = 1.0 + 2.5 * (weights[t][j] if weights else 1.0 / k)
            arrow(x_topk + w_tall / 2, y, x_exp - 0.675, expert_y[e], color=expert_color(e), width=lw,
                  gid=f"dispatch-{t}-{e}")
            arrow(x_exp + 0.675, expert_y[e], x_comb - w_tall / 2, y, color=expert_color(e), width=lw, alpha=0.7)
            if weights:
                frac = 0.3  # label near the start of the arrow, where arrows of one token are apart
                lx = x_topk + w_tall / 2 + frac * (x_exp - 0.675 - x_topk - w_tall / 2)
                ly = y + frac * (expert_y[e] - y)
                ax.text(lx, ly, f"{weights[t][j]:.2f}", fontsize=8, ha="center", va="center",
                        color=expert_color(e), bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
        arrow(x_comb + w_tall / 2, y, x_out - 0.3, y)
        box(x_out, y, 0.6, 0.55, f"$y_{t + 1}$")
    ax.text((x_topk + x_exp) / 2 - 0.35, height + 0.3, "dispatch: each token to its $k$ experts",
            ha="center", va="center", fontsize=9, color=_INK)
    ax.text(x_exp, -0.55, f"{len(used)} of {E} experts\nrun this batch", ha="center", va="center",
            fontsize=9, color=_INK)
    return fig

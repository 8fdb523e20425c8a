"""Small display helpers for the book: package code shown instead of copied, compact tables,
and collapsed detail.

The page pattern (BOOK_STANDARD section 1): a compact summary table with ``markdown_table``,
per-seed detail and exercise solutions collapsed. In a chapter's Markdown, a solution is

    :::{admonition} Solution
    :class: dropdown
    ...
    :::

(sphinx-book-theme's toggle button folds it); from code, :func:`dropdown` wraps generated
Markdown (a per-seed table) in a ``{dropdown}`` (sphinx-design) that the book renders folded.
"""
from __future__ import annotations

import inspect
import textwrap

__all__ = ["show_source", "markdown_table", "dropdown"]


def show_source(obj, start: str | None = None, lines: int | None = None):
    """Display the source of ``obj`` (a function, class or method) as a highlighted code block.

    ``start``: begin at the first line containing this text; ``lines``: show at most this many lines.
    Returns the IPython Markdown object (rendered in Jupyter and in the built book).
    """
    from IPython.display import Markdown

    src = textwrap.dedent(inspect.getsource(obj))
    rows = src.splitlines()
    if start is not None:
        hits = [i for i, r in enumerate(rows) if start in r]
        if not hits:
            raise ValueError(f"show_source: start={start!r} does not occur in the source of {obj!r}")
        rows = rows[hits[0]:]
    if lines is not None:
        rows = rows[:lines] + (["    ..."] if len(rows) > lines else [])
    where = f"{inspect.getmodule(obj).__name__}.{getattr(obj, '__qualname__', '')}"
    return Markdown(f"*From `{where}`:*\n\n```python\n" + "\n".join(rows) + "\n```")


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".3f"):
    """A list of dicts as a Markdown table (rendered in Jupyter and in the static book)."""
    from IPython.display import Markdown

    if not rows:
        return Markdown("*(no rows)*")
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return Markdown("\n".join(out))


def _markdown_text(part) -> str:
    data = getattr(part, "data", part)  # an IPython Markdown object, or a str
    if not isinstance(data, str):
        raise TypeError(f"dropdown: each part must be a str or a Markdown object, got {type(part).__name__}")
    return data


def dropdown(title: str, *parts):
    """``parts`` (Markdown strings or objects, e.g. a ``markdown_table``) inside a collapsed
    box titled ``title``; one click opens it. Returns an IPython Markdown object."""
    from IPython.display import Markdown

    if not isinstance(title, str) or not title.strip() or "\n" in title:
        raise ValueError(f"dropdown: title={title!r} must be a non-empty one-line str")
    body = "\n\n".join(_markdown_text(p) for p in parts)
    # four colons: the body may itself hold ::: fences (an admonition)
    return Markdown(f"::::{{dropdown}} {title}\n{body}\n::::")

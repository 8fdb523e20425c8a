"""Small display helpers for the book: show package code instead of copying it into a notebook."""
from __future__ import annotations

import inspect
import textwrap

__all__ = ["show_source", "markdown_table"]


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

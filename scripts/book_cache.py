"""The book's execution cache: one place that knows how a chapter is keyed in it.

`make test` runs every chapter once, under nbval. The root ``conftest.py`` hands the outputs of
that run to :func:`store_executed`, which writes them into the jupyter-cache that the book build
reads (``nb_execution_mode: cache``). The build then finds every chapter in the cache and
executes none of them a second time.

The cache key is jupyter-cache's hash of a notebook's code cells (source and metadata) plus its
``kernelspec``. myst-nb computes it from the notebook that *its own* MyST reader makes of the
chapter's ``.md`` file, so we build the cached notebook with that same reader and only copy the
executed outputs into it: the keys agree by construction, not by the .md and .ipynb happening to
serialise alike. ``scripts/book_extension.py`` uses :func:`is_cached` to check the same key.
"""
from __future__ import annotations

import base64
import os
import platform
import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
#: Where jupyter-book keeps its cache when ``execute.cache`` is empty: ``<build dir>/.jupyter_cache``.
DEFAULT_CACHE_DIR = ROOT / "_build" / ".jupyter_cache"
#: The cache of full-size runs. The cache key is the code, which is the same in both modes, so
#: the two modes must not share a cache (a full build would show default-mode outputs).
FULL_CACHE_DIR = ROOT / "_build" / ".jupyter_cache-full"


def full_mode() -> bool:
    """``tutorial_moe.full_mode()``, read without importing the package (and torch)."""
    return os.environ.get("TUTORIAL_MOE_FULL", "0").strip().lower() in ("1", "true", "yes")


def cache_dir_for_mode() -> Path:
    """The execution cache of the current mode (``TUTORIAL_MOE_FULL``)."""
    return FULL_CACHE_DIR if full_mode() else DEFAULT_CACHE_DIR
WIDGET_STATE_MIMETYPE = "application/vnd.jupyter.widget-state+json"


def source_path(notebook_path: str | Path) -> Path:
    """The file the book is built from: the MyST ``.md`` twin when there is one."""
    path = Path(notebook_path)
    twin = path.with_suffix(".md")
    return twin if path.suffix == ".ipynb" and twin.exists() else path


def source_notebook(path: str | Path) -> nbformat.NotebookNode:
    """The notebook myst-nb builds from ``path`` (a jupytext MyST ``.md`` or an ``.ipynb``)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".ipynb":
        return nbformat.reads(text, as_version=4)
    from myst_nb.core.read import is_myst_markdown_notebook, read_myst_markdown_notebook
    from myst_parser.config.main import MdParserConfig

    if not is_myst_markdown_notebook(text):
        raise ValueError(f"{path} is not a MyST notebook (no jupytext/kernelspec header)")
    return read_myst_markdown_notebook(
        text, config=MdParserConfig(), add_source_map=True, path=str(path)
    )


def _cache(cache_dir: str | Path | None):
    from jupyter_cache import get_cache

    return get_cache(str(cache_dir or DEFAULT_CACHE_DIR))


def is_cached(path: str | Path, cache_dir: str | Path | None = None) -> bool:
    """True when the build would take ``path``'s outputs from the cache instead of running it."""
    try:
        _cache(cache_dir).match_cache_notebook(source_notebook(path))
    except KeyError:
        return False
    return True


_BACKSPACE = re.compile("[^\n]\x08")
_CARRIAGE_RETURN = re.compile(r"^.*\r(?=[^\n])", re.MULTILINE)


def merge_consecutive_streams(outputs: list) -> list:
    """Merge each run of consecutive stream outputs of the same name into one, in place of the
    run, as a live notebook shows them; apply ``\\r`` and ``\\b`` (progress bars) in each.

    Unlike nbval's and myst-nb's coalescing, text printed after a figure stays after it.
    """
    merged = []
    for output in outputs:
        last = merged[-1] if merged else None
        if (output.get("output_type") == "stream" and last is not None
                and last.get("output_type") == "stream" and last.get("name") == output.get("name")):
            last["text"] = last["text"] + output["text"]
        else:
            merged.append(nbformat.from_dict(dict(output)) if output.get("output_type") == "stream" else output)
    for output in merged:
        if output.get("output_type") == "stream":
            text = output["text"]
            while True:
                shorter = _BACKSPACE.sub("", text)
                if shorter == text:
                    break
                text = shorter
            output["text"] = _CARRIAGE_RETURN.sub("", text)
    return merged


def forget(path: str | Path, cache_dir: str | Path | None = None) -> None:
    """Drop ``path``'s cached outputs, so that the next build executes it."""
    cache = _cache(cache_dir)
    try:
        record = cache.match_cache_notebook(source_notebook(path))
    except KeyError:
        return
    cache.remove_cache(record.pk)


def widget_state_metadata(states: dict[str, dict], buffers: dict[str, dict]) -> dict:
    """Notebook metadata for ipywidgets' state, in the layout nbclient writes and myst-nb embeds.

    ``states`` maps comm id -> the widget model's accumulated state; ``buffers`` maps comm id ->
    {path tuple: base64 buffer record}.
    """
    models = {}
    for model_id, state in states.items():
        if "_model_name" not in state:
            continue
        model = {
            "model_name": state.get("_model_name"),
            "model_module": state.get("_model_module"),
            "model_module_version": state.get("_model_module_version"),
            "state": state,
        }
        if buffers.get(model_id):
            model["buffers"] = list(buffers[model_id].values())
        models[model_id] = model
    if not models:
        return {}
    return {WIDGET_STATE_MIMETYPE: {"state": models, "version_major": 2, "version_minor": 0}}


def encode_buffers(msg: dict) -> dict[tuple, dict]:
    """The binary buffers of a widget comm message, keyed by their path in the state."""
    paths = msg["content"]["data"].get("buffer_paths") or []
    return {
        tuple(path): {
            "data": base64.b64encode(bytes(buffer)).decode("ascii"),
            "encoding": "base64",
            "path": path,
        }
        for path, buffer in zip(paths, msg.get("buffers") or [])
    }


def store_executed(
    path: str | Path,
    cells: list[tuple[str, list]],
    seconds: float,
    widgets: dict | None = None,
    cache_dir: str | Path | None = None,
) -> int:
    """Cache the outputs of an execution of the chapter at ``path`` for the book build.

    ``cells``: one ``(source, outputs)`` per code cell, in order, as they ran (``outputs`` are
    nbformat output dicts). ``seconds``: the chapter's wall time, shown in the runtime table.
    ``widgets``: notebook-level ``widgets`` metadata (see :func:`widget_state_metadata`).
    Returns the cache record's id. Raises ValueError when the executed cells are not the
    chapter's code cells (a twin out of sync), so stale outputs are never cached.
    """
    nb = source_notebook(source_path(path))
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    hint = f"is the .ipynb twin in sync? `jupytext --sync {source_path(path)}`"
    if len(code) != len(cells):
        raise ValueError(
            f"{path}: {len(cells)} executed code cells, but the book's source has {len(code)}; {hint}"
        )
    for number, (cell, (source, outputs)) in enumerate(zip(code, cells), start=1):
        if cell.source.strip() != source.strip():
            raise ValueError(f"{path}: code cell {number} differs from the book's source; {hint}")
        cell.execution_count = number
        cell.outputs = []
        for output in outputs:
            output = nbformat.from_dict(dict(output))
            if output.get("output_type") == "execute_result":
                output["execution_count"] = number
            cell.outputs.append(output)
    nb.metadata["language_info"] = {
        "name": "python",
        "pygments_lexer": "ipython3",
        "codemirror_mode": {"name": "ipython", "version": 3},
        "file_extension": ".py",
        "mimetype": "text/x-python",
        "nbconvert_exporter": "python",
        "version": platform.python_version(),
    }
    if widgets:
        nb.metadata["widgets"] = widgets
    nbformat.validate(nb)

    from jupyter_cache.base import CacheBundleIn

    record = _cache(cache_dir).cache_notebook_bundle(
        CacheBundleIn(
            nb,
            str(source_path(path)),
            data={"execution_seconds": round(seconds, 2), "executed_by": "nbval"},
        ),
        check_validity=False,
        overwrite=True,
    )
    return record.pk

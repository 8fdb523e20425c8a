"""Chapters save their headline numbers here; the verdicts chapter reads them back.

Files live in ``book/results/<chapter>.json`` of the source checkout (or the folder named by
``TUTORIAL_MOE_RESULTS``). They are produced by running the chapters, never typed by hand.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

__all__ = ["results_dir", "start_chapter", "save_results", "load_results", "load_all_results", "Timer"]

_started: dict[str, float] = {}


def start_chapter(chapter: str) -> None:
    """Start the chapter's clock; ``save_results`` then records ``runtime_s`` (the chapter's run time)."""
    _started[chapter] = time.perf_counter()


def results_dir() -> Path:
    env = os.environ.get("TUTORIAL_MOE_RESULTS")
    if env:
        return Path(env)
    repo_book = Path(__file__).resolve().parents[2] / "book"  # the checkout's book/ folder
    if repo_book.is_dir():
        return repo_book / "results"
    return Path.cwd() / "results"


def _plain(value):
    """JSON-safe copy: tensors and numpy scalars become floats/lists; NaN stays visible as None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_results(chapter: str, results: dict) -> Path:
    """Write ``results`` (a flat or nested dict of numbers, strings, lists) for ``chapter``."""
    if not isinstance(chapter, str) or not chapter or "/" in chapter:
        raise ValueError(f"save_results: chapter={chapter!r} must be a non-empty file stem like '02_brainy'")
    if not isinstance(results, dict):
        raise TypeError(f"save_results: results must be a dict, got {type(results).__name__}")
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{chapter}.json"
    payload = {"chapter": chapter, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": _plain(results)}
    if chapter in _started:
        payload["runtime_s"] = round(time.perf_counter() - _started[chapter], 2)
    payload["full_mode"] = os.environ.get("TUTORIAL_MOE_FULL", "0") == "1"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def load_results(chapter: str) -> dict:
    path = results_dir() / f"{chapter}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"load_results: no saved results for chapter {chapter!r} at {path}; run that chapter first"
        )
    return json.loads(path.read_text(encoding="utf-8"))["results"]


def load_all_results(with_meta: bool = False) -> dict[str, dict]:
    """Every chapter's saved results, keyed by chapter stem (the whole payload if ``with_meta``)."""
    out = {}
    for path in sorted(results_dir().glob("*.json")):
        payload = json.loads(path.read_text(encoding="utf-8"))
        out[path.stem] = payload if with_meta else payload["results"]
    return out


class Timer:
    """``with Timer() as t: ...``; then ``t.seconds``. Used for the runtimes each chapter reports."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False

#!/usr/bin/env python
"""Every test of the project, in four phases (what `make test` runs after setting up .venv).

1. unit      pytest tests                     (package tests, jupytext pairs, environment.yml)
2. notebooks pytest --nbval-lax book/*.ipynb  (every chapter, in order, in this environment);
             the root conftest.py writes each passing chapter's outputs into the book's
             execution cache (_build/.jupyter_cache)
3. book      scripts/build_book.py             (jupyter-book build -W --keep-going, cache-only:
             every chapter's outputs come from phase 2, none is executed again)
4. browser   scripts/check_pages.py            (headless Chromium loads every chapter page;
             skipped when no Chromium is installed)

Every phase runs even when an earlier one failed; the exit status is non-zero if any failed.
The last lines are a table of wall times per phase and one `N passed, N failed` line.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build"
REPORTS = BUILD / "test-reports"
sys.path.insert(0, str(ROOT / "scripts"))
from book_cache import cache_dir_for_mode  # noqa: E402

CACHE = cache_dir_for_mode()  # the cache the book build of this mode reads
PHASES = ["unit", "notebooks", "book", "browser"]
PY = sys.executable


def junit_counts(path: Path) -> dict[str, int]:
    """passed/failed/skipped counts from a pytest junit XML file."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if not path.exists():
        return counts
    root = ET.parse(path).getroot()
    for suite in root.iter("testsuite"):
        tests = int(suite.get("tests", 0))
        failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
        counts["failed"] += failed
        counts["skipped"] += skipped
        counts["passed"] += tests - failed - skipped
    return counts


# Colours help in a terminal and clutter a CI log.
COLOR = "--color=yes" if sys.stdout.isatty() else "--color=no"


def run(command: list[str], env: dict | None = None) -> int:
    print("$ " + " ".join(str(c) for c in command), flush=True)
    return subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}).returncode


def phase_unit(args) -> tuple[int, dict]:
    xml = REPORTS / "unit.xml"
    code = run([PY, "-m", "pytest", "tests", "-q", COLOR, f"--junitxml={xml}"] + args.pytest_args)
    return code, junit_counts(xml)


def phase_notebooks(args) -> tuple[int, dict]:
    notebooks = args.notebooks or sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("book/*.ipynb"))
    xml = REPORTS / "notebooks.xml"
    command = [
        PY, "-m", "pytest", "--nbval-lax", "--nbval-current-env",
        "--nbval-cell-timeout=600", f"--book-cache={CACHE}", "-q", COLOR, f"--junitxml={xml}",
        *notebooks,
    ]
    # Progress bars off: the log stays readable and nothing depends on a terminal.
    code = run(command, env={"TUTORIAL_MOE_PROGRESS": "0"})
    return code, junit_counts(xml)


def phase_book(args) -> tuple[int, dict]:
    code = run([PY, "scripts/build_book.py"])
    return code, {"passed": int(code == 0), "failed": int(code != 0), "skipped": 0}


def phase_browser(args) -> tuple[int, dict]:
    from check_pages import find_chromium

    if find_chromium() is None:
        print("browser: no Chromium found (apt-get install chromium); check skipped")
        return 0, {"passed": 0, "failed": 0, "skipped": 1}
    xml = REPORTS / "browser.xml"
    code = run([PY, "scripts/check_pages.py", f"--junitxml={xml}"])
    counts = junit_counts(xml)
    if code and not counts["failed"]:
        counts["failed"] = 1
    return code, counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PHASES),
                        help=f"comma-separated phases to run (default: all of {','.join(PHASES)})")
    parser.add_argument("--notebooks", nargs="*", default=None,
                        help="run only these notebooks in phase 2 (default: book/*.ipynb)")
    # Anything else (e.g. `-k routing -x`) goes to the unit-test pytest.
    args, args.pytest_args = parser.parse_known_args(argv)
    wanted = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(wanted) - set(PHASES))
    if unknown:
        parser.error(f"--only: unknown phase(s) {unknown}; allowed: {PHASES}")
    REPORTS.mkdir(parents=True, exist_ok=True)
    for stale in REPORTS.glob("*.xml"):
        stale.unlink()

    results = []
    start_all = time.perf_counter()
    for name in PHASES:
        if name not in wanted:
            continue
        print(f"\n===== phase {name} =====", flush=True)
        start = time.perf_counter()
        code, counts = globals()[f"phase_{name}"](args)
        seconds = time.perf_counter() - start
        results.append((name, code, counts, seconds))
        print(f"===== phase {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s",
              flush=True)
    total = time.perf_counter() - start_all

    width = shutil.get_terminal_size((80, 20)).columns
    print("\n" + "=" * min(width, 72))
    print(f"{'phase':<10} {'result':<8} {'passed':>7} {'failed':>7} {'skipped':>8} {'wall s':>8}")
    for name, code, counts, seconds in results:
        print(f"{name:<10} {'ok' if code == 0 else 'FAILED':<8} {counts['passed']:>7} "
              f"{counts['failed']:>7} {counts['skipped']:>8} {seconds:>8.0f}")
    print(f"{'total':<10} {'':<8} {'':>7} {'':>7} {'':>8} {total:>8.0f}")
    passed = sum(c["passed"] for _, _, c, _ in results)
    failed = sum(c["failed"] for _, _, c, _ in results)
    skipped = sum(c["skipped"] for _, _, c, _ in results)
    bad = [name for name, code, _, _ in results if code != 0]
    if bad:
        print(f"failed phases: {', '.join(bad)}")
        failed = max(failed, len(bad))
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

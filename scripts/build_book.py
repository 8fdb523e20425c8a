#!/usr/bin/env python
"""Build the HTML book into _build/html (`make book` runs it with --execute).

--execute   run every chapter that is not already in the execution cache (_build/.jupyter_cache;
            a chapter whose code did not change since its last run is not run again)
(default)   cache-only: take every chapter's outputs from the cache and execute nothing; a
            chapter missing from it is a build error (this is what `make test` uses, after its
            nbval phase has filled the cache)

The build is `jupyter-book build --all -W --keep-going`: any Sphinx warning, including a chapter
that fails to execute, fails the build. On failure the execution report of each failing chapter
(_build/html/reports/*.err.log) and the build's warnings are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build"
LOG = BUILD / "logs" / "book-build.log"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--execute", action="store_true",
                        help="execute chapters missing from the cache (default: cache-only)")
    args = parser.parse_args(argv)

    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    command = [str(jupyter_book), "build", ".", "--all", "-W", "--keep-going"]
    env = {**os.environ, "TUTORIAL_MOE_BOOK_CACHE_ONLY": "0" if args.execute else "1"}
    if args.execute:
        # Chapters run by the build show no progress bars in the HTML (they are noise there).
        env.setdefault("TUTORIAL_MOE_PROGRESS", "0")
    reports = BUILD / "html" / "reports"
    for stale in reports.glob("**/*.err.log"):
        stale.unlink()
    LOG.parent.mkdir(parents=True, exist_ok=True)
    mode = "executing chapters not in the cache" if args.execute else "cache-only, executing nothing"
    print(f"book: jupyter-book build ({mode}); full log in {LOG.relative_to(ROOT)}", flush=True)

    start = time.perf_counter()
    with LOG.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            line = ANSI.sub("", line)  # jupyter-book colours its output even into a pipe
            log.write(line)
            # Echo what a reader needs to follow the build: chapter execution and problems.
            if re.search(r"WARNING|ERROR|Executing notebook|Executed notebook|book_extension|"
                         r"build succeeded|build finished|Traceback", line) \
                    and "IPKernelApp" not in line:  # the kernel's note about its TCP transport
                print("  " + line.rstrip(), flush=True)
        code = proc.wait()
    seconds = time.perf_counter() - start

    summary_file = BUILD / "execution.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    failures = sorted(reports.glob("**/*.err.log"))
    for report in failures:
        text = report.read_text(encoding="utf-8")
        # The cell and its traceback; nbclient's own call stack above it helps nobody.
        start = text.find("An error occurred while executing")
        print(f"\n----- execution report: {report.relative_to(ROOT)} -----")
        print(text[start if start >= 0 else 0:][-6000:])
    if not args.execute and summary.get("executed"):
        print(f"book: executed {summary['executed']} in a cache-only build")
        code = code or 1
    if failures:
        code = code or 1
    print(f"book: {'ok' if code == 0 else 'FAILED'} in {seconds:.0f} s: "
          f"{len(summary.get('cached', []))} chapter(s) from the cache, "
          f"{len(summary.get('executed', []))} executed, "
          f"{len(summary.get('not_executed', []))} missing from the cache; "
          f"HTML in {(BUILD / 'html').relative_to(ROOT)}/", flush=True)
    if code:
        print(f"book: the full build log is {LOG.relative_to(ROOT)}")
    return code


if __name__ == "__main__":
    sys.exit(main())

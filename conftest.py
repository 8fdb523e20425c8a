"""Root pytest configuration: the bridge from the nbval run to the book's execution cache.

With ``--book-cache=DIR`` (``scripts/run_tests.py`` passes it), every chapter that nbval runs
without a failure is written into the jupyter-cache at DIR, together with its outputs, its wall
time and the state of its ipywidgets, keyed exactly as the book build looks it up (see
``scripts/book_cache.py``). The book build that follows then executes no chapter a second time.

nbval keeps each cell's outputs on the test item (``IPyNbCell.test_outputs``) but drops the
widget comm messages, so we also watch the kernel messages nbval reads and accumulate the
widget models' state the way nbclient does.
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))


def pytest_addoption(parser):
    parser.addoption(
        "--book-cache",
        default=None,
        metavar="DIR",
        help="write the outputs of notebooks that pass under nbval into this jupyter-cache",
    )


class _NotebookRecorder:
    """Collects, per notebook, the executed cells, their outcome, time and widget state."""

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        self.cells = defaultdict(dict)  # notebook path -> {cell_num: (source, outputs)}
        self.failed = defaultdict(list)  # notebook path -> [cell_num, ...]
        self.started = {}  # notebook path -> first time.perf_counter() seen
        self.finished = {}
        self.widget_states = defaultdict(dict)  # notebook path -> {comm_id: state}
        self.widget_buffers = defaultdict(dict)
        self.code_cells = {}  # notebook path -> number of code cells nbval collected

    # -- kernel messages ------------------------------------------------------------------------
    def observe(self, notebook: str, msg: dict) -> None:
        if msg.get("msg_type") not in ("comm_open", "comm_msg"):
            return
        content = msg.get("content", {})
        data = content.get("data", {})
        if "state" not in data:  # custom messages carry no model state
            return
        comm_id = content["comm_id"]
        self.widget_states[notebook].setdefault(comm_id, {}).update(data["state"])
        if data.get("buffer_paths"):
            from book_cache import encode_buffers

            self.widget_buffers[notebook].setdefault(comm_id, {}).update(encode_buffers(msg))

    # -- pytest hooks -----------------------------------------------------------------------------
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        cell_num = getattr(item, "cell_num", None)
        if cell_num is None or not hasattr(item, "test_outputs"):
            return
        notebook = str(item.parent.fspath)
        self.started.setdefault(notebook, call.start)
        self.finished[notebook] = call.stop
        self.code_cells[notebook] = sum(
            1 for cell in item.parent.nb.cells if cell.cell_type == "code"
        )
        report = outcome.get_result()
        if report.failed:
            self.failed[notebook].append(cell_num)
        elif call.when == "call":
            self.cells[notebook][cell_num] = (item.cell.source, list(item.test_outputs or []))
        elif call.when == "setup" and report.skipped:
            self.cells[notebook][cell_num] = (item.cell.source, [])

    def pytest_sessionfinish(self, session):
        from book_cache import store_executed, widget_state_metadata

        written = []
        for notebook in sorted(self.code_cells):
            ran = self.cells[notebook]
            if self.failed[notebook] or len(ran) != self.code_cells[notebook]:
                print(f"\nbook cache: {notebook} not cached (a cell failed or did not run)")
                continue
            seconds = self.finished[notebook] - self.started[notebook]
            widgets = widget_state_metadata(
                self.widget_states[notebook], self.widget_buffers[notebook]
            )
            try:
                store_executed(
                    notebook,
                    [ran[i] for i in range(len(ran))],
                    seconds,
                    widgets=widgets,
                    cache_dir=self.cache_dir,
                )
            except Exception as error:  # report, never mask the test outcome
                print(f"\nbook cache: {notebook} not cached: {type(error).__name__}: {error}")
                continue
            written.append(f"{Path(notebook).name} ({seconds:.1f} s)")
        if written:
            print(f"\nbook cache: {len(written)} notebook(s) cached in {self.cache_dir}: "
                  + ", ".join(written))


def pytest_configure(config):
    cache_dir = config.getoption("--book-cache")
    if not cache_dir:
        return
    try:
        from nbval.plugin import IPyNbFile
    except ImportError:  # nbval not installed: nothing to bridge
        return
    recorder = _NotebookRecorder(cache_dir)
    config.pluginmanager.register(recorder, "tutorial_moe_book_cache")

    read_message = IPyNbFile.get_kernel_message

    def get_kernel_message(self, *args, **kwargs):
        msg = read_message(self, *args, **kwargs)
        recorder.observe(str(self.fspath), msg)
        return msg

    IPyNbFile.get_kernel_message = get_kernel_message

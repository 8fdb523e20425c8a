"""Root pytest configuration: the bridge from the nbval run to the book's execution cache.

With ``--book-cache=DIR`` (``scripts/run_tests.py`` passes it), every chapter that nbval runs
without a failure is written into the jupyter-cache at DIR, together with its outputs, its wall
time and the state of its ipywidgets, keyed exactly as the book build looks it up (see
``scripts/book_cache.py``). The book build that follows then executes no chapter a second time.

nbval only compares outputs, so it keeps a simplified copy of them: it drops widget messages,
ignores ``clear_output`` and display updates, and merges a cell's prints across its figures. We
therefore watch every kernel message nbval reads and assemble each cell's outputs the way a
notebook front end (and nbclient, which the book build would otherwise use) does: ipywidgets'
model state; outputs captured by an ``Output`` widget go into that widget, not the cell;
``clear_output(wait=...)``; ``update_display_data`` by display id; consecutive prints merged.
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

OUTPUT_MESSAGES = ("stream", "display_data", "execute_result", "error")


def pytest_addoption(parser):
    parser.addoption(
        "--book-cache",
        default=None,
        metavar="DIR",
        help="write the outputs of notebooks that pass under nbval into this jupyter-cache",
    )


class _KernelTranscript:
    """One notebook's kernel messages turned into cell outputs and widget state."""

    def __init__(self):
        self.order = []  # execute request ids, in the order the cells ran
        self.outputs = {}  # execute request id -> [output]
        self.clear_pending = {}  # execute request id -> clear_output(wait=True) seen
        self.display_ids = defaultdict(list)  # display id -> [(request id, output index)]
        self.widgets = {}  # comm id -> accumulated model state
        self.buffers = defaultdict(dict)  # comm id -> {path: base64 buffer}
        self.capture = defaultdict(list)  # request id -> stack of Output widget comm ids
        self.widget_clear_pending = set()  # Output widgets with a pending clear_output(wait)

    def observe(self, msg: dict) -> None:
        kind = msg.get("msg_type") or msg.get("header", {}).get("msg_type")
        parent = msg.get("parent_header", {}).get("msg_id")
        content = msg.get("content", {})
        if kind == "execute_input":
            self.order.append(parent)
            self.outputs.setdefault(parent, [])
        elif kind in ("comm_open", "comm_msg"):
            self._widget_message(msg, content)
        elif kind == "clear_output":
            self._clear(parent, bool(content.get("wait")))
        elif kind == "update_display_data":
            self._update_display(content)
        elif kind in OUTPUT_MESSAGES and parent in self.outputs:
            msg = {**msg, "header": {**msg.get("header", {}), "msg_type": kind}}
            output = nbformat.v4.output_from_msg(msg)
            display_id = (content.get("transient") or {}).get("display_id")
            if display_id:
                self._update_display(content)  # a display with a known id updates its others
            if self.capture[parent]:
                self._widget_output(self.capture[parent][-1], output)
                return
            if self.clear_pending.pop(parent, False):
                self._drop_cell_outputs(parent)
            self.outputs[parent].append(output)
            if display_id:
                self.display_ids[display_id].append((parent, len(self.outputs[parent]) - 1))

    # -- widgets ----------------------------------------------------------------------------------
    def _widget_message(self, msg: dict, content: dict) -> None:
        data = content.get("data", {})
        if "state" not in data:  # custom messages carry no model state
            return
        comm_id = content["comm_id"]
        state = self.widgets.setdefault(comm_id, {})
        state.update(data["state"])
        if data.get("buffer_paths"):
            from book_cache import encode_buffers

            self.buffers[comm_id].update(encode_buffers(msg))
        if state.get("_model_name") == "OutputModel" and "msg_id" in data["state"]:
            state.setdefault("outputs", [])
            # `with out:` in the kernel sets msg_id to the running request: from then on that
            # request's outputs belong to the widget, until msg_id is set back to "".
            for stack in self.capture.values():
                if comm_id in stack:
                    stack.remove(comm_id)
            if data["state"]["msg_id"]:
                self.capture[data["state"]["msg_id"]].append(comm_id)

    def _widget_output(self, comm_id: str, output) -> None:
        state = self.widgets[comm_id]
        if comm_id in self.widget_clear_pending:
            self.widget_clear_pending.discard(comm_id)
            state["outputs"] = []
        state.setdefault("outputs", []).append(output)
        state["outputs"] = [dict(o) for o in _merge(state["outputs"])]

    # -- cell outputs -----------------------------------------------------------------------------
    def _clear(self, parent: str, wait: bool) -> None:
        if self.capture.get(parent):
            comm_id = self.capture[parent][-1]
            if wait:
                self.widget_clear_pending.add(comm_id)
            else:
                self.widgets[comm_id]["outputs"] = []
        elif parent in self.outputs:
            if wait:
                self.clear_pending[parent] = True
            else:
                self._drop_cell_outputs(parent)

    def _drop_cell_outputs(self, parent: str) -> None:
        self.outputs[parent] = []
        for key in list(self.display_ids):
            self.display_ids[key] = [(p, i) for p, i in self.display_ids[key] if p != parent]

    def _update_display(self, content: dict) -> None:
        display_id = (content.get("transient") or {}).get("display_id")
        for parent, index in self.display_ids.get(display_id, []):
            self.outputs[parent][index]["data"] = content.get("data", {})
            self.outputs[parent][index]["metadata"] = content.get("metadata", {})

    def cell_outputs(self, parent: str) -> list:
        return _merge(self.outputs.get(parent, []))


def _merge(outputs):
    from book_cache import merge_consecutive_streams

    return merge_consecutive_streams(outputs)


class _NotebookRecorder:
    """Collects, per notebook, the executed cells, their outcome, time and widget state."""

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        self.transcripts = defaultdict(_KernelTranscript)  # notebook path -> transcript
        self.cells = defaultdict(dict)  # notebook path -> {cell_num: (source, outputs)}
        self.failed = defaultdict(list)  # notebook path -> [cell_num, ...]
        self.started = {}
        self.finished = {}
        self.code_cells = {}  # notebook path -> number of code cells nbval collected
        self.requests_before = {}  # item nodeid -> requests seen before its call

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        if hasattr(item, "cell_num"):
            self.requests_before[item.nodeid] = len(self.transcripts[str(item.parent.fspath)].order)
        yield

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        cell_num = getattr(item, "cell_num", None)
        if cell_num is None or not hasattr(item, "test_outputs"):
            return
        notebook = str(item.parent.fspath)
        self.started.setdefault(notebook, call.start)
        self.finished[notebook] = call.stop
        self.code_cells[notebook] = sum(1 for c in item.parent.nb.cells if c.cell_type == "code")
        report = outcome.get_result()
        if report.failed:
            self.failed[notebook].append(cell_num)
        elif call.when == "call":
            transcript = self.transcripts[notebook]
            new = transcript.order[self.requests_before.get(item.nodeid, len(transcript.order)):]
            if new:
                outputs = transcript.cell_outputs(new[0])
            else:  # no execute_input seen: fall back to nbval's own copy
                outputs = _merge(list(item.test_outputs or []))
            self.cells[notebook][cell_num] = (item.cell.source, outputs)
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
            transcript = self.transcripts[notebook]
            widgets = widget_state_metadata(transcript.widgets, transcript.buffers)
            try:
                store_executed(notebook, [ran[i] for i in range(len(ran))], seconds,
                               widgets=widgets, cache_dir=self.cache_dir)
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
        recorder.transcripts[str(self.fspath)].observe(msg)
        return msg

    IPyNbFile.get_kernel_message = get_kernel_message

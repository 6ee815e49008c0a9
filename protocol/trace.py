"""Spans for the step timeline: what each process was busy with, and when.

Every process of a run (each service's bus consumer, the trainer's loop) appends one JSON line
per span to `<RLRT_TRACE_DIR>/<process>-<pid>.jsonl`:

    {"kind": "rollout", "t0": 1765140000.12, "t1": 1765140000.57}

`t0`/`t1` are wall-clock seconds (time.time()), so spans of different processes on one host
line up. The launcher sets RLRT_TRACE_DIR (run.trace); without it nothing is recorded and a
span costs one dictionary lookup. rlrt/timeline.py renders the files as a PNG (one row per
process, gaps are idle) with each process's busy share.

A line is written when its span ends (line-buffered): a killed process loses at most the span
it was in, and the files of a run can be read while it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ENV = "RLRT_TRACE_DIR"


class Tracer:
    """Appends the spans of one process to its own file (one writer per file: no locking
    between processes; a lock between this process's threads)."""

    def __init__(self, directory: str | os.PathLike, process: str) -> None:
        self.process = process
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"{process}-{os.getpid()}.jsonl"
        self._lock = threading.Lock()
        # Line-buffered: each span reaches the OS as it ends (one write, no open per span on
        # the bus's per-message path); closed with the process.
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115

    def record(self, kind: str, t0: float, t1: float) -> None:
        line = json.dumps({"kind": kind, "t0": round(t0, 4), "t1": round(t1, 4)}) + "\n"
        with self._lock:
            self._file.write(line)

    @contextlib.contextmanager
    def span(self, kind: str) -> Iterator[None]:
        t0 = time.time()
        try:
            yield
        finally:
            self.record(kind, t0, time.time())


_tracers: dict[str, Tracer] = {}


def tracer(process: str) -> Tracer | None:
    """This process's tracer for `process` (a row of the timeline), or None when tracing is
    off (RLRT_TRACE_DIR unset)."""
    directory = os.environ.get(ENV)
    if not directory:
        return None
    t = _tracers.get(process)
    if t is None:
        t = _tracers[process] = Tracer(directory, process)
    return t


@contextlib.contextmanager
def span(process: str, kind: str) -> Iterator[None]:
    """Record `kind` on `process`'s row for the duration of the block (nothing when off)."""
    t = tracer(process)
    if t is None:
        yield
        return
    with t.span(kind):
        yield

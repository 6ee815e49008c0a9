"""Synthetic verifiable tasks. Each task is a module with
`verify(response: str, reference: str) -> protocol.tasks.base.CheckResult`.
The verifier grades with it; the trainer and `rlrt bootstrap` generate data with it."""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> module path. Add a task by writing a module and listing it here.
TASKS: dict[str, str] = {
    "countdown": "protocol.tasks.countdown",
}


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)} (and 'math')")
    return importlib.import_module(TASKS[name])

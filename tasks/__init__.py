"""Tasks: one `tasks.base.Task` per dataset kind (rows, rendering, grading).

A config names a task by a built-in name below or by dotted path, `"mypkg.tasks:MyTask"`
(a `Task` subclass importable where the trainer and the verifier run): a new task is one
module of yours, never an edit here. The name travels in `PromptTask.task`, so the verifier
resolves the same class."""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any

from tasks.base import Task

# Built-in tasks: name -> "module:Class".
TASKS: dict[str, str] = {
    "countdown": "tasks.countdown:CountdownTask",
    "math": "tasks.math:MathTask",
}


class UnknownTask(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def is_dotted(name: str) -> bool:
    return ":" in name


def task_class(name: str) -> type[Task]:
    """The class of a built-in task name or a "module:Class" path; UnknownTask otherwise."""
    target = TASKS.get(name) or (name if is_dotted(name) else None)
    if target is None:
        raise UnknownTask(f"unknown task {name!r}; built-in: {sorted(TASKS)}, or a "
                          "'module:Class' path of a tasks.base.Task subclass")
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UnknownTask(f"task {name!r} cannot be imported: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise UnknownTask(f"task {name!r} is not a tasks.base.Task subclass")
    return cls


@lru_cache(maxsize=64)
def _shared(name: str) -> Task:
    return task_class(name)()


def get_task(name: str, knobs: dict[str, Any] | None = None) -> Task:
    """An instance of task `name` (shared per name when it has no knobs: the verifier grades
    thousands of responses with one)."""
    return task_class(name)(knobs) if knobs else _shared(name)

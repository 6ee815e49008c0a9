"""Dispatch one check by task name: "math" goes to math-verify, anything else to the task's
own checker (tasks: a built-in name or a "module:Class" path)."""

from __future__ import annotations

from services.verifier.mathcheck import check_math
from tasks import TASKS, get_task, task_class
from tasks.base import CheckResult
from tasks.math import DEFAULT_POLICY

MATH = "math"


def known_tasks() -> list[str]:
    """Every task name the verifier accepts (validated at the API edge, before queueing)."""
    return sorted(TASKS)


# "module:Class" tasks of this run (its data and eval sections), set by `rlrt serve verifier`.
# Only these are accepted: a request must never make the verifier import a module it names.
_RUN_TASKS: set[str] = set()


def allow_tasks(names: list[str]) -> None:
    """Accept these tasks too (importing each now, so a bad path fails at start-up)."""
    for name in names:
        if name not in TASKS:
            task_class(name)
            _RUN_TASKS.add(name)


def is_known(task: str) -> bool:
    return task in TASKS or task in _RUN_TASKS


def check(task: str, response: str, reference: str, policy: str | None = None) -> CheckResult:
    """Grade one response; a "math" answer is taken under extraction `policy` (None = the
    default). May be slow or raise on hostile input: run it in a pool worker."""
    if task == MATH:
        return check_math(response, reference, policy or DEFAULT_POLICY)
    result = get_task(task).verify(response, reference)
    # A task module is third-party to this service: coerce whatever it returns into a fresh
    # CheckResult so a sloppy checker cannot hand back reward 1 with correct=False.
    result = CheckResult.model_validate(result, from_attributes=True)
    reward = 1.0 if result.correct and result.status == "ok" else 0.0
    return result.model_copy(update={"reward": reward, "correct": reward == 1.0})

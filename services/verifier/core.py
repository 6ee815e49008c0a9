"""Dispatch one check by task name: "math" goes to math-verify, anything else to the
synthetic task's own exact checker from the protocol.tasks registry."""

from __future__ import annotations

from protocol.tasks import TASKS, get_task
from protocol.tasks.base import CheckResult
from services.verifier.mathcheck import check_math

MATH = "math"


def known_tasks() -> list[str]:
    """Every task name the verifier accepts (validated at the API edge, before queueing)."""
    return [MATH, *sorted(TASKS)]


def check(task: str, response: str, reference: str) -> CheckResult:
    """Grade one response. May be slow or raise on hostile input: run it in a pool worker."""
    if task == MATH:
        return check_math(response, reference)
    result = get_task(task).verify(response, reference)
    # A task module is third-party to this service: coerce whatever it returns into a fresh
    # CheckResult so a sloppy checker cannot hand back reward 1 with correct=False.
    result = CheckResult.model_validate(result, from_attributes=True)
    reward = 1.0 if result.correct and result.status == "ok" else 0.0
    return result.model_copy(update={"reward": reward, "correct": reward == 1.0})

"""Maths: rows from your files or a hub dataset (`data: {path: ...}`), a final answer compared
by symbolic equivalence. Grading lives in the verifier (services/verifier/mathcheck.py, the one
place that imports math-verify and sympy, inside its killable pool), which dispatches the
name "math" there before asking this class."""

from __future__ import annotations

from tasks.base import CheckResult, Task


class MathTask(Task):
    name = "math"

    def verify(self, response: str, reference: str) -> CheckResult:
        raise NotImplementedError("math answers are graded by the verifier's math-verify "
                                  "(services/verifier/mathcheck.py)")

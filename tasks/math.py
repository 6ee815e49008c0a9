"""Maths: rows from your files or a hub dataset (`data: {path: ...}`), a final answer compared
by symbolic equivalence. Grading lives in the verifier (services/verifier/mathcheck.py, the one
place that imports math-verify and sympy, inside its killable pool), which dispatches the
name "math" there before asking this class.

Where the final answer is taken from is the *extraction policy* (docs/verifier.md has the
trade-off and how each agrees with Math-Verify's own test suite). The verifier's config picks
one per data source (`verifier.math_policy`, `verifier.math_policy_by_source`), a REST request
may name one (`policy`)."""

from __future__ import annotations

from typing import Literal, get_args

from tasks.base import CheckResult, Task

MathPolicy = Literal["boxed", "math_verify", "dapo"]
POLICIES: tuple[str, ...] = get_args(MathPolicy)
DEFAULT_POLICY: MathPolicy = "boxed"
# One line each, for config and API field descriptions.
POLICY_HELP = (
    "boxed = the last \\boxed{} (with the boxes joined to it by 'and', commas, \\quad: several "
    "answers compared as a set), else a final 'answer' line; strict, hard to game. "
    "math_verify = Math-Verify's own extraction anywhere in the response (verl's math_verify "
    "reward): fewest false negatives on free-form answers, easiest to game. "
    "dapo = the last 'Answer:' line of the response's last 300 characters (verl's math_dapo, "
    "DAPO-Math's format)"
)


class MathTask(Task):
    name = "math"

    def verify(self, response: str, reference: str) -> CheckResult:
        raise NotImplementedError("math answers are graded by the verifier's math-verify "
                                  "(services/verifier/mathcheck.py)")

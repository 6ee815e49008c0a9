"""A stand-in verifiable task for `rlrt inspect` tests: a response is correct when its text
contains the reference string. An untrained tiny model then gets a mix of right and wrong
responses at once, which is all the D_t page needs (no SFT, seconds not minutes). Named by
dotted path (`support.inspect_task:ContainsTask`), as a user's own task is."""

from __future__ import annotations

from tasks.base import CheckResult, Task


class ContainsTask(Task):
    name = "contains"

    def verify(self, response: str, reference: str) -> CheckResult:
        ok = reference in response
        return CheckResult(correct=ok, reward=1.0 if ok else 0.0, parsed_reference=reference)

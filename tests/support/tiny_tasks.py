"""A generator task of a user's own, named by dotted path (`support.tiny_tasks:Echo`): the
whole of a new task is this one file."""

from __future__ import annotations

from tasks.base import CheckResult, Task


class Echo(Task):
    name = "echo"

    def generate(self, split: str, n: int, seed: int) -> list[dict]:
        return [{"id": f"echo:{i}", "prompt": f"echo {i}", "answer": str(i)}
                for i in range(seed, seed + n)]

    def verify(self, response: str, reference: str) -> CheckResult:
        ok = response.strip() == reference
        return CheckResult(correct=ok, reward=float(ok))

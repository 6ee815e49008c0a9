"""What every task checker returns, shared by the verifier (which grades) and the trainer
(which generates data). A task is a plain module with a `verify(response, reference)`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

Status = Literal["ok", "timeout", "parse_error", "error"]


class CheckResult(BaseModel):
    """Verdict for one response. `reward` is 1.0 for correct, 0.0 otherwise."""

    correct: bool
    reward: float
    status: Status = "ok"
    parsed_response: str | None = None
    parsed_reference: str | None = None
    detail: str = ""

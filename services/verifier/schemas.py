"""Request and response bodies of the verifier's REST API (also the job records in Redis)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.verifier.core import MATH, is_known, known_tasks
from tasks.math import POLICY_HELP, MathPolicy

JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"done", "failed", "cancelled"})


def _valid_text(v: str) -> str:
    # JSON allows "\ud800" (a lone surrogate); Python keeps it, but it cannot be encoded as
    # UTF-8 and would blow up later (Redis, the response). Refuse it here, with a reason.
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text: unpaired surrogate at position {e.start}") from None
    return v


class VerifyRequest(BaseModel):
    """One response to grade against one reference."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"response": "... so the answer is \\boxed{\\frac{1}{2}}", "reference": "0.5", "task": "math"}
        ]},
    )

    response: str = Field(description="the model's full response; the final \\boxed{} or answer line is graded")
    reference: str = Field(description="the reference answer ('math') or the task's reference string")
    task: str = Field("math", description="'math' (math-verify) or a synthetic task name, e.g. 'countdown'")
    timeout_s: float | None = Field(
        None, gt=0, description="deadline for this item in seconds (default and maximum from the config)"
    )
    reward: bool = Field(
        False, description="grade with the verifier's reward plug-ins (the run's `reward:` section, "
        "docs/byo.md) instead of the task's checker alone; 422 when it has none"
    )
    row: dict[str, Any] | None = Field(
        None, description="the prompt's dataset row: given to the reward functions (with "
        "reward); its `data_source` picks the extraction policy (the config's "
        "math_policy_by_source) when `policy` is not set"
    )
    policy: MathPolicy | None = Field(
        None, description="task 'math' only: where the answer is taken from; default: the "
        "verifier's math_policy (or math_policy_by_source for the row's data_source). " + POLICY_HELP,
    )

    _text = field_validator("response", "reference")(_valid_text)

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        if not is_known(v):
            raise ValueError(f"unknown task {v!r}; known: {', '.join(known_tasks())}")
        return v

    @model_validator(mode="after")
    def _policy_is_for_math(self) -> VerifyRequest:
        # Another task's checker has no extraction policy: asking for one is a client's mistake.
        if self.policy is not None and self.task != MATH:
            raise ValueError(f"policy applies to task {MATH!r} only, not {self.task!r}")
        return self


class VerifyResult(BaseModel):
    correct: bool
    reward: float = Field(description="1.0 if correct else 0.0; with reward plug-ins, their weighted sum")
    status: Literal["ok", "timeout", "parse_error", "error"] = Field(
        description="ok: compared; parse_error: no answer found or unparseable; timeout: deadline hit; error: checker failed"
    )
    parsed_response: str | None = Field(None, description="the answer as extracted (truncated)")
    parsed_reference: str | None = Field(None, description="the reference as parsed (truncated)")
    detail: str = ""
    latency_ms: float = Field(description="time in the service, queueing included")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[VerifyRequest] = Field(min_length=1, description="at most max_batch (default 1,024) items")


class BatchResult(BaseModel):
    results: list[VerifyResult] = Field(description="one per item, in input order")


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[VerifyRequest] = Field(min_length=1, description="at most max_job_items items")


class JobCreated(BaseModel):
    job_id: str


class Progress(BaseModel):
    done: int
    total: int


class JobState(BaseModel):
    job_id: str
    status: JobStatus
    progress: Progress
    created_at: float
    updated_at: float
    error: str | None = None
    results: list[VerifyResult] | None = Field(None, description="present once the job is done")

"""Typed messages, one per hop of the data plane (see docs/architecture.md).

    trainer --PromptTask--> rollout --RolloutGroup--> verifier --VerifiedGroup-->
        teacher --ScoredGroup--> trainer;   trainer --WeightUpdate--> services (HTTP)

Each later message *extends* the one before it, so a worker adds its part and passes the
rest on untouched. Every message carries `schema_version`, its own `msg_id` (the idempotency
key on the bus), the `run_id` and timestamps. Unknown fields from a newer schema are ignored,
missing or wrongly typed ones fail with pydantic's error naming the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.arrays import Float32Array, Int32Array
from protocol.canary import Canary

SCHEMA_VERSION = 1

FinishReason = Literal["stop", "length", "abort"]
VerifyStatus = Literal["ok", "timeout", "parse_error", "error"]


def new_id() -> str:
    return uuid.uuid4().hex


def derive_id(parent_id: str, stage: str) -> str:
    """Deterministic child id: a redelivered input yields the same output id, so the bus's
    publish-once guard drops the duplicate instead of sending it downstream twice."""
    return uuid.uuid5(uuid.NAMESPACE_OID, f"{parent_id}/{stage}").hex


class Message(BaseModel):
    """Envelope fields every message has."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)

    schema_version: int = SCHEMA_VERSION
    msg_id: str = Field(default_factory=new_id, description="idempotency key on the bus")
    run_id: str
    created_at: float = Field(default_factory=time.time, description="unix seconds")


class SamplingParams(BaseModel):
    """What the rollout engine samples with. Mirrors the subset SGLang and vLLM both accept."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(256, ge=1, description="response length cap (tokens)")
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 = off")
    stop_token_ids: list[int] = Field(default_factory=list, description="besides EOS")
    seed: int | None = Field(None, description="per-request seed (reproducible sampling)")


class TeacherRequest(BaseModel):
    """What the teacher service must do for this prompt's group: set by the trainer from the
    preset (`AlgorithmConfig.teacher_request()`), so the teacher service needs no algorithm
    config of its own. Interpreted by tasks/teacher.py on both sides."""

    model_config = ConfigDict(extra="ignore")

    scope: Literal["none", "correct_mixed", "nonzero_adv", "all"] = Field(
        "none",
        description="which responses get teacher scores: none; correct responses of mixed "
        "groups (rlrt); every response with A != 0 (rlrt_all, rlsd); all (opsd)",
    )
    context_mode: Literal["sibling", "reference_solution", "reference_answer"] = Field(
        "sibling", description="the demonstration: another correct response, or the dataset's"
    )
    fallback_to_solution: bool = Field(
        True,
        description="sibling mode: use the reference solution when no other response is correct",
    )
    strip_think: bool = Field(True, description="remove <think>...</think> from a sibling")
    template: str | None = Field(None, description="None = the default template of the spec")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="extra apply_chat_template arguments, e.g. {'enable_thinking': False}: "
        "render the teacher prompt the way the student's prompt was rendered",
    )
    system_prompt: str | None = Field(
        None, description="the system message the student's prompt was rendered with (the "
        "data section's system_prompt): the teacher's context keeps it",
    )
    chat_template: str | None = Field(
        None, description="the data section's chat_template the student's prompt was rendered "
        "with (None = the model's own; 'raw' = none): the teacher's context is rendered alike")
    seed: int = Field(0, description="seeds the choice of sibling (deterministic per group)")
    estimator: str = Field(
        "grpo",
        description="the advantage estimator (protocol/estimators.py): decides which responses "
        "have zero advantage, hence need no teacher score",
    )
    score_student: bool = Field(
        False,
        description="also score each scored response's student context (prompt + response, "
        "no demonstration) in the same engine batch, so D_t = q_t - s_t comes from one engine "
        "(algorithm.student_logprobs: engine)",
    )


class PromptTask(Message):
    """One prompt to be sampled G times (trainer -> rollout)."""

    prompt_id: str
    group_id: str = Field(default_factory=new_id, description="one id per sampled group")
    prompt_text: str = Field(description="the user-visible question (before the chat template)")
    prompt_history: list[dict[str, str]] | None = Field(
        None, description="a conversational prompt's earlier turns ({role, content}: system, "
        "user, assistant), before the user turn prompt_text; the teacher's context keeps them")
    prompt_ids: Int32Array = Field(description="chat-templated prompt token ids")
    answer: str = Field(description="reference final answer, as the verifier expects it")
    solution: str | None = Field(None, description="optional reference solution (teacher context)")
    task: str = Field("math", description="verifier task name: 'math' or a synthetic task")
    group_size: int = Field(8, ge=1)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    policy_version: int = Field(0, ge=0, description="trainer version when the task was admitted")
    teacher: TeacherRequest = Field(default_factory=TeacherRequest)
    reply_to: str | None = Field(
        None, description="stream (under the bus prefix) for the RolloutGroup instead of the "
        "rollout service's own out_stream: evaluation uses it to bypass verification/training",
    )
    meta: dict[str, Any] = Field(default_factory=dict)


class Response(BaseModel):
    """One sampled response with the engine's per-token log-probs of the sampled tokens."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)

    token_ids: Int32Array
    logprobs: Float32Array = Field(description="engine's sampling log-prob per token")
    finish_reason: FinishReason
    text: str = ""

    @model_validator(mode="after")
    def _aligned(self) -> Response:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"token_ids ({len(self.token_ids)}) and logprobs ({len(self.logprobs)}) differ in length"
            )
        return self


class RolloutGroup(Message):
    """G responses to one PromptTask (rollout -> verifier)."""

    task: PromptTask
    responses: list[Response]
    engine_version: int = Field(ge=0, description="policy version of the weights that sampled")
    parent_id: str | None = Field(None, description="msg_id of the PromptTask")


class Verification(BaseModel):
    model_config = ConfigDict(extra="ignore")

    reward: float
    correct: bool
    status: VerifyStatus = "ok"
    detail: str = ""


class VerifiedGroup(RolloutGroup):
    """A RolloutGroup with one verdict per response (verifier -> teacher)."""

    verifications: list[Verification]

    @model_validator(mode="after")
    def _one_per_response(self) -> VerifiedGroup:
        if len(self.verifications) != len(self.responses):
            raise ValueError(
                f"{len(self.verifications)} verifications for {len(self.responses)} responses"
            )
        return self

    @property
    def rewards(self) -> list[float]:
        return [v.reward for v in self.verifications]


class TeacherScores(BaseModel):
    """Teacher log-prob q_t of each response token of one response, under context c."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)

    logprobs: Float32Array
    context_mode: Literal["sibling", "reference_solution", "reference_answer"]
    demo_index: int | None = Field(None, description="which sibling was the demonstration")
    student_logprobs: Float32Array | None = Field(
        None, description="s_t of the same tokens under the student context (prompt + "
        "response), scored by the same engine in the same batch; only when "
        "TeacherRequest.score_student")


class ScoredGroup(VerifiedGroup):
    """A VerifiedGroup with teacher scores where the preset needs them (teacher -> trainer)."""

    teacher: list[TeacherScores | None] = Field(description="None where not scored")
    teacher_version: int | None = Field(None, description="policy version of the teacher weights")
    scored_tokens: int = 0
    skipped_tokens: int = 0
    student_context_tokens: int = Field(
        0, description="tokens of the extra student contexts (prompt + response) the teacher "
        "prefilled for TeacherRequest.score_student")

    @classmethod
    def unscored(cls, group: VerifiedGroup) -> ScoredGroup:
        """`group` as the trainer takes it from the verifier when no teacher service runs
        (presets that never score): no teacher entry, every token skipped -- what the teacher
        publishes for such a group (services/teacher/worker.py)."""
        fields = dict(group)  # shallow: token/log-prob arrays pass through uncopied
        fields.update(msg_id=derive_id(group.msg_id, "scored"), teacher=[None] * len(group.responses),
                      teacher_version=None, scored_tokens=0,
                      skipped_tokens=sum(len(r.token_ids) for r in group.responses))
        return cls.model_validate(fields)

    @model_validator(mode="after")
    def _aligned_teacher(self) -> ScoredGroup:
        if len(self.teacher) != len(self.responses):
            raise ValueError(f"{len(self.teacher)} teacher entries for {len(self.responses)} responses")
        for i, (t, r) in enumerate(zip(self.teacher, self.responses, strict=True)):
            if t is not None and len(t.logprobs) != len(r.token_ids):
                raise ValueError(f"teacher[{i}] has {len(t.logprobs)} log-probs for {len(r.token_ids)} tokens")
            if t is not None and t.student_logprobs is not None and len(t.student_logprobs) != len(r.token_ids):
                raise ValueError(f"teacher[{i}] has {len(t.student_logprobs)} student log-probs for {len(r.token_ids)} tokens")
        return self


class WeightUpdate(Message):
    """The body of POST /v1/weights (trainer or launcher -> rollout/teacher services): the one
    schema of a weight update, from the sender's model to the engine's `update_weights`.
    A service validates what it receives as `WeightUpdateRequest` (stricter, below)."""

    # A control call made by hand (curl, an operator) belongs to no run.
    run_id: str = Field("control", max_length=200)
    version: int = Field(ge=0, description="policy version of these weights")
    format: Literal["safetensors_dir", "nccl"] = "safetensors_dir"
    location: str = Field(
        min_length=1, max_length=4096,
        description="weight directory (safetensors_dir) or HOST:PORT of the trainer's NCCL "
        "rendezvous (nccl)")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$",
        description="hex digest of the directory's manifest.json (protocol.weights); required "
        "by the services for safetensors_dir")
    meta: dict[str, Any] = Field(
        default_factory=dict, description='e.g. {"nccl": {...}} (protocol.weights.NcclSpec), '
        '{"allow_rollback": true} (a resumed trainer going back to its checkpoint)')
    canary: Canary | None = Field(
        None, description="the trainer's log-probs of fixed sequences under these weights; "
        "services score them after loading and refuse a mismatch (protocol/canary.py)")


class WeightUpdateRequest(WeightUpdate):
    """A WeightUpdate as a service accepts it over HTTP: an unknown field is refused (a typo on
    the control plane must not be ignored) and a weight directory must come with its digest."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _digest_required(self) -> WeightUpdateRequest:
        # Without the digest the manifest itself is unchecked: whoever can write the shared
        # volume could swap the weights between the trainer's write and this load.
        if self.format == "safetensors_dir" and self.sha256 is None:
            raise ValueError("sha256 (of the directory's manifest.json) is required for safetensors_dir")
        return self


def as_array(values: Any, dtype: str = "float32") -> np.ndarray:
    """Helper for producers: a flat numpy array of the given dtype."""
    return np.asarray(values, dtype=dtype).reshape(-1)

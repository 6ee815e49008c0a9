"""Every message round-trips through msgpack and JSON; schema evolution; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from protocol.codec import decode, encode
from protocol.messages import (
    PromptTask,
    Response,
    RolloutGroup,
    ScoredGroup,
    TeacherScores,
    Verification,
    VerifiedGroup,
    WeightUpdate,
    derive_id,
)


def _task() -> PromptTask:
    return PromptTask(run_id="r1", prompt_id="p1", prompt_text="What is 2+3?",
                      prompt_ids=np.arange(7), answer="5", solution="2+3=5", task="math",
                      group_size=2)


def _responses() -> list[Response]:
    return [
        Response(token_ids=[5, 6, 7], logprobs=[-0.5, -1.25, float("-inf")], finish_reason="stop",
                 text="a"),
        Response(token_ids=[8], logprobs=[-2.0], finish_reason="length", text="b"),
    ]


def _all_messages():
    task = _task()
    rg = RolloutGroup(run_id="r1", task=task, responses=_responses(), engine_version=3)
    ver = [Verification(reward=1.0, correct=True), Verification(reward=0.0, correct=False,
                                                                status="parse_error", detail="x")]
    vg = VerifiedGroup(**rg.model_dump(), verifications=ver)
    sg = ScoredGroup(**vg.model_dump(), teacher=[TeacherScores(logprobs=[-0.1, -0.2, -0.3],
                                                                context_mode="sibling", demo_index=1), None],
                     teacher_version=3, scored_tokens=3, skipped_tokens=1)
    wu = WeightUpdate(run_id="r1", version=4, location="/tmp/w", sha256="ab" * 32)
    return [task, rg, vg, sg, wu]


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("msg", _all_messages(), ids=lambda m: type(m).__name__)
def test_roundtrip_msgpack_and_json(msg) -> None:
    back = decode(encode(msg), type(msg))
    assert _same(back.model_dump(), msg.model_dump())
    back_json = type(msg).model_validate_json(msg.model_dump_json())
    assert _same(back_json.model_dump(), msg.model_dump())


def test_arrays_are_packed_not_float_lists() -> None:
    rg = _all_messages()[1]
    big = RolloutGroup(run_id="r", task=rg.task, engine_version=0, responses=[
        Response(token_ids=np.arange(1024), logprobs=np.full(1024, -0.123456, np.float32),
                 finish_reason="length") for _ in range(8)])
    # 8 x 1024 x (4 + 4) bytes of arrays, plus a small envelope.
    assert len(encode(big)) < 8 * 1024 * 8 + 4096


def test_newer_schema_with_extra_field_is_accepted() -> None:
    data = _task().model_dump()
    data["schema_version"] = 2
    data["some_future_field"] = {"x": 1}
    back = PromptTask.model_validate(data)
    assert back.schema_version == 2 and back.prompt_id == "p1"


def test_missing_field_names_the_field() -> None:
    data = _task().model_dump()
    del data["answer"]
    with pytest.raises(ValidationError) as e:
        PromptTask.model_validate(data)
    assert any(err["loc"] == ("answer",) and err["type"] == "missing" for err in e.value.errors())


def test_wrong_type_names_the_field() -> None:
    data = _task().model_dump()
    data["group_size"] = "many"
    with pytest.raises(ValidationError) as e:
        PromptTask.model_validate(data)
    assert ("group_size",) in [err["loc"] for err in e.value.errors()]


def test_nested_wrong_type_names_the_path() -> None:
    data = _all_messages()[1].model_dump()
    data["responses"][1]["finish_reason"] = "exploded"
    with pytest.raises(ValidationError) as e:
        RolloutGroup.model_validate(data)
    assert ("responses", 1, "finish_reason") in [err["loc"] for err in e.value.errors()]


def test_misaligned_arrays_are_rejected() -> None:
    with pytest.raises(ValidationError, match="differ in length"):
        Response(token_ids=[1, 2], logprobs=[-1.0], finish_reason="stop")


def test_derive_id_is_deterministic_and_distinct() -> None:
    assert derive_id("abc", "verified") == derive_id("abc", "verified")
    assert derive_id("abc", "verified") != derive_id("abc", "scored")
    assert derive_id("abc", "verified") != derive_id("abd", "verified")

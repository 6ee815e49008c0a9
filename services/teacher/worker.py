"""Bus worker: VerifiedGroup in, ScoredGroup out.

Only what the teacher contract (tasks/teacher.py) asks for is scored -- for rlrt, the
correct responses of mixed groups that have a demonstration; every other response passes
through with `teacher = None`. Each scored response gets q_t = log p(y_t | c, x, y_<t) of its
own sampled tokens under the teacher context c, at the engine's current policy version.
When the request asks `score_student`, the same call also scores the student context (the
prompt the rollout saw + the response, no demonstration), so D_t = q_t - s_t can come from one
engine and one batch (algorithm.student_logprobs: engine).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from prometheus_client import Counter, Histogram

from protocol.bus import Bus
from protocol.messages import ScoredGroup, TeacherScores, VerifiedGroup, derive_id
from services.engines.base import Engine, InvalidRequest, UpstreamError
from tasks.teacher import TeacherContext, teacher_context_for_group, teacher_needed_for_group

log = logging.getLogger("rlrt.teacher")
GROUPS = Counter("rlrt_teacher_groups_total", "ScoredGroups published")
TOKENS = Counter("rlrt_teacher_tokens_total",
                 "response tokens, scored or skipped; student_context: the extra prefill of "
                 "TeacherRequest.score_student (prompt + response)", ["kind"])
RESPONSES = Counter("rlrt_teacher_responses_total", "responses by outcome", ["outcome"])
SECONDS = Histogram("rlrt_teacher_group_seconds", "time to score one group",
                    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120))


def build_contexts(group: VerifiedGroup, tokenizer: Any) -> list[TeacherContext | None]:
    """The teacher context of every response that needs a score, None elsewhere."""
    needed = teacher_needed_for_group(group)
    return [teacher_context_for_group(group, i, tokenizer) if need else None
            for i, need in enumerate(needed)]


def student_context(group: VerifiedGroup, index: int) -> tuple[list[int], int]:
    """(prompt ids + response ids, response start): exactly the tokens the rollout engine
    sampled from, so its score is s_t of the same tokens under the student's context."""
    prompt = [int(t) for t in group.task.prompt_ids]
    return prompt + [int(t) for t in group.responses[index].token_ids], len(prompt)


async def _score_all(engine: Engine, seqs: list[list[int]], offs: list[int]
                     ) -> list[np.ndarray | None]:
    """Score every sequence in one call; if the engine refuses the batch (a context longer than
    its window), score them one by one and leave the refused ones unscored (plain GRPO for
    that response) instead of failing the whole group forever."""
    try:
        return list(await engine.score(seqs, offs))
    except InvalidRequest as e:
        log.warning("teacher batch refused (%s); scoring one by one", e)
    out: list[np.ndarray | None] = []
    for s, o in zip(seqs, offs, strict=True):
        try:
            out.append((await engine.score([s], [o]))[0])
        except InvalidRequest as e:
            log.warning("teacher context of %d tokens left unscored: %s", len(s), e)
            RESPONSES.labels("refused").inc()
            out.append(None)
    return out


async def score_group(engine: Engine, tokenizer: Any, group: VerifiedGroup, *,
                      version_retries: int = 3) -> ScoredGroup:
    start = time.perf_counter()
    contexts = await asyncio.to_thread(build_contexts, group, tokenizer)
    idx = [i for i, c in enumerate(contexts) if c is not None]
    teacher: list[TeacherScores | None] = [None] * len(group.responses)
    version: int | None = None
    seqs = [c.input_ids for c in contexts if c is not None]
    offs = [c.response_start for c in contexts if c is not None]
    with_student = group.task.teacher.score_student
    if with_student:  # the student contexts ride in the same call: same engine, same version
        students = [student_context(group, i) for i in idx]
        seqs += [seq for seq, _ in students]
        offs += [off for _, off in students]
    student_tokens = sum(len(seq) for seq in seqs[len(idx):])
    if idx:
        for _attempt in range(version_retries + 1):
            before = engine.version
            scores = await _score_all(engine, seqs, offs)
            if engine.version == before:  # no weight swap overlapped: all at one version
                version = before
                break
        else:
            raise UpstreamError(f"teacher weights changed during scoring {version_retries + 1} times")
        student_scores = scores[len(idx):] if with_student else [None] * len(idx)
        for i, s, s_student in zip(idx, scores[:len(idx)], student_scores, strict=True):
            if s is None:
                continue
            ctx = contexts[i]
            assert ctx is not None
            teacher[i] = TeacherScores(logprobs=s, context_mode=ctx.demonstration.mode,
                                       demo_index=ctx.demonstration.index,
                                       student_logprobs=s_student)
    lengths = [len(r.token_ids) for r in group.responses]
    scored = sum(n for n, t in zip(lengths, teacher, strict=True) if t is not None)
    skipped = sum(lengths) - scored
    TOKENS.labels("scored").inc(scored)
    TOKENS.labels("skipped").inc(skipped)
    TOKENS.labels("student_context").inc(student_tokens)
    for t, c in zip(teacher, contexts, strict=True):
        RESPONSES.labels("scored" if t is not None else "not_needed" if c is None
                         else "unscored").inc()
    SECONDS.observe(time.perf_counter() - start)
    fields = dict(group)  # shallow: token/log-prob arrays pass through uncopied
    fields.update(
        # Deterministic: a redelivered group yields the same id, which the bus publishes once.
        msg_id=derive_id(group.msg_id, "scored"),
        created_at=time.time(),
        teacher=teacher,
        teacher_version=version if any(t is not None for t in teacher) else None,
        scored_tokens=scored,
        skipped_tokens=skipped,
        student_context_tokens=student_tokens,
    )
    return ScoredGroup.model_validate(fields)


async def consume(bus: Bus, engine: Engine, tokenizer: Any, stop: asyncio.Event, *,
                  in_stream: str, out_stream: str, group: str, consumer: str,
                  concurrency: int = 8, version_retries: int = 3) -> int:
    """Run until `stop`; returns the number of groups finished (published or dead-lettered)."""

    async def handle(msg: VerifiedGroup) -> None:
        await bus.publish(out_stream, await score_group(engine, tokenizer, msg,
                                                        version_retries=version_retries))
        GROUPS.inc()

    return await bus.consume(in_stream, group, consumer, handle, VerifiedGroup, stop,
                             concurrency=concurrency)

"""Bus worker: RolloutGroup in, VerifiedGroup out (one Verification per response)."""

from __future__ import annotations

import asyncio
import time

from protocol.bus import Bus
from protocol.messages import RolloutGroup, Verification, VerifiedGroup, derive_id
from services.verifier import metrics
from services.verifier.core import known_tasks
from services.verifier.pool import Item, VerifyPool


class UnknownTask(ValueError):
    """The group names a task this verifier cannot grade: a poison message (dead-lettered)."""


async def verify_group(pool: VerifyPool, group: RolloutGroup, timeout_s: float) -> VerifiedGroup:
    """Grade every response of the group against the prompt's reference answer."""
    task = group.task.task
    if task not in known_tasks():
        raise UnknownTask(f"unknown task {task!r}; known: {', '.join(known_tasks())}")
    items = [Item(task=task, response=r.text, reference=group.task.answer, timeout_s=timeout_s)
             for r in group.responses]
    # The worker's own concurrency bounds what it queues, so it skips the HTTP admission bound.
    verdicts = await pool.run(items, enforce_limit=False) if items else []
    metrics.observe("bus", verdicts)
    fields = dict(group)  # shallow: the token/log-prob arrays are passed on, not copied
    fields.update(
        # Deterministic: a redelivered group yields the same id, which the bus publishes once.
        msg_id=derive_id(group.msg_id, "verified"),
        created_at=time.time(),
        verifications=[Verification(reward=v.reward, correct=v.correct, status=v.status, detail=v.detail)
                       for v in verdicts],
    )
    return VerifiedGroup.model_validate(fields)


async def consume(bus: Bus, pool: VerifyPool, stop: asyncio.Event, *, in_stream: str, out_stream: str,
                  group: str, consumer: str, timeout_s: float, concurrency: int = 8) -> int:
    """Run until `stop`; returns the number of groups finished (published or dead-lettered).
    Undecodable groups and unknown tasks go to `<in_stream>:dead` and the worker keeps going."""

    async def handle(msg: RolloutGroup) -> None:
        await bus.publish(out_stream, await verify_group(pool, msg, timeout_s))

    return await bus.consume(in_stream, group, consumer, handle, RolloutGroup, stop, concurrency=concurrency)

"""Bus worker: RolloutGroup in, VerifiedGroup out (one Verification per response)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

from protocol.bus import Bus, PermanentError
from protocol.messages import RolloutGroup, Verification, VerifiedGroup, derive_id
from services.verifier import metrics
from services.verifier.core import is_known, known_tasks
from services.verifier.pool import Item, VerifyPool
from tasks.rewards import Spec, prompt_row

# (task, the prompt's row) -> the math extraction policy of its responses
# (VerifierConfig.math_policy_for); None for the default.
PolicyFor = Callable[[str, Mapping[str, Any] | None], "str | None"]


class UnknownTask(ValueError):
    """The group names a task this verifier cannot grade: a poison message (dead-lettered)."""


class RewardFunctionFailed(PermanentError):
    """A user reward function raised on a response of the group: the group is dead-lettered at
    once (a rerun would fail the same way) with the traceback, and the worker keeps going."""


async def verify_group(pool: VerifyPool, group: RolloutGroup, timeout_s: float,
                       reward: Spec | None = None, policy_for: PolicyFor | None = None) -> VerifiedGroup:
    """Grade every response of the group against the prompt's reference answer, with the
    task's checker or, when `reward` is set, the run's reward plug-ins (tasks/rewards.py);
    maths under the extraction policy `policy_for` picks for the prompt's row."""
    task = group.task.task
    if not is_known(task):
        raise UnknownTask(f"unknown task {task!r}; known: {', '.join(known_tasks())}")
    row = prompt_row(group.task)
    policy = policy_for(task, row) if policy_for is not None else None
    items = [Item(task=task, response=r.text, reference=group.task.answer, timeout_s=timeout_s,
                  reward=reward, row=row if reward is not None else None, policy=policy)
             for r in group.responses]
    # The worker's own concurrency bounds what it queues, so it skips the HTTP admission bound.
    verdicts = await pool.run(items, enforce_limit=False) if items else []
    metrics.observe("bus", verdicts)
    for i, v in enumerate(verdicts):
        if v.reward_error is not None:
            raise RewardFunctionFailed(f"{v.detail} on response {i} of group {group.task.group_id} "
                                       f"(prompt {group.task.prompt_id}):\n{v.reward_error}")
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
                  group: str, consumer: str, timeout_s: float, concurrency: int = 8,
                  reward: Spec | None = None, policy_for: PolicyFor | None = None) -> int:
    """Run until `stop`; returns the number of groups finished (published or dead-lettered).
    Undecodable groups, unknown tasks and groups on which a reward function failed go to
    `<in_stream>:dead` and the worker keeps going."""

    async def handle(msg: RolloutGroup) -> None:
        await bus.publish(out_stream, await verify_group(pool, msg, timeout_s, reward, policy_for))

    return await bus.consume(in_stream, group, consumer, handle, RolloutGroup, stop, concurrency=concurrency)

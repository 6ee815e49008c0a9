"""Bus worker: PromptTask in, RolloutGroup out (G responses, stamped with the engine's version)."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import Counter, Histogram

from protocol.bus import Bus
from protocol.messages import PromptTask, RolloutGroup, derive_id
from services.engines.base import Engine, UpstreamError

GROUPS = Counter("rlrt_rollout_groups_total", "RolloutGroups published")
TOKENS = Counter("rlrt_rollout_tokens_total", "response tokens sampled")
FINISH = Counter("rlrt_rollout_responses_total", "responses by finish reason", ["finish"])
SECONDS = Histogram("rlrt_rollout_group_seconds", "time to sample one group",
                    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))


async def rollout_group(engine: Engine, task: PromptTask) -> RolloutGroup:
    """Sample the task's group. Raises InvalidRequest for a bad prompt (the bus retries, then
    dead-letters it) and UpstreamError when the engine failed or the group is unusable."""
    start = time.perf_counter()
    outs = await engine.generate(task.prompt_ids.tolist(), task.group_size, task.sampling)
    if len(outs) != task.group_size:
        raise UpstreamError(f"engine returned {len(outs)} responses for group_size {task.group_size}")
    versions = {o.weight_version for o in outs}
    if len(versions) != 1:  # one group = one behaviour policy
        raise UpstreamError(f"responses of one group came from versions {sorted(versions)}")
    if any(o.finish_reason == "abort" for o in outs):
        raise UpstreamError("the engine aborted some responses of the group")
    SECONDS.observe(time.perf_counter() - start)
    for o in outs:
        TOKENS.inc(len(o.token_ids))
        FINISH.labels(o.finish_reason).inc()
    return RolloutGroup(
        # Deterministic: a redelivered task yields the same id, which the bus publishes once.
        msg_id=derive_id(task.msg_id, "rollout"),
        run_id=task.run_id,
        task=task,
        responses=[o.to_response() for o in outs],
        engine_version=versions.pop(),
        parent_id=task.msg_id,
    )


async def consume(bus: Bus, engine: Engine, stop: asyncio.Event, *, in_stream: str,
                  out_stream: str, group: str, consumer: str, concurrency: int = 8) -> int:
    """Run until `stop`; returns the number of tasks finished (published or dead-lettered)."""

    prefix = bus.cfg.prefix + ":"

    async def handle(task: PromptTask) -> None:
        # Evaluation traffic names its own reply stream; it must stay inside this run's
        # namespace so a message cannot make the worker write to arbitrary keys.
        target = out_stream
        if task.reply_to:
            if not task.reply_to.startswith(prefix):
                raise ValueError(f"reply_to {task.reply_to!r} is outside the bus prefix {prefix!r}")
            target = task.reply_to
        out = await rollout_group(engine, task)
        await bus.publish(target, out)
        GROUPS.inc()

    return await bus.consume(in_stream, group, consumer, handle, PromptTask, stop,
                             concurrency=concurrency)

"""Is the bus where the checkpoint left it? If not, make it so (issue 26).

After every checkpoint the trainer records its step on the bus (`<prefix>:trainer:<nonce>:
checkpoint`). A resume compares that mark with the step it resumes from:

- equal: the bus holds everything the checkpoint relies on (the prompts of its in-flight tasks,
  their groups, the inbox); Redis's state is at worst a later moment, as after any SIGKILL.
- behind or missing: Redis lost writes made before the checkpoint (an AOF cut or corrupted and
  then repaired, a lost disk): prompts the checkpoint counts as in flight may be gone, so a
  plain resume would wait for them or never train them.
- ahead: the run resumes from an older checkpoint than the bus has seen (`--resume-from`, or a
  fallback past a damaged newer checkpoint): the groups of its in-flight tasks were used and
  committed by the abandoned steps, and its next tasks' ids were published already, so a
  plain resume would wait out `wait_timeout_s` for groups that never come.

In the two latter cases the driver gets a new nonce (a fresh inbox, fresh task ids: whatever
the abandoned or damaged history left on the bus counts as another run's and is dropped as
"foreign") and every task the checkpoint has in flight is published again, identical to the
original (same row, group id and sampling seed). Every task is trained exactly once: its
first usable group is trained, any other copy finds it no longer in flight.
"""

from __future__ import annotations

import copy
import logging
import uuid
from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from trainer.driver import Driver
from trainer.inbox import Inbox

log = logging.getLogger("rlrt.trainer.bus_sync")


def mark_key(prefix: str, nonce: str) -> str:
    return f"{prefix}:trainer:{nonce}:checkpoint"


def inbox_key(prefix: str, nonce: str) -> str:
    """The inbox's Redis key of a run (nonce): one definition for the trainer and this module."""
    return f"{prefix}:trainer:{nonce}"


async def mark(r: aioredis.Redis, prefix: str, nonce: str, step: int) -> None:
    """Record on the bus that checkpoint `step` is written (after its inbox commit)."""
    await r.set(mark_key(prefix, nonce), str(step))


def mismatch(mark_value: bytes | str | None, step: int, state: dict[str, Any]) -> str | None:
    """Why the bus does not match checkpoint `step`, or None when it does (or when the
    checkpoint predates marks: nothing to compare with)."""
    if not state.get("bus_marked"):
        return None
    if mark_value is None:
        return (f"the bus has no record of checkpoint step {step} (Redis lost writes made "
                "before it: a damaged or repaired AOF, or another Redis)")
    seen = int(mark_value)
    if seen < step:
        return (f"the bus last saw checkpoint step {seen}, not {step} (Redis lost writes made "
                "before the checkpoint: a damaged or repaired AOF)")
    if seen > step:
        return (f"the bus has seen checkpoint step {seen}: this run resumes from the older "
                f"step {step}")
    return None


class Resync:
    """A bus found out of step with the checkpoint: the driver's new inbox, and the tasks to
    publish again (`readmit`, once the services have the checkpoint's weights: published
    before, they would be sampled by whatever the services hold and dropped as stale)."""

    def __init__(self, driver: Driver, inbox: Inbox, tasks: list[Any], why: str) -> None:
        self.driver, self.inbox, self.tasks, self.why = driver, inbox, tasks, why

    async def readmit(self, step: int) -> None:
        for task in self.tasks:
            await self.driver.bus.publish(self.driver.stream, task,
                                          timeout_s=self.driver.publish_timeout_s)
        log.warning("%s: re-admitted the %d tasks in flight at checkpoint step %d under a new "
                    "nonce (%s); groups from the earlier history are dropped as foreign",
                    self.why, len(self.tasks), step, self.driver.state.nonce)


async def resync(r: aioredis.Redis, prefix: str, driver: Driver, step: int,
                 state: dict[str, Any]) -> Resync | None:
    """Check the bus against checkpoint `step` (its trainer state `state`). When they differ,
    move the driver to a new nonce and a new (empty) inbox, which the trainer must use from
    now on, and rebuild its in-flight tasks for `Resync.readmit`; None when they match."""
    why = mismatch(await r.get(mark_key(prefix, driver.state.nonce)), step, state)
    if why is None:
        return None
    new = uuid.uuid4().hex[:12]
    tasks = _replay_inflight(driver, new)
    driver.state.nonce = new
    driver.inbox = Inbox(r, inbox_key(prefix, new))
    await mark(r, prefix, new, step)
    return Resync(driver, driver.inbox, tasks, why)


def _replay_inflight(driver: Driver, nonce: str) -> list[Any]:
    """The PromptTasks of the in-flight tasks under `nonce`, otherwise as first published
    (row, group id, sampling seed): the driver's admissions are replayed from cursor 0 on a
    copy of its prompt source (task k is the k-th usable row; the state keeps no row per
    task), keeping the ones still in flight."""
    saved_state, saved_source = driver.state, driver.source
    saved_context = driver._without_context  # noqa: SLF001 - replay must not move it
    source = copy.copy(saved_source)
    source.skipped = Counter()  # the real counts are the checkpoint's
    source.report_path = None  # reported when first drawn
    driver.source = source
    driver.state = type(saved_state)(nonce=nonce)
    try:
        tasks = []
        for k in range(saved_state.admitted):
            version = saved_state.inflight.get(k, 0)
            task = driver.make_task(k, version)
            if k in saved_state.inflight:
                tasks.append(task)
        return tasks
    finally:
        driver.state, driver.source = saved_state, saved_source
        driver._without_context = saved_context  # noqa: SLF001

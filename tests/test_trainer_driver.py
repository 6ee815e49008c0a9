"""The driver against real Redis: admission bounded by max_staleness, stale / future /
foreign groups dropped and replaced, the zero-variance policies, the durable inbox, and a
clear error (never a hang) when nothing comes back.

The PromptTasks the driver publishes are read back from the real prompts stream; the test
answers each with a hand-made ScoredGroup (chosen rewards and engine version) handed to the
inbox exactly as the bus handler would."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
from support.tokenizer import char_tokenizer

from protocol.bus import Bus
from protocol.config import BusSettings
from protocol.messages import (
    PromptTask,
    Response,
    SamplingParams,
    ScoredGroup,
    TeacherRequest,
    Verification,
    derive_id,
)
from trainer.config import DataConfig
from trainer.data import PromptSource
from trainer.driver import Driver, DriverError, DriverState
from trainer.inbox import Inbox

P, G = 3, 2


@pytest.fixture(scope="module")
def source():
    return PromptSource(DataConfig(source="countdown", num_prompts=40), char_tokenizer(),
                        max_prompt_tokens=200, seed=0)


@pytest.fixture
async def bus(redis_url, prefix):
    b = Bus.from_url(redis_url, BusSettings(prefix=prefix))
    yield b
    await b.close()


def make_driver(bus: Bus, source: PromptSource, *, S: int = 0, zero_variance: str = "drop",
                backfill_max: int = 2, state: DriverState | None = None,
                wait_timeout_s: float = 30.0, teacher: TeacherRequest | None = None,
                **kw: object) -> Driver:
    state = state or DriverState()
    inbox = Inbox(bus.r, f"{bus.cfg.prefix}:trainer:{state.nonce}")
    return Driver(bus=bus, prompts_stream=bus.cfg.stream("prompts"), inbox=inbox, source=source,
                  run_id="t", prompts_per_step=P, group_size=G, max_staleness=S,
                  zero_variance=zero_variance, backfill_max=backfill_max,
                  sampling=SamplingParams(max_new_tokens=4, seed=10),
                  teacher=teacher or TeacherRequest(scope="correct_mixed"),
                  wait_timeout_s=wait_timeout_s, publish_timeout_s=5, state=state, **kw)


async def published(bus: Bus, n: int) -> list[PromptTask]:
    """Take the next `n` PromptTasks off the prompts stream (as a rollout worker would)."""
    got: list[PromptTask] = []

    async def h(t: PromptTask) -> None:
        got.append(t)

    await asyncio.wait_for(bus.consume(bus.cfg.stream("prompts"), "rollout", "w", h, PromptTask,
                                       asyncio.Event(), max_messages=n), timeout=10)
    return got


def answer(task: PromptTask, rewards: list[float], engine_version: int) -> ScoredGroup:
    resp = [Response(token_ids=np.array([5, 6], np.int32),
                     logprobs=np.array([-1.0, -1.0], np.float32), finish_reason="stop")
            for _ in rewards]
    return ScoredGroup(run_id=task.run_id, msg_id=derive_id(task.msg_id, "scored"), task=task,
                       responses=resp, engine_version=engine_version,
                       verifications=[Verification(reward=r, correct=r == 1) for r in rewards],
                       teacher=[None] * len(rewards), teacher_version=engine_version)


async def test_admission_is_bounded_by_staleness_and_tasks_are_complete(bus, source):
    d = make_driver(bus, source, S=0)
    assert await d.top_up(0) == P
    assert await d.top_up(0) == 0  # nothing more until the version moves
    assert await bus.backlog(bus.cfg.stream("prompts")) == P
    tasks = await published(bus, P)
    assert [t.meta["task_index"] for t in tasks] == [0, 1, 2]
    t = tasks[1]
    assert t.group_size == G and t.policy_version == 0 and t.task == "countdown"
    assert t.sampling.seed == 11  # seed + task index: reproducible yet distinct
    assert t.teacher.scope == "correct_mixed"
    assert t.answer.startswith("numbers=") and t.solution and len(t.prompt_ids) > 0
    assert t.msg_id == derive_id(f"t/{d.state.nonce}", "task/1")
    assert await d.top_up(1) == P  # version 1 admits the next step's prompts

    d2 = make_driver(bus, source, S=2)
    assert await d2.top_up(0) == 3 * P  # versions 0, 1, 2 may all be trained fresh


async def test_stale_groups_are_replaced_and_newer_ones_held_back(bus, source):
    d = make_driver(bus, source, S=1)
    await d.top_up(0)  # versions 0 and 1 may train fresh: 2P tasks
    tasks = await published(bus, 2 * P)
    # collected at version 2: staleness 0, 2 (stale), -1 (newer weights), 1 (ok, S=1), 0, 0
    for t, v in zip(tasks, [2, 0, 3, 1, 2, 2], strict=True):
        await d.inbox.receive(answer(t, [1.0, 0.0], v))
    coll = await d.collect(2)
    assert [g.task.meta["task_index"] for g in coll.groups] == [0, 3, 4]
    assert dict(coll.counts) == {"stale": 1, "deferred": 1}
    assert d.state.replacements == 2 and d.state.deferred == [2]
    # version 2 admits up to step 3 (2P more) plus one replacement per unusable group
    assert d.state.admitted == 4 * P + 2
    assert await bus.backlog(bus.cfg.stream("prompts")) == 2 * P + 2
    assert derive_id(tasks[2].msg_id, "scored") not in coll.consumed  # stays in the inbox

    (t6,) = await published(bus, 1)
    await d.inbox.receive(answer(t6, [1.0, 0.0], 3))
    coll = await d.collect(3)  # the held group's version has come: it is trained now
    assert [g.task.meta["task_index"] for g in coll.groups] == [2, 5, 6]
    assert d.state.deferred == [] and d.state.replacements == 1


async def test_a_service_stuck_at_another_version_stops_the_run(bus, source):
    d = make_driver(bus, source, S=0)
    d.max_dropped = 2
    await d.top_up(0)
    for t in await published(bus, P):
        await d.inbox.receive(answer(t, [1.0, 0.0], 7))  # all from weights the trainer lacks

    async def feed() -> None:
        (t,) = await published(bus, 1)
        await d.inbox.receive(answer(t, [1.0, 0.0], 7))

    feeder = asyncio.create_task(feed())
    with pytest.raises(DriverError, match=r"do not serve the trainer's version 0"):
        await d.collect(0)
    await feeder


async def test_foreign_groups_are_ignored(bus, source):
    d = make_driver(bus, source, S=0)
    await d.top_up(0)
    tasks = await published(bus, P)
    foreign = tasks[0].model_copy(update={"meta": {**tasks[0].meta, "nonce": "old-run"},
                                          "msg_id": "old"})
    await d.inbox.receive(answer(foreign, [1.0, 0.0], 0))
    for t in tasks:
        await d.inbox.receive(answer(t, [1.0, 0.0], 0))
    coll = await d.collect(0)
    assert [g.task.meta["task_index"] for g in coll.groups] == [0, 1, 2]
    assert coll.counts == {"foreign": 1}
    assert len(coll.consumed) == P + 1 and not d.state.inflight


@pytest.mark.parametrize("mode,expect_used,expect_counts,expect_replacements", [
    ("keep", 3, {"zero_var_kept": 2}, 0),
    ("drop", 1, {"zero_var_dropped": 2}, 0),
    ("backfill", 3, {"backfilled": 2}, 2),
])
async def test_zero_variance_policies(bus, source, mode, expect_used, expect_counts,
                                      expect_replacements):
    d = make_driver(bus, source, zero_variance=mode, backfill_max=2)
    await d.top_up(0)
    tasks = await published(bus, P)
    for t, rewards in zip(tasks, [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]], strict=True):
        await d.inbox.receive(answer(t, rewards, 0))

    async def feed_replacements() -> None:  # published by collect() itself, as it drops
        for t in await published(bus, expect_replacements):
            await d.inbox.receive(answer(t, [1.0, 0.0], 0))

    feeder = asyncio.create_task(feed_replacements())
    coll = await d.collect(0)
    await feeder
    assert len(coll.groups) == expect_used
    assert dict(coll.counts) == expect_counts
    assert d.state.replacements == expect_replacements


async def test_backfill_cap_then_drop_and_never_an_empty_step(bus, source):
    d = make_driver(bus, source, zero_variance="backfill", backfill_max=1)
    await d.top_up(0)
    for t in await published(bus, P):
        await d.inbox.receive(answer(t, [0.0, 0.0], 0))  # all three without signal
    # one backfill (cap 1), then drops; the last slot waits for a group with signal
    answered = 0

    async def feed() -> None:
        nonlocal answered
        for _ in range(2):  # each replacement is published only once the last is answered
            (t,) = await published(bus, 1)
            answered += 1
            rewards = [0.0, 0.0] if t.meta["task_index"] == 3 else [1.0, 0.0]
            await d.inbox.receive(answer(t, rewards, 0))

    feeder = asyncio.create_task(feed())
    coll = await d.collect(0)
    await feeder
    assert [g.task.meta["task_index"] for g in coll.groups] == [4]
    assert dict(coll.counts) == {"backfilled": 1, "zero_var_dropped": 3}
    assert answered == 2


async def test_inbox_is_durable_ordered_and_idempotent(bus, source):
    d = make_driver(bus, source)
    await d.top_up(0)
    tasks = await published(bus, P)
    groups = [answer(t, [1.0, 0.0], 0) for t in tasks]
    for g in reversed(groups):
        await d.inbox.receive(g)
    await d.inbox.receive(groups[0])  # redelivered after a crash: not queued twice
    assert d.inbox.pending() == P
    # a new process restores the same groups in arrival order
    again = Inbox(bus.r, d.inbox.hkey.removesuffix(":groups"))
    assert await again.restore() == P
    assert [again.queue.get_nowait().msg_id for _ in range(P)] == [g.msg_id for g in reversed(groups)]
    await d.inbox.commit([groups[0].msg_id])
    third = Inbox(bus.r, d.inbox.hkey.removesuffix(":groups"))
    assert await third.restore() == P - 1
    await third.receive(groups[0])  # a committed group never comes back
    assert third.pending() == P - 1


async def test_resumed_driver_republishes_nothing(bus, source):
    d = make_driver(bus, source)
    saved = DriverState.from_dict(d.state.to_dict())
    await d.top_up(0)
    await d.top_up(1)
    assert await bus.backlog(bus.cfg.stream("prompts")) == 2 * P
    again = make_driver(bus, source, state=saved)  # restarted from the checkpointed state
    await again.top_up(0)
    await again.top_up(1)
    assert again.state.admitted == 2 * P
    assert again.state.data_cursor == d.state.data_cursor
    assert await bus.backlog(bus.cfg.stream("prompts")) == 2 * P  # duplicates dropped


async def test_waiting_fails_with_a_clear_error_and_stop_interrupts(bus, source):
    d = make_driver(bus, source, wait_timeout_s=0.3)
    with pytest.raises(DriverError, match=r"ScoredGroup for step 0 .*3 tasks in flight"):
        await d.collect(0)
    stop = asyncio.Event()
    stop.set()
    assert await make_driver(bus, source).collect(0, stop) is None


async def test_a_held_group_is_not_replaced_twice_after_a_restart(bus, source):
    d = make_driver(bus, source, S=0)
    await d.top_up(0)
    tasks = await published(bus, P)
    for t, v in zip(tasks, [0, 1, 0], strict=True):
        await d.inbox.receive(answer(t, [1.0, 0.0], v))

    async def feed() -> None:
        (t,) = await published(bus, 1)
        await d.inbox.receive(answer(t, [1.0, 0.0], 0))

    feeder = asyncio.create_task(feed())
    coll = await d.collect(0)
    await feeder
    assert d.state.deferred == [1] and d.state.replacements == 1
    saved = DriverState.from_dict(d.state.to_dict())  # the checkpoint ...
    await d.inbox.commit(coll.consumed)  # ... and the inbox commit that follows it
    # a restart from that state finds the held group again in the inbox
    again = make_driver(bus, source, S=0, state=saved)
    assert await again.inbox.restore() == 1

    async def feed_two() -> None:
        for t in await published(bus, P - 1):
            await again.inbox.receive(answer(t, [1.0, 0.0], 1))

    feeder = asyncio.create_task(feed_two())
    coll = await again.collect(1)
    await feeder
    assert [g.task.meta["task_index"] for g in coll.groups] == [1, 4, 5]
    assert again.state.deferred == [] and again.state.replacements == 0


def scored(g: ScoredGroup, teacher_version: int) -> ScoredGroup:
    """`g` with a teacher score on its first response, by `teacher_version`."""
    from protocol.messages import TeacherScores

    t = TeacherScores(logprobs=np.array([-1.0, -1.0], np.float32), context_mode="sibling")
    return g.model_copy(update={"teacher": [t] + [None] * (len(g.responses) - 1),
                                "teacher_version": teacher_version})


async def test_match_s_sends_groups_of_an_older_teacher_back_for_rescoring(bus, source):
    """teacher_version=match_s: a group scored by teacher v < t is not trained; its
    VerifiedGroup goes back to the teacher's stream and the rescored group (teacher t) takes
    the slot. Groups without teacher scores are trained whatever the teacher's version."""
    from protocol.messages import VerifiedGroup

    verified = bus.cfg.stream("verified")
    d = make_driver(bus, source, S=1, teacher_version="match_s", rescore_stream=verified)
    await d.top_up(0)
    tasks = await published(bus, P)
    await d.inbox.receive(scored(answer(tasks[0], [1.0, 0.0], 0), 0))  # teacher lags: rescore
    await d.inbox.receive(scored(answer(tasks[1], [1.0, 0.0], 0), 1))  # teacher at s: train
    await d.inbox.receive(answer(tasks[2], [0.0, 1.0], 0).model_copy(
        update={"teacher_version": None}))  # nothing scored: train

    back: list[VerifiedGroup] = []

    async def teacher() -> None:  # the teacher service, now at version 1
        async def h(g: VerifiedGroup) -> None:
            back.append(g)

        await bus.consume(verified, "teacher", "w", h, VerifiedGroup, asyncio.Event(),
                          max_messages=1)
        g = back[0]
        await d.inbox.receive(scored(ScoredGroup(**dict(g), teacher=[None] * 2), 1).model_copy(
            update={"msg_id": derive_id(g.msg_id, "scored")}))

    feeder = asyncio.create_task(asyncio.wait_for(teacher(), 10))
    coll = await d.collect(1)
    await feeder
    assert dict(coll.counts) == {"teacher_rescored": 1}
    assert [g.task.meta["task_index"] for g in coll.groups] == [0, 1, 2]
    assert [g.teacher_version for g in coll.groups] == [1, 1, None]
    assert back[0].task.meta["task_index"] == 0 and len(back[0].responses) == 2
    assert not d.state.inflight.keys() & {0, 1, 2}


async def test_any_teacher_version_trains_on_a_lagging_teacher(bus, source):
    """teacher_version=any: trained as is (the lag is reported by the stats)."""
    d2 = make_driver(bus, source, S=1)
    await d2.top_up(0)
    for t in await published(bus, P):
        await d2.inbox.receive(scored(answer(t, [1.0, 0.0], 0), 0))
    coll = await d2.collect(1)
    assert not coll.counts and [g.teacher_version for g in coll.groups] == [0, 0, 0]


async def test_zero_variance_follows_the_estimator(bus, source):
    """opsd ignores rewards: an all-equal group still carries signal (q - s) and is trained."""
    d = make_driver(bus, source, zero_variance="drop", teacher=TeacherRequest(
        scope="all", context_mode="reference_solution", estimator="self_distill"))
    await d.top_up(0)
    for t in await published(bus, P):
        await d.inbox.receive(answer(t, [0.0, 0.0], 0))
    coll = await d.collect(0)
    assert len(coll.groups) == P and not coll.counts


async def test_data_without_the_teachers_context_stops_at_admission(bus, source):
    """opsd on answer-only data: a clear error after N prompts, before sampling anything."""
    no_solution = PromptSource(DataConfig(source="countdown", num_prompts=40), char_tokenizer(),
                               max_prompt_tokens=200, seed=0)
    orig = no_solution.draw

    def draw(cursor: int):  # noqa: ANN202 - the rows of an answer-only dataset
        drawn = orig(cursor)
        return dataclasses.replace(drawn, row=dataclasses.replace(drawn.row, solution=None))

    no_solution.draw = draw  # type: ignore[method-assign]
    d = make_driver(bus, no_solution, max_without_context=2, teacher=TeacherRequest(
        scope="all", context_mode="reference_solution", estimator="self_distill"))
    with pytest.raises(DriverError, match="no reference solution.*reference_solution"):
        await d.top_up(0)
    # with the field present (countdown has solutions) admission goes on
    ok = make_driver(bus, source, max_without_context=2, teacher=TeacherRequest(
        scope="all", context_mode="reference_solution", estimator="self_distill"))
    assert await ok.top_up(0) == P


async def test_admission_waits_for_before_admit_only_when_the_step_must_wait(bus, source):
    """With groups at hand a step takes them without publishing (the trainer admits after the
    push has loaded, while it updates); a step that must wait for groups first awaits
    `before_admit` (the push loading), then publishes."""
    d = make_driver(bus, source, S=1)
    calls: list[int] = []

    async def before_admit() -> None:
        calls.append(await bus.backlog(bus.cfg.stream("prompts")))

    # Step 0: nothing at hand, so before_admit runs before anything is published.
    task = asyncio.ensure_future(d.collect(0, before_admit=before_admit))
    tasks = await published(bus, 2 * P)
    assert calls == [0]
    for t in tasks[:P]:
        await d.inbox.receive(answer(t, [1.0, 0.0], 0))
    coll = await asyncio.wait_for(task, 10)
    assert coll.admitted and [g.task.meta["task_index"] for g in coll.groups] == [0, 1, 2]

    # Step 1: its groups are here: taken without publishing and without before_admit.
    assert not d.drained()  # step 1's tasks are still upstream
    for t in tasks[P:]:
        await d.inbox.receive(answer(t, [1.0, 0.0], 0))
    assert d.drained()  # all arrived: the services have nothing left to do
    coll = await d.collect(1, before_admit=before_admit)
    assert not coll.admitted and calls == [0]
    assert [g.task.meta["task_index"] for g in coll.groups] == [3, 4, 5]
    assert await bus.backlog(bus.cfg.stream("prompts")) == 0 and d.state.admitted == 2 * P
    assert d.drained()  # nothing in flight: every upstream service is idle
    assert await d.top_up(1) == P  # what the trainer does once the push has loaded
    assert not d.drained()

    # Step 2 with only part of its groups here: it admits first (after before_admit), so the
    # rollout keeps sampling while the step waits.
    tasks = await published(bus, P)
    await d.inbox.receive(answer(tasks[0], [1.0, 0.0], 1))
    task = asyncio.ensure_future(d.collect(2, before_admit=before_admit))
    nxt = await published(bus, P)  # step 3's prompts go out before step 2 has all its groups
    assert calls == [0, 0] and [t.meta["task_index"] for t in nxt] == [9, 10, 11]
    for t in tasks[1:]:
        await d.inbox.receive(answer(t, [1.0, 0.0], 1))
    coll = await asyncio.wait_for(task, 10)
    assert coll.admitted and [g.task.meta["task_index"] for g in coll.groups] == [6, 7, 8]


async def test_a_resumed_step_admits_before_it_takes_a_previous_processs_groups(bus, source):
    """A previous process admitted tasks past the checkpoint and left their groups (sampled by
    newer weights) in the inbox. The resumed step must re-admit each such task before its group
    comes up, even when the trainer could defer admission (before_admit): taken first, the group
    would be dropped as foreign and its re-admission dropped by the bus as a duplicate -- a task
    in flight forever (the compose test hung on it)."""
    d = make_driver(bus, source, S=1)
    await d.top_up(0)  # tasks 0-5
    saved = DriverState.from_dict(d.state.to_dict())  # the checkpoint: 6 admitted
    await d.top_up(1)  # tasks 6-8, admitted after the checkpoint
    tasks = await published(bus, 3 * P)
    # the killed process's inbox: 3-8 sampled by v1 (newer than the resumed v0), then 0-2
    for t in tasks[P:] + tasks[:P]:
        await d.inbox.receive(answer(t, [1.0, 0.0], 1 if t.meta["task_index"] >= P else 0))

    again = make_driver(bus, source, S=1, state=saved)
    assert await again.inbox.restore() == 3 * P and again.inbox.restored == 3 * P
    calls: list[int] = []

    async def before_admit() -> None:
        calls.append(1)

    coll = await asyncio.wait_for(again.collect(0, before_admit=before_admit), 10)
    assert coll.admitted and calls == [1]
    assert [g.task.meta["task_index"] for g in coll.groups] == [0, 1, 2]
    assert coll.counts["deferred"] == 2 * P and coll.counts["foreign"] == 0
    assert sorted(g.task.meta["task_index"] for g in again.deferred) == list(range(P, 3 * P))
    assert again.inbox.restored == 0

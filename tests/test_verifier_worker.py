"""Bus worker: RolloutGroups in, VerifiedGroups out, on a real Redis; poison messages go to
dead-letter and the worker keeps serving."""

from __future__ import annotations

import asyncio

import numpy as np

from protocol.bus import Bus
from protocol.config import BusSettings
from protocol.messages import PromptTask, Response, RolloutGroup, VerifiedGroup, derive_id
from services.verifier import worker
from services.verifier.pool import VerifyPool

# `pool`: conftest.py's (2 workers)


def group(i: int, texts: list[str], answer: str, task: str = "math") -> RolloutGroup:
    responses = [Response(token_ids=np.arange(3, dtype=np.int32) + k, logprobs=np.full(3, -0.5, np.float32),
                          finish_reason="stop", text=t) for k, t in enumerate(texts)]
    prompt = PromptTask(run_id="r", prompt_id=f"p{i}", prompt_text="q", prompt_ids=[1, 2, 3], answer=answer,
                        task=task, group_size=len(texts))
    return RolloutGroup(run_id="r", task=prompt, responses=responses, engine_version=3, parent_id=prompt.msg_id)


def make_bus(url: str, prefix: str) -> Bus:
    return Bus.from_url(url, BusSettings(prefix=prefix, block_ms=50, retry_backoff_s=0.01, max_deliveries=2))


async def run_worker(bus: Bus, pool: VerifyPool, prefix: str, stop: asyncio.Event) -> asyncio.Task:
    return asyncio.create_task(worker.consume(
        bus, pool, stop, in_stream=f"{prefix}:rollouts", out_stream=f"{prefix}:verified", group="verifier",
        consumer="w1", timeout_s=2.0, concurrency=4))


async def collect(bus: Bus, prefix: str, n: int) -> list[VerifiedGroup]:
    got: list[VerifiedGroup] = []

    async def keep(m: VerifiedGroup) -> None:
        got.append(m)

    await asyncio.wait_for(bus.consume(f"{prefix}:verified", "trainer", "t", keep, VerifiedGroup, asyncio.Event(),
                                       max_messages=n), timeout=60)
    return got


async def test_groups_are_verified_and_passed_on(redis_url: str, prefix: str, pool: VerifyPool) -> None:
    bus, stop = make_bus(redis_url, prefix), asyncio.Event()
    task = await run_worker(bus, pool, prefix, stop)
    sent = []
    for i in range(6):
        g = group(i, [rf"\boxed{{{i}}}", rf"\boxed{{{i + 1}}}", "no answer", rf"so \boxed{{\frac{{{2 * i}}}{{2}}}}"], str(i))
        sent.append(g)
        await bus.publish(f"{prefix}:rollouts", g)
    got = {m.msg_id: m for m in await collect(bus, prefix, 6)}
    stop.set()
    await task
    for g in sent:
        out = got[derive_id(g.msg_id, "verified")]
        assert out.rewards == [1.0, 0.0, 0.0, 1.0]
        assert [v.status for v in out.verifications] == ["ok", "ok", "parse_error", "ok"]
        assert out.task.prompt_id == g.task.prompt_id and out.engine_version == 3
        assert np.array_equal(out.responses[1].token_ids, g.responses[1].token_ids)
        assert np.array_equal(out.responses[0].logprobs, g.responses[0].logprobs)
    await bus.close()


async def test_poison_messages_are_dead_lettered_and_the_worker_keeps_going(
        redis_url: str, prefix: str, pool: VerifyPool) -> None:
    bus, stop = make_bus(redis_url, prefix), asyncio.Event()
    task = await run_worker(bus, pool, prefix, stop)
    stream = f"{prefix}:rollouts"
    await bus.r.xadd(stream, {"id": "junk", "t": "RolloutGroup", "d": b"\xc1 not msgpack"})
    await bus.r.xadd(stream, {"id": "junk2", "t": "RolloutGroup", "d": b"\x81\xa1a\x01"})  # {"a": 1}
    await bus.publish(stream, group(0, [r"\boxed{1}"], "1", task="chess"))  # no such checker
    good = group(1, [r"\boxed{5}", r"\boxed{6}"], "5")
    await bus.publish(stream, good)
    (out,) = await collect(bus, prefix, 1)
    assert out.msg_id == derive_id(good.msg_id, "verified") and out.rewards == [1.0, 0.0]
    for _ in range(600):  # dead-lettering of the retried one may trail the good group
        dead = await bus.dead_letters(stream)
        if len(dead) == 3:
            break
        await asyncio.sleep(0.05)
    assert len(dead) == 3
    assert any("unknown task 'chess'" in d["error"] for d in dead)
    stop.set()
    await task
    await bus.close()


async def test_timeouts_in_a_group_score_zero_without_stalling_it(
        redis_url: str, prefix: str, pool: VerifyPool) -> None:
    bus, stop = make_bus(redis_url, prefix), asyncio.Event()
    task = await run_worker(bus, pool, prefix, stop)
    await bus.publish(f"{prefix}:rollouts", group(0, [r"\boxed{10^{10^{10^{10}}}}", r"\boxed{2}"], "2"))
    (out,) = await collect(bus, prefix, 1)
    assert [v.status for v in out.verifications] == ["timeout", "ok"] and out.rewards == [0.0, 1.0]
    stop.set()
    await task
    await bus.close()

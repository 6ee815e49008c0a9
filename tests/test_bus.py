"""The Redis Streams bus against a real redis-server: delivery, crashes, poison, bounds."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol.bus import BackpressureTimeout, Bus
from protocol.config import BusSettings
from protocol.messages import WeightUpdate, derive_id
from rlrt.redis_server import EmbeddedRedis

REPO = Path(__file__).resolve().parents[1]


def _msg(i: int, **kw) -> WeightUpdate:
    return WeightUpdate(run_id="r", version=i, location=f"/w/{i}", **kw)


def _bus(url: str, prefix: str, **kw) -> Bus:
    return Bus.from_url(url, BusSettings(prefix=prefix, **kw))


async def _drain(bus: Bus, stream: str, n: int, handler=None, **kw) -> list:
    seen: list = []

    async def h(m):
        if handler:
            await handler(m)
        seen.append(m)

    await asyncio.wait_for(
        bus.consume(stream, "g", "c1", h, WeightUpdate, asyncio.Event(), max_messages=n, **kw), 30)
    return seen


async def test_publish_consume_ack_in_order(redis_url: str, prefix: str) -> None:
    bus = _bus(redis_url, prefix)
    s = f"{prefix}:in"
    for i in range(20):
        assert await bus.publish(s, _msg(i))
    seen = await _drain(bus, s, 20)
    assert [m.version for m in seen] == list(range(20))
    assert await bus.backlog(s) == 0 and await bus.pending(s, "g") == 0
    await bus.close()


async def test_publish_is_idempotent_by_msg_id(redis_url: str, prefix: str) -> None:
    bus = _bus(redis_url, prefix)
    s = f"{prefix}:in"
    m = _msg(1)
    assert await bus.publish(s, m) is not None
    assert await bus.publish(s, m) is None  # a redelivered handler re-publishing
    assert await bus.backlog(s) == 1
    await bus.close()


async def test_claim_check_for_big_payloads(redis_url: str, prefix: str) -> None:
    bus = _bus(redis_url, prefix, blob_threshold_bytes=1024)
    s = f"{prefix}:in"
    big = _msg(1, meta={"blob": "x" * 50_000})
    await bus.publish(s, big)
    fields = (await bus.r.xrange(s))[0][1]
    assert b"ref" in fields and b"d" not in fields
    seen = await _drain(bus, s, 1)
    assert seen[0].meta["blob"] == "x" * 50_000
    assert not await bus.r.exists(fields[b"ref"])  # blob freed after ack
    await bus.close()


async def test_always_failing_handler_dead_letters_and_keeps_serving(redis_url: str, prefix: str) -> None:
    bus = _bus(redis_url, prefix, max_deliveries=3, retry_backoff_s=0.01)
    s = f"{prefix}:in"
    await bus.publish(s, _msg(0, meta={"poison": True}))
    await bus.publish(s, _msg(1))
    calls: list[int] = []
    ok: list[int] = []

    async def handler(m: WeightUpdate) -> None:
        calls.append(m.version)
        if m.meta.get("poison"):
            raise RuntimeError("cannot handle this one")
        ok.append(m.version)

    await asyncio.wait_for(bus.consume(s, "g", "c1", handler, WeightUpdate, asyncio.Event(),
                                       max_messages=2), 30)
    assert calls.count(0) == 3 and ok == [1]
    dead = await bus.dead_letters(s)
    assert len(dead) == 1
    assert "RuntimeError: cannot handle this one" in dead[0]["error"] and dead[0]["attempts"] == "3"
    assert await bus.pending(s, "g") == 0 and await bus.backlog(s) == 0
    await bus.close()


async def test_undecodable_entry_is_dead_lettered(redis_url: str, prefix: str) -> None:
    bus = _bus(redis_url, prefix)
    s = f"{prefix}:in"
    await bus.r.xadd(s, {"id": "junk", "t": "WeightUpdate", "d": b"\xc1\xff not msgpack"})
    await bus.publish(s, _msg(7))
    seen = await _drain(bus, s, 2)
    assert [m.version for m in seen] == [7]
    dead = await bus.dead_letters(s)
    assert len(dead) == 1 and "undecodable WeightUpdate" in dead[0]["error"]
    await bus.close()


async def test_backpressure_waits_then_fails_clearly(redis_url: str, prefix: str) -> None:
    bus = _bus(redis_url, prefix, max_backlog=3)
    s = f"{prefix}:in"
    for i in range(3):
        await bus.publish(s, _msg(i))
    t0 = time.monotonic()
    with pytest.raises(BackpressureTimeout, match="bound of 3"):
        await bus.publish(s, _msg(3), timeout_s=0.3)
    assert time.monotonic() - t0 >= 0.3
    assert await bus.backlog(s) == 3  # nothing was added past the bound
    await bus.close()


async def test_backpressure_resumes_when_consumers_catch_up(redis_url: str, prefix: str) -> None:
    bus = _bus(redis_url, prefix, max_backlog=2)
    s = f"{prefix}:in"
    for i in range(2):
        await bus.publish(s, _msg(i))
    blocked = asyncio.create_task(bus.publish(s, _msg(2), timeout_s=30))
    await asyncio.sleep(0)
    assert not blocked.done()
    seen = await _drain(bus, s, 3)  # consuming frees room; the waiting publish lands
    assert await blocked is not None
    assert sorted(m.version for m in seen) == [0, 1, 2]
    await bus.close()


@pytest.mark.parametrize("when", ["before_publish", "after_publish"])
async def test_sigkilled_consumer_loses_nothing_and_duplicates_nothing(
        redis_url: str, prefix: str, tmp_path: Path, when: str) -> None:
    bus = _bus(redis_url, prefix, claim_idle_ms=300)
    src, out = f"{prefix}:in", f"{prefix}:out"
    msg = _msg(42)
    await bus.publish(src, msg)
    marker = tmp_path / "in_handler"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    child = subprocess.Popen([sys.executable, "-m", "support.bus_consumer", redis_url, prefix,
                              str(marker), when], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():  # wait until the child is inside its handler
            assert child.poll() is None, "consumer child died early"
            assert time.monotonic() < deadline, "consumer child never got the message"
            await asyncio.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    assert await bus.pending(src, "g") == 1  # the entry is still owned by the dead consumer

    async def handler(m: WeightUpdate) -> None:
        await bus.publish(out, m.model_copy(update={"msg_id": derive_id(m.msg_id, "out")}))

    n = await asyncio.wait_for(bus.consume(src, "g", "survivor", handler, WeightUpdate,
                                           asyncio.Event(), max_messages=1), 30)
    assert n == 1
    outs = await bus.r.xrange(out)
    assert len(outs) == 1  # exactly once downstream
    assert outs[0][1][b"id"].decode() == derive_id(msg.msg_id, "out")
    assert await bus.pending(src, "g") == 0 and await bus.backlog(src) == 0
    await bus.close()


@pytest.mark.parametrize("how", ["sigterm", "sigkill_fsync_always"])
async def test_redis_restart_between_publish_and_consume_loses_nothing(tmp_path: Path, how: str) -> None:
    server = EmbeddedRedis(tmp_path / "r", appendfsync="always" if how != "sigterm" else "everysec")
    url = server.start()
    try:
        bus = _bus(url, "rs")
        for i in range(50):
            await bus.publish("rs:in", _msg(i))
        await bus.close()
        server.stop(kill=(how != "sigterm"))
        server.start()
        bus = _bus(url, "rs")
        seen = await _drain(bus, "rs:in", 50)
        assert sorted(m.version for m in seen) == list(range(50))
        await bus.close()
    finally:
        server.stop()


async def test_stop_finishes_in_flight_and_takes_no_more(redis_url: str, prefix: str) -> None:
    bus = _bus(redis_url, prefix, block_ms=50)
    s = f"{prefix}:in"
    for i in range(5):
        await bus.publish(s, _msg(i))
    stop = asyncio.Event()
    handled: list[int] = []

    async def handler(m: WeightUpdate) -> None:
        stop.set()  # stop requested while this one is in flight
        await asyncio.sleep(0.05)
        handled.append(m.version)

    n = await asyncio.wait_for(bus.consume(s, "g", "c1", handler, WeightUpdate, stop), 30)
    assert n == 1 and handled == [0]
    assert await bus.backlog(s) == 4 and await bus.pending(s, "g") == 0
    await bus.close()


async def test_permanent_error_dead_letters_at_once(redis_url: str, prefix: str) -> None:
    from protocol.bus import PermanentError

    bus = _bus(redis_url, prefix, max_deliveries=5, retry_backoff_s=0.01)
    s = f"{prefix}:in"
    await bus.publish(s, _msg(0))
    calls: list[int] = []

    async def handler(m: WeightUpdate) -> None:
        calls.append(m.version)
        raise PermanentError("prompt longer than the context window")

    await asyncio.wait_for(bus.consume(s, "g", "c1", handler, WeightUpdate, asyncio.Event(),
                                       max_messages=1), 30)
    assert calls == [0]  # no retries
    dead = await bus.dead_letters(s)
    assert len(dead) == 1 and dead[0]["attempts"] == "1" and "context window" in dead[0]["error"]
    await bus.close()

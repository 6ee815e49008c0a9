"""Chaos: SIGKILL one part of the system at a random (seeded) point and check that the work
still gets done exactly once, nothing is left running, and where a human must act the message
says what to do (issue 16).

Default suite (seconds): Redis killed under a live two-stage bus pipeline; the verifier under
slow and disconnecting clients. `-m slow`: every part of a real `rlrt train` run of the tiny
config (rollout, teacher, verifier, trainer, Redis, the launcher itself) killed in turn.
Figures: docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import pytest

from protocol.bus import Bus
from protocol.config import BusSettings
from protocol.messages import WeightUpdate, derive_id
from protocol.redis_server import EmbeddedRedis

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("RLRT_CHAOS_SEED", "16"))


def _msg(i: int, msg_id: str | None = None) -> WeightUpdate:
    kw = {"msg_id": msg_id} if msg_id else {}
    return WeightUpdate(run_id="chaos", version=i, location=f"/w/{i}", **kw)


# ----------------------------------------------------------------------------- Redis (short)
@pytest.mark.parametrize("seed", [SEED, SEED + 1])
async def test_redis_sigkilled_under_a_live_pipeline_loses_and_repeats_nothing(
        tmp_path: Path, seed: int) -> None:
    """producer -> in -> stage (re-publishes) -> out -> sink, with redis-server SIGKILLed at a
    random message and restarted after a random pause longer than the consumers' reconnect
    budget (so their own outage handling, not just the client's retry, is what carries them)."""
    rng = random.Random(seed)
    n, kill_at, pause_s = 120, rng.randrange(10, 100), rng.uniform(0.6, 1.5)
    server = EmbeddedRedis(tmp_path / "r")
    url = server.start()
    quick = BusSettings(prefix="c", reconnect_timeout_s=0.2, block_ms=100, claim_idle_ms=2000)
    patient = BusSettings(prefix="c", reconnect_timeout_s=15)
    stage_bus, sink_bus, pub_bus = (Bus.from_url(url, quick), Bus.from_url(url, quick),
                                    Bus.from_url(url, patient))
    stop = asyncio.Event()
    outs: list[int] = []

    async def stage(m: WeightUpdate) -> None:
        await stage_bus.publish("c:out", _msg(m.version, derive_id(m.msg_id, "out")))

    async def sink(m: WeightUpdate) -> None:
        outs.append(m.version)

    consumers = [
        asyncio.create_task(stage_bus.consume("c:in", "g", "stage", stage, WeightUpdate, stop,
                                              concurrency=4)),
        asyncio.create_task(sink_bus.consume("c:out", "g", "sink", sink, WeightUpdate, stop)),
    ]
    try:
        for i in range(n):
            if i == kill_at:
                server.proc.send_signal(signal.SIGKILL)
                server.proc.wait(10)
                await asyncio.sleep(pause_s)
                await asyncio.to_thread(server.restart)
            await pub_bus.publish("c:in", _msg(i))
            await asyncio.sleep(0.002)
        deadline = time.monotonic() + 60
        while len(set(outs)) < n and time.monotonic() < deadline:
            assert not any(t.done() for t in consumers), [t.exception() for t in consumers if t.done()]
            await asyncio.sleep(0.05)
        assert await pub_bus.reachable()
        # Every message once downstream (a handler rerun after the outage publishes nothing new).
        assert sorted(outs) == list(range(n)), f"kill at {kill_at}, pause {pause_s:.2f}s"
        assert await pub_bus.backlog("c:out") == 0 and await pub_bus.pending("c:in", "g") == 0
    finally:
        stop.set()
        await asyncio.gather(*consumers, return_exceptions=True)
        for b in (stage_bus, sink_bus, pub_bus):
            await b.close()
        server.stop()


async def test_readiness_probe_reports_an_outage_at_once(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r")
    url = server.start()
    bus = Bus.from_url(url, BusSettings(prefix="p", reconnect_timeout_s=30))
    try:
        assert await bus.reachable()
        server.proc.kill()
        server.proc.wait(10)
        t0 = time.monotonic()
        assert not await bus.reachable(timeout_s=0.5)
        assert time.monotonic() - t0 < 2  # not the 30 s reconnect budget
        server.restart()
        assert await bus.reachable(timeout_s=5)
    finally:
        await bus.close()
        server.stop()

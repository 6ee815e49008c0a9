"""Reliability figures for docs/reliability.md (issue 16), on this machine:

- the verifier under a hostile client: latency of a trivial request sent while a 38-item
  batch of checks that each run into their 5 s deadline occupies the pool; that batch's total
  time (bounded by `request_budget_s`); how long the pool keeps working for a client that
  disconnected (until its running items are killed), and until the replacement workers are up;
- Redis SIGKILLed and restarted under a live consumer: the time from the restart until the
  consumer handles messages again.

    python bench/reliability.py [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol.bus import Bus  # noqa: E402
from protocol.config import BusSettings  # noqa: E402
from protocol.messages import WeightUpdate  # noqa: E402
from rlrt.redis_server import EmbeddedRedis  # noqa: E402
from services.verifier.config import VerifierConfig  # noqa: E402
from services.verifier.pool import Item, VerifyPool  # noqa: E402

HOSTILE = Item("math", r"\boxed{10^{10^{10^{10}}}}", "1", 5.0)
TRIVIAL = Item("math", r"\boxed{4}", "4", 5.0)


async def idle(pool: VerifyPool) -> float:
    t0 = time.monotonic()
    while pool.stats().busy or pool.stats().queue_depth:
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def verifier(workers: int) -> dict:
    budget = VerifierConfig.model_fields["request_budget_s"].default
    out: dict = {"workers": workers, "request_budget_s": budget}
    with VerifyPool(workers, kill_grace_s=0.5) as pool:
        t0 = time.monotonic()
        hostile = asyncio.ensure_future(pool.run([HOSTILE] * 38, budget_s=budget))
        await asyncio.sleep(1.0)
        t1 = time.monotonic()
        await pool.run([TRIVIAL], budget_s=budget)
        out["trivial_behind_hostile_s"] = round(time.monotonic() - t1, 2)
        await hostile
        out["hostile_batch_total_s"] = round(time.monotonic() - t0, 2)
        # A client that goes away after 1 s: cancelling its call is what the API does on
        # disconnect. Time until no worker works for it any more.
        await idle(pool)
        gone = asyncio.ensure_future(pool.run([HOSTILE] * 20, budget_s=budget))
        await asyncio.sleep(1.0)
        busy, cancelled = pool.stats().busy, pool.stats().cancelled
        t0 = time.monotonic()
        gone.cancel()
        while pool.stats().cancelled < cancelled + busy:  # its running items killed
            await asyncio.sleep(0.01)
        out["work_after_disconnect_s"] = round(time.monotonic() - t0, 2)
        out["pool_idle_again_s"] = round(time.monotonic() - t0 + await idle(pool), 2)
    return out


async def redis_restart() -> dict:
    with tempfile.TemporaryDirectory() as d:
        server = EmbeddedRedis(d)
        url = server.start()
        cfg = BusSettings(prefix="b", reconnect_timeout_s=60, block_ms=100)
        pub, sub = Bus.from_url(url, cfg), Bus.from_url(url, cfg)
        seen: list[float] = []
        stop = asyncio.Event()

        async def handler(m: WeightUpdate) -> None:
            seen.append(time.monotonic())

        task = asyncio.ensure_future(sub.consume("b:in", "g", "c", handler, WeightUpdate, stop))
        await pub.publish("b:in", WeightUpdate(run_id="r", version=0, location="/w"))
        while not seen:
            await asyncio.sleep(0.01)
        server.proc.kill()
        server.proc.wait()
        await asyncio.sleep(2.0)  # an outage
        t_restart = time.monotonic()
        await asyncio.to_thread(server.restart)
        restart_s = time.monotonic() - t_restart
        await pub.publish("b:in", WeightUpdate(run_id="r", version=1, location="/w"))
        while len(seen) < 2:
            await asyncio.sleep(0.01)
        resumed_s = seen[1] - t_restart
        stop.set()
        await task
        await pub.close()
        await sub.close()
        server.stop()
    return {"redis_restart_s": round(restart_s, 2), "consumer_resumed_after_restart_s": round(resumed_s, 2)}


async def main(workers: int) -> None:
    res = {**await verifier(workers), **await redis_restart()}
    print(json.dumps(res))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, default=2)
    asyncio.run(main(ap.parse_args().workers))

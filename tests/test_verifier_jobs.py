"""Job runner on real Redis: resumption after a stop, and the paths a ticket takes
(cancelled while queued, expired, unreadable, interrupted too often). Resumption after a
SIGKILL of the whole service process is in test_verifier_service.py (slow)."""

from __future__ import annotations

import asyncio
import json

from support.polling import wait_until_async

from protocol.bus import Bus
from protocol.config import BusSettings
from services.verifier.jobs import JobStore, JobTicket
from services.verifier.pool import VerifyPool

SLOW = {"task": "math", "response": r"\boxed{10^{10^{10^{10}}}}", "reference": "1", "timeout_s": 0.5}


def fast(i: int) -> dict:
    return {"task": "math", "response": rf"\boxed{{{i}}}", "reference": str(i), "timeout_s": 5.0}


# `pool`: conftest.py's (2 workers)


def store(url: str, prefix: str, pool: VerifyPool, chunk: int = 2) -> JobStore:
    bus = Bus.from_url(url, BusSettings(prefix=prefix, block_ms=50, claim_idle_ms=60_000))
    return JobStore(bus, pool, stream=f"{prefix}:verifier:jobs", ttl_s=600, chunk=chunk, cancel_poll_s=0.05)


async def test_job_resumes_after_a_stop_mid_job(redis_url: str, prefix: str, pool: VerifyPool) -> None:
    """A stopping service interrupts its jobs between (or inside) chunks and leaves their
    tickets pending; the next process with the same consumer name resumes them at once."""
    items = [SLOW] * 6 + [fast(i) for i in range(10)]
    a = store(redis_url, prefix, pool)
    job_id = await a.create(items)
    stop = asyncio.Event()
    runner = asyncio.create_task(a.consume("verifier", "v1", stop))

    async def some_done():  # noqa: ANN202
        s = await a.get(job_id)
        return s if s.progress.done >= 2 else None

    await wait_until_async(some_done, 60, "two items done")
    stop.set()
    await runner
    mid = await a.get(job_id)
    assert mid.status == "running" and 2 <= mid.progress.done < len(items)
    assert await a.bus.pending(a.stream, "verifier") == 1  # the ticket waits for us
    saved = mid.progress.done

    before = pool.stats().completed
    b = store(redis_url, prefix, pool)  # "restarted" under the same consumer name
    stop = asyncio.Event()
    runner = asyncio.create_task(b.consume("verifier", "v1", stop))
    done = await wait_until_async(lambda: _final(b, job_id), 60, "the job to finish")
    stop.set()
    await runner
    assert done.status == "done" and done.progress.done == len(items)
    assert [r.status for r in done.results[:6]] == ["timeout"] * 6
    assert all(r.correct for r in done.results[6:])
    # Saved results are not recomputed; only the chunk cut short by the stop may be redone.
    redone = pool.stats().completed - before
    assert len(items) - saved <= redone <= len(items) - saved + 2
    assert int(await b.r.hget(b._key(job_id), "attempts")) == 2
    assert await b.bus.pending(b.stream, "verifier") == 0
    await a.bus.close()
    await b.bus.close()


async def _final(s: JobStore, job_id: str):  # noqa: ANN202
    st = await s.get(job_id)
    return st if st.status in ("done", "failed", "cancelled") else None


async def test_cancelled_while_queued_never_runs(redis_url: str, prefix: str, pool: VerifyPool) -> None:
    s = store(redis_url, prefix, pool)
    job_id = await s.create([fast(1)] * 4)
    assert (await s.cancel(job_id)).status == "cancelled"
    before = pool.stats().completed
    stop = asyncio.Event()
    n = await s.bus.consume(s.stream, "verifier", "v1", lambda t: s.run(t, stop), JobTicket, stop, max_messages=1)
    assert n == 1 and pool.stats().completed == before
    state = await s.get(job_id)
    assert state.status == "cancelled" and state.progress.done == 0
    assert await s.bus.pending(s.stream, "verifier") == 0
    await s.bus.close()


async def test_unreadable_or_expired_jobs_end_cleanly(redis_url: str, prefix: str, pool: VerifyPool) -> None:
    s = store(redis_url, prefix, pool)
    broken = await s.create([fast(1)])
    await s.r.hset(s._key(broken), "items", json.dumps([{"nonsense": 1}]))
    gone = await s.create([fast(2)])
    await s.r.delete(s._key(gone))
    stop = asyncio.Event()
    n = await s.bus.consume(s.stream, "verifier", "v1", lambda t: s.run(t, stop), JobTicket, stop, max_messages=2)
    assert n == 2
    state = await s.get(broken)
    assert state.status == "failed" and "unreadable" in state.error
    assert await s.get(gone) is None
    assert await s.bus.pending(s.stream, "verifier") == 0
    await s.bus.close()


async def test_a_job_interrupted_too_often_fails_instead_of_looping(
        redis_url: str, prefix: str, pool: VerifyPool) -> None:
    s = store(redis_url, prefix, pool)
    job_id = await s.create([fast(1)])
    await s.r.hset(s._key(job_id), "attempts", s.max_attempts)
    stop = asyncio.Event()
    await s.bus.consume(s.stream, "verifier", "v1", lambda t: s.run(t, stop), JobTicket, stop, max_messages=1)
    state = await s.get(job_id)
    assert state.status == "failed" and "interrupted" in state.error
    await s.bus.close()

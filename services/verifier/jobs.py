"""Asynchronous verification jobs, kept in Redis so they outlive the process.

Layout (all keys expire `ttl_s` after the last write):
  {prefix}:vjob:{id}       hash  status, total, created_at, updated_at, error, attempts, items (JSON)
  {prefix}:vjob:{id}:res   hash  item index -> result JSON (written chunk by chunk)
  {prefix}:verifier:jobs   stream of JobTickets, consumed through protocol.bus

Durability comes from the bus: a ticket is acked only when its job reached a final state. A
verifier that dies mid-job leaves the ticket pending; the restarted verifier (same consumer
name: at once; any other replica: after the bus's claim_idle_ms) runs it again, and the run
skips every item whose result is already saved. A graceful stop interrupts the job between
chunks and leaves the ticket pending in the same way.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Sequence

import redis.asyncio as aioredis
from pydantic import Field

from protocol.bus import Bus
from protocol.messages import Message
from services.verifier import metrics
from services.verifier.pool import Item, VerifyPool
from services.verifier.schemas import TERMINAL, JobState, Progress, VerifyResult

JOB_ID_PATTERN = r"^[0-9a-f]{32}$"

# Set status to ARGV[1] unless the job is gone or already final (cancel must not be
# overwritten by a runner finishing its chunk, nor "done" by a late cancel).
_TRANSITION = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return false end
if s == 'done' or s == 'failed' or s == 'cancelled' then return s end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
if ARGV[1] ~= 'running' and ARGV[1] ~= 'queued' then redis.call('HDEL', KEYS[1], 'items') end
return ARGV[1]
"""


class JobTicket(Message):
    """The bus entry that makes a job runnable; msg_id = job_id (publish-once)."""

    job_id: str = Field(description="key of the job's hash in Redis")


class JobInterrupted(Exception):
    """The service is stopping: leave the ticket pending so the job resumes after restart."""


def _s(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


class JobStore:
    def __init__(self, bus: Bus, pool: VerifyPool, *, stream: str, ttl_s: int, chunk: int,
                 max_attempts: int | None = None, cancel_poll_s: float = 0.5) -> None:
        self.bus = bus
        self.r: aioredis.Redis = bus.r
        self.pool = pool
        self.stream = stream
        self.ttl_s = ttl_s
        self.chunk = chunk
        # One fewer than the bus allows, so we mark the job failed before the bus dead-letters
        # the ticket behind our back.
        self.max_attempts = max_attempts or max(1, bus.cfg.max_deliveries - 1)
        self.prefix = bus.cfg.prefix
        # How often a running chunk looks for a DELETE: the cost of one HGET per running job.
        self.cancel_poll_s = cancel_poll_s
        self._transition = self.r.register_script(_TRANSITION)

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:vjob:{job_id}"

    # --- API side ----------------------------------------------------------------------------
    async def create(self, items: Sequence[dict]) -> str:
        job_id = uuid.uuid4().hex
        key, now = self._key(job_id), time.time()
        async with self.r.pipeline(transaction=True) as p:
            p.hset(key, mapping={
                "status": "queued", "total": len(items), "created_at": now, "updated_at": now,
                "attempts": 0, "items": json.dumps(list(items)),
            })
            p.expire(key, self.ttl_s)
            await p.execute()
        try:
            await self.bus.publish(self.stream, JobTicket(job_id=job_id, msg_id=job_id, run_id="verifier-jobs"))
        except BaseException:
            await self.r.delete(key)
            raise
        return job_id

    async def get(self, job_id: str, *, with_results: bool = True) -> JobState | None:
        key = self._key(job_id)
        async with self.r.pipeline(transaction=False) as p:
            p.hmget(key, "status", "total", "created_at", "updated_at", "error")
            p.hlen(key + ":res")
            (status, total, created, updated, error), done = await p.execute()
        if status is None:
            return None
        status = _s(status)
        results = None
        if status == "done" and with_results:
            raw = await self.r.hgetall(key + ":res")
            ordered = sorted(((int(k), v) for k, v in raw.items()), key=lambda kv: kv[0])
            results = [VerifyResult.model_validate_json(v) for _, v in ordered]
        return JobState(
            job_id=job_id, status=status, progress=Progress(done=done, total=int(total)),
            created_at=float(created), updated_at=float(updated), error=_s(error), results=results,
        )

    async def cancel(self, job_id: str) -> JobState | None:
        await self._transition(keys=[self._key(job_id)], args=["cancelled", time.time(), ""])
        return await self.get(job_id, with_results=False)

    # --- runner side -------------------------------------------------------------------------
    async def _set(self, job_id: str, status: str, error: str = "") -> str | None:
        return _s(await self._transition(keys=[self._key(job_id)], args=[status, time.time(), error]))

    async def _status(self, job_id: str) -> str | None:
        return _s(await self.r.hget(self._key(job_id), "status"))

    async def run(self, ticket: JobTicket, stop: asyncio.Event) -> None:
        """Bus handler: run (or resume) one job to a final state."""
        job_id, key = ticket.job_id, self._key(ticket.job_id)
        status, raw_items = await self.r.hmget(key, "status", "items")
        if status is None or _s(status) in TERMINAL:
            return  # expired, cancelled or finished by an earlier delivery
        attempts = await self.r.hincrby(key, "attempts", 1)
        if attempts > self.max_attempts:
            await self._set(job_id, "failed", f"interrupted {attempts - 1} times; giving up")
            return
        try:
            items = [Item(**d) for d in json.loads(raw_items)]
        except (TypeError, ValueError) as e:
            await self._set(job_id, "failed", f"stored items unreadable: {e}")
            return
        if await self._set(job_id, "running") != "running":
            return
        done = {int(k) for k in await self.r.hkeys(key + ":res")}
        todo = [i for i in range(len(items)) if i not in done]
        for start in range(0, len(todo), self.chunk):
            if stop.is_set():
                raise JobInterrupted(job_id)
            if await self._status(job_id) != "running":
                return  # cancelled meanwhile
            idx = todo[start : start + self.chunk]
            verdicts = await self._verify(job_id, [items[i] for i in idx], stop)
            if verdicts is None:
                return
            metrics.observe("job", verdicts)
            async with self.r.pipeline(transaction=True) as p:
                p.hset(key + ":res", mapping={
                    str(i): VerifyResult.model_validate(v.model_dump()).model_dump_json()
                    for i, v in zip(idx, verdicts, strict=True)
                })
                p.hset(key, "updated_at", time.time())
                p.expire(key + ":res", self.ttl_s)
                p.expire(key, self.ttl_s)
                await p.execute()
        await self._set(job_id, "done")

    async def _verify(self, job_id: str, items: list[Item], stop: asyncio.Event) -> list | None:
        """Verdicts for one chunk; None if the job was cancelled meanwhile (its queued items are
        then dropped from the pool). Raises JobInterrupted when the service stops."""
        # Internal work bypasses the HTTP admission bound: one chunk per running job is queued.
        work = asyncio.ensure_future(self.pool.run(items, enforce_limit=False))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not work.done():
                await asyncio.wait({work, stopping}, timeout=self.cancel_poll_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                if stop.is_set() and not work.done():
                    raise JobInterrupted(job_id)
                if not work.done() and await self._status(job_id) != "running":
                    return None
            return work.result()
        finally:
            stopping.cancel()
            work.cancel()

    async def consume(self, group: str, consumer: str, stop: asyncio.Event, *, concurrency: int = 1) -> None:
        async def handler(ticket: JobTicket) -> None:
            await self.run(ticket, stop)

        await self.bus.consume(self.stream, group, consumer, handler, JobTicket, stop, concurrency=concurrency)

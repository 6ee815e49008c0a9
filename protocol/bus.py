"""A reliable work queue on Redis Streams (redis.asyncio), works on Redis >= 6.2.

Guarantees, and how:
- **At-least-once delivery, exactly-once effect downstream.** A consumer acks an entry only
  after its handler returned, i.e. after the handler's outputs were published. A consumer
  killed mid-handler leaves the entry pending; any live consumer reclaims it once it has been
  idle for `claim_idle_ms` (XAUTOCLAIM) and runs the handler again. Outputs carry
  deterministic ids (`messages.derive_id`) and `publish` is guarded by `SET NX` on the
  msg_id, so the rerun's outputs are dropped instead of sent twice.
- **Poison messages.** An entry that cannot be decoded, or whose handler raised on
  `max_deliveries` attempts (counted by Redis' own delivery counter, so crashes count too),
  goes to `<stream>:dead` with the error text and is acked; the consumer keeps serving.
- **Bounded streams without losing work.** Acked entries are deleted (XACK+XDEL in one
  transaction), so a stream holds only unfinished work and XLEN is the backlog. `publish`
  refuses (atomically, in a Lua script) to add to a stream at `max_backlog` and waits, then
  fails with `BackpressureTimeout`. We never pass MAXLEN: exact or approximate trimming
  can delete entries that are still pending (Redis' XADD MAXLEN / XTRIM trim by length alone).
- **Big payloads by claim-check.** A payload above `blob_threshold_bytes` is stored under a
  TTL'd key; the entry carries the key.
- **Redis outages.** Every command that loses its connection reconnects and retries with
  backoff for `reconnect_timeout_s` (a restarted Redis with its AOF is back in about a
  second). Retrying is safe: publish is guarded by its msg_id, acks are idempotent. A consumer
  outlives longer outages too: it logs once, keeps retrying until stopped, and picks up where
  it was (unacked entries stay pending). `reachable()` answers readiness probes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from protocol.codec import decode, encode
from protocol.config import BusSettings
from protocol.trace import span

log = logging.getLogger("rlrt.bus")
M = TypeVar("M", bound=BaseModel)
Handler = Callable[[Any], Awaitable[None]]

PUBLISHED = Counter("rlrt_bus_published_total", "messages published", ["stream"])
DUPLICATES = Counter("rlrt_bus_duplicates_total", "publishes dropped as duplicates", ["stream"])
HANDLED = Counter("rlrt_bus_handled_total", "messages handled and acked", ["stream"])
FAILURES = Counter("rlrt_bus_handler_failures_total", "handler exceptions", ["stream"])
DEAD = Counter("rlrt_bus_dead_lettered_total", "messages sent to dead-letter", ["stream"])
RECLAIMED = Counter("rlrt_bus_reclaimed_total", "entries reclaimed from idle consumers", ["stream"])
WAITS = Counter("rlrt_bus_backpressure_waits_total", "publishes that waited on a full stream", ["stream"])
HANDLE_SECONDS = Histogram("rlrt_bus_handle_seconds", "handler time", ["stream"])
REDIS_UP = Gauge("rlrt_bus_redis_up", "1 while this process reaches Redis, 0 during an outage")
OUTAGES = Counter("rlrt_bus_redis_outages_total", "times a consumer lost Redis")

# What a lost or refused connection raises (redis-py wraps the socket errors -- a unix socket
# whose server is gone, a reset -- in its own ConnectionError).
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
_BACKOFF_BASE_S, _BACKOFF_CAP_S = 0.05, 1.0


def _retries(timeout_s: float) -> int:
    """Attempts of an ExponentialBackoff(cap=1, base=0.05) that add up to about timeout_s."""
    n, spent = 0, 0.0
    while spent < timeout_s:
        n += 1
        spent += min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** n)
    return n


class BusError(RuntimeError):
    pass


class PermanentError(Exception):
    """Raise (or subclass) this from a handler when retrying cannot help (a malformed
    request, a prompt longer than the context): the message is dead-lettered at once instead
    of after `max_deliveries` attempts."""


class BackpressureTimeout(BusError):
    """The stream stayed at its bound for longer than the publish timeout."""


# KEYS: stream, dedup key, [blob key]; ARGV: max_backlog, dedup ttl, msg_id, type, payload|"",
# blob ttl. Returns the entry id, 0 for a duplicate, -1 for a full stream.
_PUBLISH_LUA = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return -1 end
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[2])) then return 0 end
if #KEYS >= 3 then
  redis.call('SET', KEYS[3], ARGV[5], 'EX', tonumber(ARGV[6]))
  return redis.call('XADD', KEYS[1], '*', 'id', ARGV[3], 't', ARGV[4], 'ref', KEYS[3])
end
return redis.call('XADD', KEYS[1], '*', 'id', ARGV[3], 't', ARGV[4], 'd', ARGV[5])
"""


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def _unless_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Run `work` unless `stop` is set first (then cancel it). True if it finished."""
    task = asyncio.ensure_future(work)
    if stop.is_set():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we were cancelled: take the work down with us
        task.cancel()
        raise
    finally:
        waiter.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
    task.result()  # raises what the work raised
    return True


class _Outage:
    """A consumer's view of a Redis outage: one log line when it starts and one when it ends
    (not one per retry), and the backoff between attempts."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.since: float | None = None
        self.attempts = 0

    def lost(self, e: BaseException) -> None:
        self.attempts += 1
        if self.since is None:
            self.since = time.monotonic()
            OUTAGES.inc()
            REDIS_UP.set(0)
            log.error("Redis unreachable (%s: %s); %s waits for it and resumes when it is back",
                      type(e).__name__, e, self.stream)

    def delay(self) -> float:
        return min(_BACKOFF_CAP_S * 2, _BACKOFF_BASE_S * 2 ** self.attempts)

    def back(self) -> None:
        if self.since is not None:
            log.warning("Redis reachable again after %.1f s; %s resumes",
                        time.monotonic() - self.since, self.stream)
            REDIS_UP.set(1)
            self.since, self.attempts = None, 0


class Bus:
    """Publish and consume typed messages. One consumer group per stream (a work queue)."""

    def __init__(self, client: aioredis.Redis, settings: BusSettings | None = None) -> None:
        self.r = client
        self.cfg = settings or BusSettings()
        self._publish_script = self.r.register_script(_PUBLISH_LUA)

    @classmethod
    def from_url(cls, url: str | None = None, settings: BusSettings | None = None) -> Bus:
        settings = settings or BusSettings()
        url = url or settings.redis_url
        if not url:
            raise BusError("no Redis URL: set bus.redis_url or REDIS_URL")
        retry = Retry(ExponentialBackoff(cap=_BACKOFF_CAP_S, base=_BACKOFF_BASE_S),
                      _retries(settings.reconnect_timeout_s))
        client = aioredis.Redis.from_url(
            url, decode_responses=False, health_check_interval=30, socket_connect_timeout=5,
            retry=retry, retry_on_error=[RedisConnectionError, RedisTimeoutError])
        return cls(client, settings)

    async def reachable(self, timeout_s: float = 1.0) -> bool:
        """One PING that does not wait out the reconnect budget (for readiness probes)."""
        try:
            ok = bool(await asyncio.wait_for(self.r.ping(), timeout_s))
        except (asyncio.TimeoutError, *REDIS_DOWN):
            ok = False
        REDIS_UP.set(1 if ok else 0)
        return ok

    async def close(self) -> None:
        await self.r.aclose()

    # ---------------------------------------------------------------- publish
    async def publish(self, stream: str, msg: BaseModel, *, timeout_s: float | None = None,
                      max_backlog: int | None = None) -> str | None:
        """Append `msg` to `stream` once. Returns the entry id, or None if this msg_id was
        already published (a redelivered handler re-publishing its output)."""
        msg_id = getattr(msg, "msg_id", None)
        if not msg_id:
            raise BusError(f"{type(msg).__name__} has no msg_id")
        payload = encode(msg)
        keys = [stream, f"{self.cfg.prefix}:pub:{stream}:{msg_id}"]
        if len(payload) > self.cfg.blob_threshold_bytes:
            keys.append(f"{self.cfg.prefix}:blob:{msg_id}")
        args = [max_backlog or self.cfg.max_backlog, self.cfg.dedup_ttl_s, msg_id,
                type(msg).__name__, payload, self.cfg.blob_ttl_s]
        timeout_s = self.cfg.publish_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            res = await self._publish_script(keys=keys, args=args)
            if res == 0:
                DUPLICATES.labels(stream).inc()
                return None
            if res != -1:
                PUBLISHED.labels(stream).inc()
                return _s(res)
            WAITS.labels(stream).inc()
            if time.monotonic() >= deadline:
                raise BackpressureTimeout(
                    f"stream {stream} stayed at its bound of {args[0]} entries for {timeout_s:.1f}s; "
                    "consumers are not keeping up (or none is running)"
                )
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)

    # ---------------------------------------------------------------- consume
    async def ensure_group(self, stream: str, group: str) -> None:
        try:
            await self.r.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def consume(self, stream: str, group: str, consumer: str, handler: Handler,
                      msg_type: type[M], stop: asyncio.Event, *, concurrency: int = 1,
                      max_messages: int | None = None) -> int:
        """Run `handler(msg)` for each message until `stop` is set (or `max_messages` handled).

        On stop, no new entries are taken and in-flight handlers finish. Returns the count of
        entries finished (acked or dead-lettered)."""
        tasks: set[asyncio.Task] = set()
        started = 0
        finished = 0
        backlog: list[tuple[str, dict]] = []
        fresh = False  # entries read with ">" were never delivered before: 1st attempt
        next_claim = 0.0
        joined = False  # group made and our own pending entries read back
        outage = _Outage(stream)

        async def run_one(entry_id: str, fields: dict, fresh: bool) -> None:
            nonlocal finished
            try:
                await self._handle(stream, group, consumer, entry_id, fields, handler, msg_type,
                                   stop, fresh=fresh)
            except REDIS_DOWN as e:
                # Lost Redis before the ack: the entry stays pending and is handled again
                # (reclaimed) once Redis is back; its outputs were published once (msg_id).
                outage.lost(e)
                return
            finished += 1

        async def fetch() -> None:
            nonlocal backlog, fresh, joined, next_claim
            if not joined:
                await self.ensure_group(stream, group)
                # Our own pending entries first (we restarted under the same name).
                backlog = await self._read(stream, group, consumer, "0", concurrency)
                fresh, joined = False, True
            if not backlog and time.monotonic() >= next_claim:
                backlog = await self._reclaim(stream, group, consumer, room())
                fresh = False
                next_claim = time.monotonic() + self.cfg.claim_idle_ms / 2000
            if not backlog:
                backlog = await self._read(stream, group, consumer, ">", room(),
                                           block_ms=self.cfg.block_ms)
                fresh = True

        def room() -> int:
            left = concurrency - len(tasks)
            if max_messages is not None:
                left = min(left, max_messages - started)
            return left

        # Entries are read only when a handler slot is free, so nothing sits fetched-but-idle
        # in this process: on stop, everything not in flight is still free for others.
        try:
            while not stop.is_set() and (max_messages is None or started < max_messages):
                if room() <= 0:
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    # During an outage each command below retries for reconnect_timeout_s:
                    # a stop must not wait for that.
                    if not await _unless_stopped(fetch(), stop):
                        break
                except REDIS_DOWN as e:
                    outage.lost(e)
                    # Wait, then start over: the group may be gone too (a Redis without its AOF).
                    joined = False
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), outage.delay())
                    continue
                outage.back()
                while backlog and room() > 0 and not stop.is_set():
                    entry_id, fields = backlog.pop(0)
                    t = asyncio.create_task(run_one(entry_id, fields, fresh))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    started += 1
        except asyncio.CancelledError:
            # Cancelled rather than stopped: leave no handler running detached. Their entries
            # stay pending (nothing was acked) and are reclaimed later.
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return finished

    async def _read(self, stream: str, group: str, consumer: str, start: str, count: int,
                    block_ms: int | None = None) -> list[tuple[str, dict]]:
        res = await self.r.xreadgroup(group, consumer, {stream: start}, count=count, block=block_ms)
        out = []
        for _name, entries in res or []:
            for entry_id, fields in entries:
                if fields:  # entries deleted while pending come back with no fields
                    out.append((_s(entry_id), fields))
                else:
                    await self.r.xack(stream, group, entry_id)
        return out

    async def _reclaim(self, stream: str, group: str, consumer: str, count: int) -> list:
        """Take over entries idle for longer than claim_idle_ms (their consumer is dead)."""
        out: list[tuple[str, dict]] = []
        cursor = "0-0"
        while True:
            res = await self.r.xautoclaim(stream, group, consumer, self.cfg.claim_idle_ms,
                                          start_id=cursor, count=count)
            cursor = _s(res[0])
            for entry_id, fields in res[1]:
                if fields:
                    out.append((_s(entry_id), fields))
            if cursor == "0-0" or len(out) >= count:
                break
        if out:
            RECLAIMED.labels(stream).inc(len(out))
            log.warning("reclaimed %d idle entries on %s", len(out), stream)
        return out

    async def _deliveries(self, stream: str, group: str, entry_id: str) -> int:
        info = await self.r.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
        return int(info[0]["times_delivered"]) if info else 1

    async def _payload(self, fields: dict) -> bytes:
        if b"d" in fields:
            return fields[b"d"]
        ref = fields.get(b"ref")
        if ref is None:
            raise ValueError("entry has neither 'd' nor 'ref'")
        data = await self.r.get(ref)
        if data is None:
            raise ValueError(f"claim-check blob {_s(ref)} is missing (expired?)")
        return data

    async def _handle(self, stream: str, group: str, consumer: str, entry_id: str, fields: dict,
                      handler: Handler, msg_type: type[M], stop: asyncio.Event, *,
                      fresh: bool = False) -> None:
        attempt = 1 if fresh else await self._deliveries(stream, group, entry_id)
        if attempt > self.cfg.max_deliveries:
            await self._dead_letter(stream, group, consumer, entry_id, fields, attempt - 1,
                                    "delivered too often without success (consumer crashed?)")
            return
        try:
            msg = decode(await self._payload(fields), msg_type)
        except (ValueError, ValidationError) as e:
            await self._dead_letter(stream, group, consumer, entry_id, fields, attempt,
                                    f"undecodable {msg_type.__name__}: {e}")
            return
        delay = self.cfg.retry_backoff_s
        while True:
            try:
                # One span per message on the consumer group's row of the step timeline
                # (protocol/trace.py): what this service was busy with, and when.
                with HANDLE_SECONDS.labels(stream).time(), span(group, "handle"):
                    await handler(msg)
                break
            except Exception as e:  # a handler bug or a bad message: retry, then dead-letter
                FAILURES.labels(stream).inc()
                error = f"{type(e).__name__}: {e}"
                log.warning("handler failed on %s %s (attempt %d/%d): %s", stream, entry_id,
                            attempt, self.cfg.max_deliveries, error)
                permanent = isinstance(e, PermanentError)
                if permanent or attempt >= self.cfg.max_deliveries or stop.is_set():
                    if permanent or attempt >= self.cfg.max_deliveries:
                        await self._dead_letter(stream, group, consumer, entry_id, fields,
                                                attempt, error)
                    return  # on stop: leave it pending for another consumer
                # XCLAIM bumps Redis' delivery counter, so a crash during the retry still counts.
                await self.r.xclaim(stream, group, consumer, 0, [entry_id])
                attempt += 1
                await asyncio.sleep(delay)
                delay *= 2
        await self._ack(stream, group, entry_id, fields)
        HANDLED.labels(stream).inc()

    async def _ack(self, stream: str, group: str, entry_id: str, fields: dict) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.xack(stream, group, entry_id)
            p.xdel(stream, entry_id)
            if b"ref" in fields:
                p.delete(fields[b"ref"])
            await p.execute()

    async def _dead_letter(self, stream: str, group: str, consumer: str, entry_id: str,
                           fields: dict, attempts: int, error: str) -> None:
        DEAD.labels(stream).inc()
        log.error("dead-lettering %s %s after %d attempts: %s", stream, entry_id, attempts, error)
        record = {
            "stream": stream, "group": group, "consumer": consumer, "entry_id": entry_id,
            "attempts": str(attempts), "error": error[:4000], "at": str(time.time()),
        }
        for k in (b"id", b"t", b"d", b"ref"):
            if k in fields:
                record[k.decode()] = fields[k]
        async with self.r.pipeline(transaction=True) as p:
            p.xadd(f"{stream}:dead", record, maxlen=self.cfg.dead_letter_maxlen, approximate=True)
            p.xack(stream, group, entry_id)
            p.xdel(stream, entry_id)
            await p.execute()

    # ---------------------------------------------------------------- inspection
    async def dead_letters(self, stream: str, count: int = 100) -> list[dict[str, Any]]:
        entries = await self.r.xrange(f"{stream}:dead", count=count)
        return [{_s(k): (v if k in (b"d",) else _s(v)) for k, v in f.items()} for _, f in entries]

    async def backlog(self, stream: str) -> int:
        return int(await self.r.xlen(stream))

    async def pending(self, stream: str, group: str) -> int:
        try:
            info = await self.r.xpending(stream, group)
        except ResponseError:
            return 0
        return int(info["pending"])

"""The trainer's inbox: ScoredGroups received from the bus, kept in Redis until a checkpoint
covers the step that used them.

Why not just consume and ack: the bus acks a message once the handler returns, but a group is
only *used* when the step that trains on it is checkpointed. A trainer killed between the
two would lose the groups of every step since its last checkpoint (their prompts skipped
forever). So the handler stores the group in a Redis hash (AOF-persisted) and appends its id
to an arrival-order list, atomically, before the ack; a restarted trainer reloads the
uncommitted groups in their arrival order and replays the same steps on the same groups.

A redelivered message (the trainer died between storing and acking) finds its id already
in the hash and is not queued twice. Committed groups leave an empty tombstone in the hash
so that they can never be queued again either (a few dozen bytes per group).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import redis.asyncio as aioredis

from protocol.codec import decode, encode
from protocol.messages import ScoredGroup

# KEYS: hash, order list; ARGV: msg_id, payload. 1 = stored, 0 = seen before.
_STORE_LUA = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""


class InboxTimeout(TimeoutError):
    pass


class Inbox:
    def __init__(self, client: aioredis.Redis, key: str) -> None:
        self.r = client
        self.hkey = f"{key}:groups"
        self.lkey = f"{key}:order"
        self.queue: asyncio.Queue[ScoredGroup] = asyncio.Queue()
        # Groups of a previous process still queued (restore() puts them first): their tasks
        # may be ones this process has not admitted yet (see Driver.collect).
        self.restored = 0
        self._store = self.r.register_script(_STORE_LUA)

    async def receive(self, msg: ScoredGroup) -> None:
        """Bus handler: persist, then hand to the driver."""
        if await self._store(keys=[self.hkey, self.lkey], args=[msg.msg_id, encode(msg)]):
            self.queue.put_nowait(msg)

    async def restore(self) -> int:
        """Queue the uncommitted groups of a previous process, in arrival order."""
        ids = await self.r.lrange(self.lkey, 0, -1)
        n = 0
        for mid in ids:
            raw = await self.r.hget(self.hkey, mid)
            if raw:
                self.queue.put_nowait(decode(raw, ScoredGroup))
                n += 1
        self.restored += n
        return n

    def _taken(self, g: ScoredGroup) -> ScoredGroup:
        self.restored = max(0, self.restored - 1)
        return g

    async def commit(self, msg_ids: Iterable[str]) -> None:
        """The groups `msg_ids` are covered by a checkpoint: tombstone them."""
        ids = list(msg_ids)
        if not ids:
            return
        async with self.r.pipeline(transaction=True) as p:
            for mid in ids:
                p.hset(self.hkey, mid, b"")
                p.lrem(self.lkey, 1, mid)
            await p.execute()

    async def get(self, timeout_s: float, stop: asyncio.Event | None = None) -> ScoredGroup | None:
        """The next group; None if `stop` was set first; InboxTimeout after `timeout_s`."""
        if not self.queue.empty():
            return self._taken(self.queue.get_nowait())
        getter = asyncio.ensure_future(self.queue.get())
        waits: set[asyncio.Future] = {getter}
        stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
        if stopper is not None:
            waits.add(stopper)
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in waits:
                if not f.done():
                    f.cancel()
        if getter in done:
            return self._taken(getter.result())
        if stopper is not None and stopper in done:
            return None
        raise InboxTimeout(f"no ScoredGroup within {timeout_s:.0f} s")

    def pending(self) -> int:
        return self.queue.qsize()

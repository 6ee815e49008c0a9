"""Helpers to run a whole service (HTTP + bus worker) inside a test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from pydantic import BaseModel
from support.polling import wait_until_async

from protocol.bus import Bus


@contextlib.asynccontextmanager
async def running(start: Callable[[asyncio.Event], Awaitable[None]], url: str,
                  timeout_s: float = 120) -> AsyncIterator[asyncio.Event]:
    """Run `start(stop)` as a task; yield once `url`/readyz answers 200; stop it afterwards."""
    stop = asyncio.Event()
    task = asyncio.create_task(start(stop))
    async with httpx.AsyncClient(base_url=url, timeout=5) as c:

        async def ready() -> bool:  # model load, engine start: a condition, not a guess
            if task.done():
                task.result()
                raise RuntimeError("service exited during startup")
            with contextlib.suppress(httpx.HTTPError):
                return (await c.get("/readyz")).status_code == 200
            return False

        await wait_until_async(ready, timeout_s, f"{url} to be ready", every_s=0.05)
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def take(bus: Bus, stream: str, msg_type: type[BaseModel], n: int = 1,
               timeout_s: float = 60) -> list[Any]:
    """The next `n` messages of `stream` (as the downstream consumer would get them)."""
    got: list[Any] = []

    async def handler(m: Any) -> None:
        got.append(m)

    await asyncio.wait_for(bus.consume(stream, "test-reader", "reader", handler, msg_type,
                                       asyncio.Event(), max_messages=n), timeout_s)
    return got


__all__ = ["running", "take"]

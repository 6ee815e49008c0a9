"""The one way tests wait for a condition: poll it until it holds or a deadline passes (never
a fixed sleep that guesses how long something takes)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx

T = TypeVar("T")


def wait_until(pred: Callable[[], T], timeout_s: float, what: str, *,
               proc: subprocess.Popen | None = None, every_s: float = 0.05) -> T:
    """Poll `pred` until it returns something truthy, and return that. Fails (AssertionError
    naming `what`) after `timeout_s`, or at once when `proc` exits meanwhile: a dead process
    will not make the condition true."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) while waiting for {what}")
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)


def answers(url: str) -> bool:
    """Whether `url` answers 200 now (a condition for `wait_until`: not up yet is False)."""
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def wait_until_async(pred: Callable[[], Awaitable[T]], timeout_s: float, what: str, *,
                           every_s: float = 0.02) -> T:
    """`wait_until` for a coroutine condition, inside the test's event loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        got = await pred()
        if got:
            return got
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(every_s)

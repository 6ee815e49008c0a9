"""A verifier whose workers can no longer start ends with the reason instead of hanging the run.

Seen for real: the code on disk was edited under a running `rlrt train`; the verifier's
forkserver had loaded the old `protocol.config`, every replacement worker then failed to
import, the pool retried forever, and the whole run sat idle. Now a slot that fails to start a
worker for `spawn_budget_s` marks the pool broken, the service's pool watcher raises, the
service exits non-zero and the launcher restarts it (fresh imports). A short fault is still
only retried."""

from __future__ import annotations

import asyncio

import pytest
from support.polling import wait_until

from services.verifier import main as verifier_main
from services.verifier import pool as pool_mod
from services.verifier.pool import Item, PoolBroken, VerifyPool


def test_a_worker_that_never_starts_marks_the_pool_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    def spawn(self) -> None:  # noqa: ANN001
        raise ImportError("cannot import name 'TINY_MODEL' from 'protocol.config'")

    monkeypatch.setattr(pool_mod._Slot, "spawn", spawn)
    p = VerifyPool(1, spawn_budget_s=0.3).start(wait=False)
    try:
        wait_until(lambda: p.broken is not None, 30.0, "the pool to be marked broken")
        assert "ImportError: cannot import name 'TINY_MODEL'" in p.broken
        assert not p.ready
    finally:
        p.close()


def test_a_short_start_fault_is_retried_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = pool_mod._Slot.spawn, []

    def flaky(self) -> None:  # noqa: ANN001
        calls.append(1)
        if len(calls) == 1:
            raise OSError("fork failed for a moment")
        real(self)

    monkeypatch.setattr(pool_mod._Slot, "spawn", flaky)
    with VerifyPool(1, spawn_budget_s=60.0).start(timeout=120) as p:
        assert len(calls) == 2 and p.broken is None
        assert p.run_sync([Item("math", r"\boxed{4}", "4", 5.0)])[0].correct


def test_the_service_watcher_ends_the_service_on_a_broken_pool() -> None:
    p = VerifyPool(1)  # never started: only its `broken` flag is read

    async def go(broken: str | None) -> None:
        stop = asyncio.Event()
        p.broken = broken
        task = asyncio.create_task(verifier_main.watch_pool(p, stop, every_s=0.01))
        if broken is None:  # healthy: runs until the service stops
            await asyncio.sleep(0)
            assert not task.done()
            stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(go(None))
    with pytest.raises(PoolBroken, match="no worker could start.*supervisor restarts"):
        asyncio.run(go("no worker could start for 120 s"))

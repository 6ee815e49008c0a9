"""The sandboxed pool: deadlines (soft and hard), crashes, memory cap, admission, cancellation.
Real worker processes running real math-verify."""

from __future__ import annotations

import os
import signal
import time

import pytest
from support.polling import wait_until

from services.verifier import sandbox
from services.verifier.pool import Item, QueueFull, VerifyPool

HUGE = r"\boxed{10^{10^{10^{10}}}}"  # sympy tries to evaluate it: never finishes
GRACE = 0.3
MARGIN = 1.5  # scheduling slack on a loaded 2-core machine


def math(resp: str, ref: str, timeout_s: float = 5.0) -> Item:
    return Item("math", resp, ref, timeout_s)


POOL_OPTIONS = {"memory_mb": 512, "kill_grace_s": GRACE, "batch_max": 8}  # for conftest.py's `pool`


def wait_busy(p: VerifyPool, timeout: float = 10.0) -> int:
    """Pid of a worker that is checking an item (polls; the item is known to be slow)."""
    return wait_until(p.busy_pids, timeout, "a worker to become busy", every_s=0.01)[0]


def test_results_in_order_and_correct(pool: VerifyPool) -> None:
    items = [math(rf"so \boxed{{{i}}}", str(i if i % 3 else i + 1)) for i in range(60)]
    items.append(Item("countdown", "9-5=4\n4*7=28\nAnswer: 28", "numbers=5,7,9;target=28", 5))
    items.append(Item("countdown", "9+5=14\nAnswer: 14", "numbers=5,7,9;target=28", 5))
    out = pool.run_sync(items)
    assert [v.correct for v in out[:60]] == [i % 3 != 0 for i in range(60)]
    assert (out[60].correct, out[61].correct) == (True, False)
    assert all(v.status == "ok" for v in out)


def test_deadline_answers_timeout_and_pool_keeps_serving(pool: VerifyPool) -> None:
    t0 = time.monotonic()
    (v,) = pool.run_sync([math(HUGE, "1", timeout_s=1.0)])
    elapsed = time.monotonic() - t0
    assert v.status == "timeout" and v.reward == 0.0 and not v.correct
    assert 1.0 <= elapsed < 1.0 + GRACE + MARGIN
    assert pool.run_sync([math(r"\boxed{2}", "2")])[0].correct


def test_hung_worker_is_killed_and_replaced(pool: VerifyPool) -> None:
    """A worker that cannot even take its own timer signal (stopped, or stuck in one C call)
    is SIGKILLed at deadline + grace; the item answers `timeout`."""
    before = pool.stats().restarts
    fut = pool.submit([math(HUGE, "1", timeout_s=1.5)])[0]
    pid = wait_busy(pool)
    os.kill(pid, signal.SIGSTOP)
    v = fut.result(timeout=1.5 + GRACE + MARGIN + 5)
    assert v.status == "timeout" and "killed" in v.detail
    assert pool.stats().restarts == before + 1
    assert pid not in pool.worker_pids()
    assert all(v.correct for v in pool.run_sync([math(r"\boxed{3}", "3")] * 4))


def test_worker_killed_mid_item_answers_error(pool: VerifyPool) -> None:
    before = pool.stats()
    fut = pool.submit([math(HUGE, "1", timeout_s=30)])[0]
    pid = wait_busy(pool)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    v = fut.result(timeout=10)
    assert time.monotonic() - t0 < 5, "a dead worker must be noticed at once, not at the deadline"
    assert v.status == "error" and "died" in v.detail
    after = pool.stats()
    assert (after.crashes, after.restarts) == (before.crashes + 1, before.restarts + 1)
    assert all(v.correct for v in pool.run_sync([math(r"\boxed{4}", "4")] * 6))
    deadline = time.monotonic() + 10
    while pool.stats().alive < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.stats().alive == 2


def test_rest_of_a_batch_survives_a_killed_worker() -> None:
    with VerifyPool(1, kill_grace_s=GRACE, batch_max=8) as p:
        futs = p.submit([math(HUGE, "1", timeout_s=30)] + [math(rf"\boxed{{{i}}}", str(i)) for i in range(5)],
                        enforce_limit=False)
        pid = wait_busy(p)
        os.kill(pid, signal.SIGKILL)
        out = [f.result(timeout=30) for f in futs]
    assert out[0].status == "error"
    assert all(v.correct for v in out[1:])


def test_memory_cap_is_set_on_workers(pool: VerifyPool) -> None:
    for pid in pool.worker_pids():
        with open(f"/proc/{pid}/limits") as f:
            line = next(ln for ln in f if ln.startswith("Max address space"))
        soft = int(line.split()[3])
        with open(f"/proc/{pid}/statm") as f:
            vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        # cap = idle size + 512 MiB: some head-room left, and far below "unlimited".
        assert vm < soft <= vm + 600 * 2**20


def test_memory_error_answers_error_and_asks_for_a_fresh_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    def hog(task: str, response: str, reference: str, policy: str | None = None):
        raise MemoryError

    monkeypatch.setattr(sandbox.core, "check", hog)
    result, must_exit = sandbox.run_one(7, "math", "x", "y", 1.0)
    assert result[0] == 7 and result[3] == "error" and "memory" in result[6]
    assert must_exit


def test_soft_deadline_in_process_is_a_base_exception_path() -> None:
    # The in-worker timer raises through sympy's `except Exception` blocks.
    assert not issubclass(sandbox.SoftDeadline, Exception)
    previous = sandbox.install_alarm()  # as a worker does; pytest-timeout has its own
    try:
        t0 = time.monotonic()
        result, must_exit = sandbox.run_one(1, "math", HUGE, "1", 0.3)
        assert time.monotonic() - t0 < 0.3 + MARGIN
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert result[3] == "timeout" and not must_exit


def test_queue_bound_refuses_whole_submissions() -> None:
    with VerifyPool(1, max_queue=2, kill_grace_s=GRACE) as p:
        slow = p.submit([math(HUGE, "1", timeout_s=2.0)])[0]
        wait_busy(p)
        queued = p.submit([math(r"\boxed{1}", "1"), math(r"\boxed{2}", "2")])
        with pytest.raises(QueueFull):
            p.submit([math(r"\boxed{3}", "3")])
        assert p.stats().queue_depth == 2
        # Internal callers may bypass the bound.
        extra = p.submit([math(r"\boxed{3}", "3")], enforce_limit=False)
        assert slow.result(10).status == "timeout"
        assert all(f.result(10).correct for f in queued + extra)


def test_cancelled_items_are_never_checked() -> None:
    with VerifyPool(1, kill_grace_s=GRACE) as p:
        slow = p.submit([math(HUGE, "1", timeout_s=1.0)])[0]
        wait_busy(p)
        doomed = p.submit([math(r"\boxed{1}", "1")] * 5)
        assert all(f.cancel() for f in doomed)
        slow.result(10)
        assert p.run_sync([math(r"\boxed{2}", "2")])[0].correct
        assert p.stats().completed == 2


def test_workers_are_recycled_after_max_items() -> None:
    with VerifyPool(1, max_items_per_worker=3, batch_max=8) as p:
        first = p.worker_pids()
        out = p.run_sync([math(rf"\boxed{{{i}}}", str(i)) for i in range(10)])
        assert all(v.correct for v in out)
        assert p.worker_pids() != first
        assert p.stats().restarts == 0  # planned recycling is not a failure

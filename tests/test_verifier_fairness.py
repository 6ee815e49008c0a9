"""The verifier pool's fairness and hygiene (issue 16, defect 3): a request's total-time
budget, cancellation of a deleted job's running item, and worker recycling by resident memory."""

from __future__ import annotations

import time
import uuid

import httpx
from support.verifier_live import live_verifier

from services.verifier.config import VerifierConfig
from services.verifier.pool import Item, VerifyPool

HUGE = r"\boxed{10^{10^{10^{10}}}}"  # each check runs into its deadline


POOL_OPTIONS = {"workers": 1}  # sizes conftest.py's `pool`


async def test_a_request_budget_bounds_its_total_time(pool: VerifyPool) -> None:
    """38 hostile items in one batch took 50 s: per-item deadlines alone do not bound a
    request. With a budget, what is left when it is spent answers 'timeout' at once."""
    before = pool.stats().completed
    t0 = time.monotonic()
    verdicts = await pool.run([Item("math", HUGE, "1", 0.5)] * 12, budget_s=1.2)
    took = time.monotonic() - t0
    assert len(verdicts) == 12 and all(v.status == "timeout" for v in verdicts)
    spent = [v for v in verdicts if "budget" in v.detail]
    assert spent and len(spent) >= 6, [v.detail for v in verdicts]
    assert pool.stats().completed - before < 12  # the spent items were never checked
    assert took < 12 * 0.5  # (no timing goal: just less than checking them all)
    ok = await pool.run([Item("math", r"\boxed{4}", "4", 5.0)])  # the pool is fine afterwards
    assert ok[0].correct


def test_deleting_a_job_kills_its_running_item(pool: VerifyPool, redis_url: str) -> None:
    cfg = VerifierConfig(workers=1, kill_grace_s=0.3, max_timeout_s=10.0, job_chunk=8,
                         consumer=f"fair-{uuid.uuid4().hex[:6]}")
    with live_verifier(cfg, pool, redis_url=redis_url, prefix=f"f{uuid.uuid4().hex[:8]}") as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        items = [{"response": HUGE, "reference": "1", "timeout_s": 5.0}] * 8
        job = c.post("/v1/jobs", json={"items": items}).json()["job_id"]
        deadline = time.monotonic() + 30
        while pool.stats().busy == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        cancelled = pool.stats().cancelled
        assert c.delete(f"/v1/jobs/{job}").json()["status"] == "cancelled"
        # Not 8 x 5 s, nor even the running item's 5 s: the worker is replaced.
        deadline = time.monotonic() + 4
        while pool.stats().busy or pool.stats().queue_depth:
            assert time.monotonic() < deadline, pool.stats()
            time.sleep(0.02)
        assert pool.stats().cancelled == cancelled + 1


def test_a_worker_above_its_rss_allowance_is_recycled() -> None:
    with VerifyPool(1, max_worker_rss_mb=1) as p:  # any worker is above 1 MB
        first = p.worker_pids()
        v = p.run_sync([Item("math", r"\boxed{\frac{1}{2}}", "0.5", 5.0)])
        assert v[0].correct
        deadline = time.monotonic() + 30
        while p.stats().recycled < 1 or not p.worker_pids():
            assert time.monotonic() < deadline, p.stats()
            time.sleep(0.02)
        assert p.worker_pids() != first and p.stats().restarts == 0  # planned, not a failure
        assert p.run_sync([Item("math", r"\boxed{3}", "3", 5.0)])[0].correct

"""A process pool for checks that may hang, crash or eat memory, and must not take the
service down with them.

- N worker processes (forkserver: a clean, single-threaded parent that has already imported
  sympy and math-verify, so a replacement worker is one fork() away, not a 3-second import).
- Each item has its own wall-clock deadline. The worker's SIGALRM stops ordinary overruns and
  keeps the worker; if it has not answered by deadline + grace, the parent SIGKILLs it, answers
  the item `timeout`, re-queues the rest of its batch and forks a replacement.
- A worker that dies (segfault, OOM-kill, someone's `kill -9`) answers its current item
  `error`; the rest of its batch is re-queued.
- Items travel in small batches per IPC round trip (results come back one by one, so the
  deadline of each item is tracked exactly). One thread per worker drives the pipe; the
  asyncio side only waits on futures.
- The queue is bounded for admission control (`QueueFull` -> HTTP 429); internal callers that
  bound their own concurrency (bus worker, job runner) may bypass the bound.
- Fair share: every submission (`run` call: one HTTP request, one job chunk, one RolloutGroup)
  is a `Request`, and workers take items round-robin from the requests with the fewest items
  running, not first-in-first-out; a worker whose batch has run for `yield_after_s` while
  another request waits hands the rest of its batch back after the current item. So one
  client's slow batch delays another's trivial request by at most one item, not the batch.
- Cancellation: a request whose caller gives up (client disconnected, job deleted, budget
  spent) has its queued items dropped and its running item's worker killed and replaced.
  `run(budget_s=...)` bounds a request's total time (items left then answer `timeout`).
- Recycling: a worker is replaced after `max_items_per_worker` items, or after a batch that
  left its resident memory above `max_worker_rss_mb` (sympy's caches grow without bound).
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from pydantic import Field

from services.verifier import sandbox
from tasks import rewards
from tasks.base import CheckResult

log = logging.getLogger(__name__)

# Imported once in the forkserver so every forked worker starts warm.
_PRELOAD = ["services.verifier.preload"]


def worker_rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


class QueueFull(Exception):
    """The bounded queue has no room for the whole submission (nothing was queued)."""

    def __init__(self, depth: int, limit: int, retry_after_s: float) -> None:
        super().__init__(f"verification queue full ({depth}/{limit})")
        self.retry_after_s = retry_after_s


class PoolBroken(RuntimeError):
    """No worker process could be started for `spawn_budget_s`: a permanent fault (e.g. the
    code on disk changed under a running service and no longer imports against what the
    forkserver loaded). The service exits on it so its supervisor restarts it."""


class PoolClosed(Exception):
    """Submitted to a pool that is shutting down."""


class Verdict(CheckResult):
    """A CheckResult plus the time the item spent in the service (queue + check)."""

    latency_ms: float = Field(0.0, description="submit-to-answer time in milliseconds")
    reward_error: str | None = Field(
        None, description="traceback of a user reward function that failed on this item "
        "(tasks/rewards.py); the bus worker dead-letters the group with it"
    )


@dataclass(frozen=True)
class Item:
    task: str
    response: str
    reference: str
    timeout_s: float
    # The run's reward plug-ins (tasks.rewards.Spec) and the prompt's row they receive;
    # None = grade with the task's checker alone.
    reward: rewards.Spec | None = None
    row: dict | None = None
    # Where a "math" answer is taken from (tasks.math.POLICIES), resolved by the API or the bus
    # worker from the request and the config; None = the default (tasks.math.DEFAULT_POLICY).
    policy: str | None = None


class Request:
    """One submission's share of the pool; `cancel()` drops its queued items and kills the
    worker running one of them. Thread-safe (flags only)."""

    def __init__(self, budget_s: float | None = None) -> None:
        self.deadline = None if budget_s is None else time.monotonic() + budget_s
        self.budget_s = budget_s
        self.cancelled = False
        self.inflight = 0  # items of this request in workers now (guarded by the queue's lock)
        self.served = 0.0  # when a worker last took one of its items

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    @property
    def gone(self) -> bool:
        """Nobody wants these verdicts any more."""
        return self.cancelled or self.expired


@dataclass
class _Job:
    item: Item
    future: Future
    owner: Request = field(default_factory=Request)
    submitted: float = field(default_factory=time.monotonic)
    claimed: bool = False


@dataclass
class PoolStats:
    workers: int
    alive: int
    busy: int
    queue_depth: int
    restarts: int
    timeouts: int
    crashes: int
    completed: int
    recycled: int = 0
    cancelled: int = 0


class _Queue:
    """Jobs per request, served round-robin (fewest running first), with a capacity check at
    submission and a front door for re-queued work."""

    def __init__(self) -> None:
        self._by: dict[Request, deque[_Job]] = {}
        self._n = 0
        self._cv = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return self._n

    def _add(self, jobs: Sequence[_Job], front: bool) -> None:
        for j in (reversed(jobs) if front else jobs):
            dq = self._by.setdefault(j.owner, deque())
            dq.appendleft(j) if front else dq.append(j)
        self._n += len(jobs)
        # Wake only as many slot threads as there is work for: each woken thread competes
        # for the GIL with the event loop.
        self._cv.notify(len(jobs))

    def put(self, jobs: Sequence[_Job], limit: int | None) -> None:
        with self._cv:
            if self._closed:
                raise PoolClosed("verification pool is closed")
            if limit is not None and self._n + len(jobs) > limit:
                raise QueueFull(self._n, limit, retry_after_s=1.0)
            self._add(jobs, front=False)

    def put_front(self, jobs: Sequence[_Job]) -> None:
        with self._cv:
            self._add(jobs, front=True)

    def others_waiting(self, owners: set[Request]) -> bool:
        """Work of a request not in `owners` is queued (a slot should hand its batch back)."""
        with self._cv:
            return any(r not in owners for r in self._by)

    def drop(self, owner: Request) -> list[_Job]:
        """Remove and return the queued jobs of `owner`."""
        with self._cv:
            jobs = list(self._by.pop(owner, ()))
            self._n -= len(jobs)
            return jobs

    def done(self, job: _Job) -> None:
        with self._cv:
            job.owner.inflight -= 1

    def take(self, workers: int, batch_max: int) -> list[_Job] | None:
        """Block for work; return a fair share of the queue (≤ batch_max), None once closed."""
        with self._cv:
            while not self._n and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            # Splitting the backlog evenly keeps every worker busy at low load and amortises
            # the IPC round trip at high load.
            n = max(1, min(batch_max, math.ceil(self._n / workers)))
            # Requests with the fewest items running go first, then the longest unserved;
            # one item from each in turn.
            order = sorted(self._by, key=lambda r: (r.inflight, r.served))
            out: list[_Job] = []
            now = time.monotonic()
            while len(out) < n and order:
                for r in list(order):
                    dq = self._by[r]
                    j = dq.popleft()
                    out.append(j)
                    r.inflight += 1
                    r.served = now
                    if not dq:
                        del self._by[r]
                        order.remove(r)
                    if len(out) >= n:
                        break
            self._n -= len(out)
            return out

    def close(self) -> list[_Job]:
        with self._cv:
            self._closed = True
            left = [j for dq in self._by.values() for j in dq]
            self._by.clear()
            self._n = 0
            self._cv.notify_all()
            return left


class _Slot(threading.Thread):
    """Owns one worker process: feeds it batches, enforces deadlines, replaces it when needed."""

    def __init__(self, pool: VerifyPool, index: int) -> None:
        super().__init__(name=f"verify-slot-{index}", daemon=True)
        self.pool = pool
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.conn = None
        self.busy = False

    # --- process management -------------------------------------------------------------
    def spawn(self) -> None:
        p = self.pool
        parent, child = p.ctx.Pipe(duplex=True)
        proc = p.ctx.Process(
            target=sandbox.main, args=(child, p.memory_mb, p.max_items_per_worker), daemon=True
        )
        proc.start()
        child.close()
        if not parent.poll(p.spawn_timeout_s):
            proc.kill()
            proc.join(5)
            raise RuntimeError(f"verifier worker did not start within {p.spawn_timeout_s}s")
        parent.recv()  # ("ready", pid)
        self.proc, self.conn = proc, parent

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(5)
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def discard(self, why: str, *, count: bool = True) -> None:
        """Kill the worker (a replacement is forked on next use)."""
        if count:
            log.warning("replacing verifier worker %s: %s", self.proc and self.proc.pid, why)
            self.pool._bump("restarts")
        self.kill()

    def ensure_worker(self) -> None:
        backoff, failing_since = 0.1, time.monotonic()
        while self.proc is None and not self.pool._stopping.is_set():
            try:
                self.spawn()
            except Exception as e:
                # Retried (a fork can fail for a moment), but not forever: a fault that outlives
                # the budget marks the pool broken, and the service exits rather than hang.
                spent = time.monotonic() - failing_since
                if spent >= self.pool.spawn_budget_s and self.pool.broken is None:
                    self.pool.broken = (f"no verifier worker could start for {spent:.0f} s; last "
                                        f"error: {type(e).__name__}: {e}")
                log.exception("could not start a verifier worker; retrying in %.1fs", backoff)
                self.pool._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    # --- serving -------------------------------------------------------------------------
    def run(self) -> None:
        self.ensure_worker()
        while True:
            jobs = self.pool._queue.take(self.pool.workers, self.pool.batch_max)
            if jobs is None:
                break
            live = []
            for j in jobs:
                # A job is claimed once; a re-queued job stays claimed (its future is running).
                if not (j.claimed or j.future.set_running_or_notify_cancel()):
                    self.pool._queue.done(j)  # cancelled while queued
                elif j.owner.gone:
                    j.claimed = True
                    self.pool._give_up(j)
                else:
                    j.claimed = True
                    live.append(j)
            if live:
                self.busy = True
                try:
                    self.serve(live)
                finally:
                    self.busy = False
        self.stop_worker()

    def serve(self, jobs: list[_Job]) -> None:
        pool = self.pool
        if self.proc is None:
            self.ensure_worker()
            if self.proc is None:  # stopping
                pool._requeue(jobs)
                return
        batch = [(k, j.item.task, j.item.response, j.item.reference, j.item.timeout_s, j.item.reward, j.item.row,
                  j.item.policy)
                 for k, j in enumerate(jobs)]
        try:
            self.conn.send(batch)
        except (OSError, ValueError) as e:
            # The worker died while idle (e.g. killed from outside): nobody's item is at fault.
            self.discard(f"send failed: {e}")
            pool._requeue(jobs)
            return
        pending = deque(jobs)
        started = batch_start = time.monotonic()
        owners = {j.owner for j in jobs}
        yielded = False  # asked the worker for the rest of the batch back
        while pending:
            job = pending[0]
            left = started + job.item.timeout_s + pool.kill_grace_s - time.monotonic()
            # Wake now and then to notice a request that was cancelled or ran out of budget.
            if left > 0 and not self.conn.poll(min(left, pool.watch_s)):
                if job.owner.gone:
                    self.cut(pending)
                    return
                if not yielded and len(pending) > 1 and \
                        time.monotonic() - batch_start >= pool.yield_after_s and \
                        pool._queue.others_waiting(owners):
                    yielded = self.ask_yield()
                continue
            if left <= 0:
                # Kill first, answer second: whoever sees the answer sees the pool already
                # rid of the hung process.
                self.discard("item overran its deadline")
                pending.popleft()
                pool._resolve(job, False, "timeout", f"killed after the {job.item.timeout_s:g}s deadline")
                pool._requeue(pending)
                self.ensure_worker()
                return
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                self.proc.join(1)
                code = self.proc.exitcode
                pool._bump("crashes")
                self.discard(f"worker died with exit code {code}")
                pending.popleft()
                pool._resolve(job, False, "error", f"verifier worker died (exit code {code})")
                pool._requeue(pending)
                self.ensure_worker()
                return
            if msg[0] == "bye":
                self.discard(f"planned exit ({msg[1]})", count=msg[1] != "recycled")
                pool._requeue(pending)
                self.ensure_worker()
                return
            if msg[0] == "yielded":  # the worker handed back what it had not started
                pool._requeue(pending)
                return
            pending.popleft()
            pool._finish(job, msg)
            # The worker starts the next item the moment it sends this result.
            started = time.monotonic()
            if len(pending) > 1 and not yielded and started - batch_start >= pool.yield_after_s \
                    and pool._queue.others_waiting(owners):
                yielded = self.ask_yield()
        if yielded:
            self.await_yield_ack()
        self.check_rss()

    def ask_yield(self) -> bool:
        """Ask the worker to hand back the rest of its batch after the current item (another
        request is waiting). Exactly one ("yielded", n) comes back, mid-batch or after it."""
        try:
            self.conn.send("yield")
        except (OSError, ValueError):
            return False
        return True

    def await_yield_ack(self) -> None:
        # The batch finished before the worker saw our request: it answers between batches.
        try:
            if self.conn.poll(self.pool.spawn_timeout_s):
                msg = self.conn.recv()
                if msg[0] == "yielded":
                    return
        except (EOFError, OSError):
            pass
        self.discard("no answer to a yield request")

    def cut(self, pending: deque[_Job]) -> None:
        """The request of the item running now was cancelled or ran out of budget: kill the
        worker (the only way to stop a check mid-item), answer that request's items, re-queue
        the others'."""
        pool = self.pool
        self.discard("its request was cancelled or ran out of budget", count=False)
        pool._bump("cancelled")
        gone = [j for j in pending if j.owner.gone]
        for j in gone:
            pool._give_up(j)
        pool._requeue([j for j in pending if not j.owner.gone])
        self.ensure_worker()

    def check_rss(self) -> None:
        """Recycle a worker whose resident memory crossed max_worker_rss_mb (between batches,
        so no item is lost; the replacement is one fork from the warm forkserver)."""
        limit = self.pool.max_worker_rss_mb
        if not limit or self.proc is None:
            return
        rss = worker_rss_mb(self.proc.pid)
        if rss > limit:
            log.info("recycling verifier worker %s: RSS %.0f MB > max_worker_rss_mb %d",
                     self.proc.pid, rss, limit)
            self.stop_worker()
            self.ensure_worker()
            self.pool._bump("recycled")

    def stop_worker(self) -> None:
        if self.conn is not None:
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                pass
        if self.proc is not None:
            self.proc.join(2)
        self.kill()


class VerifyPool:
    """See the module docstring. Thread-safe `submit`; `run` for asyncio callers."""

    def __init__(
        self,
        workers: int = 2,
        *,
        memory_mb: int = 1024,
        max_queue: int = 4096,
        kill_grace_s: float = 0.5,
        batch_max: int = 16,
        max_items_per_worker: int = 20000,
        max_worker_rss_mb: int = 0,
        yield_after_s: float = 0.2,
        spawn_timeout_s: float = 120.0,
        spawn_budget_s: float = 120.0,
        start_method: str = "forkserver",
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.workers = workers
        self.memory_mb = memory_mb
        self.max_queue = max_queue
        self.kill_grace_s = kill_grace_s
        self.batch_max = batch_max
        self.max_items_per_worker = max_items_per_worker
        self.max_worker_rss_mb = max_worker_rss_mb  # 0 = no RSS-based recycling
        # A batch that has run this long hands its rest back when another request waits.
        self.yield_after_s = yield_after_s
        # How often a slot waiting on its worker looks for a cancelled / over-budget request.
        self.watch_s = 0.05
        self.spawn_timeout_s = spawn_timeout_s
        # How long a slot keeps failing to start a worker before the pool is `broken`.
        self.spawn_budget_s = spawn_budget_s
        self.broken: str | None = None
        self.ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self.ctx.set_forkserver_preload(_PRELOAD)
        self._queue = _Queue()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._counts = {"restarts": 0, "timeouts": 0, "crashes": 0, "completed": 0,
                        "recycled": 0, "cancelled": 0}
        self._slots = [_Slot(self, i) for i in range(workers)]
        self._started = False

    # --- lifecycle ---------------------------------------------------------------------
    def start(self, wait: bool = True, timeout: float = 180.0) -> VerifyPool:
        """Start the worker threads; with `wait`, block until every worker process is up."""
        if not self._started:
            self._started = True
            for s in self._slots:
                s.start()
        if wait:
            deadline = time.monotonic() + timeout
            while not self.ready:
                if time.monotonic() > deadline:
                    raise TimeoutError("verifier pool did not start in time")
                self._stopping.wait(0.05)
        return self

    @property
    def ready(self) -> bool:
        return self._started and all(s.proc is not None for s in self._slots)

    def close(self) -> None:
        """Stop accepting work, fail what is still queued, stop the workers."""
        self._stopping.set()
        for job in self._queue.close():
            if job.claimed or job.future.set_running_or_notify_cancel():
                job.future.set_exception(PoolClosed("verification pool closed"))
        for s in self._slots:
            if s.is_alive():
                s.join(10)
            else:
                s.kill()

    def __enter__(self) -> VerifyPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- submission -----------------------------------------------------------------------
    def submit(self, items: Sequence[Item], *, enforce_limit: bool = True,
               request: Request | None = None) -> list[Future]:
        """Queue all items or none (raises QueueFull). One Future[Verdict] per item, in order.
        The items share the pool as one `request` (a new one if not given)."""
        request = request or Request()
        jobs = [_Job(item=i, future=Future(), owner=request) for i in items]
        self._queue.put(jobs, self.max_queue if enforce_limit else None)
        return [j.future for j in jobs]

    async def run(self, items: Sequence[Item], *, enforce_limit: bool = True,
                  budget_s: float | None = None) -> list[Verdict]:
        """Verify items and wait for all verdicts, as one request with its fair share of the
        workers. With `budget_s`, items not answered within it answer `timeout`. Cancelling
        the caller cancels the request: queued items are dropped, a running one is killed."""
        request = Request(budget_s)
        futures = self.submit(items, enforce_limit=enforce_limit, request=request)
        waits = [asyncio.wrap_future(f) for f in futures]
        try:
            if budget_s is None:
                return list(await asyncio.gather(*waits))
            # The slots answer a spent request's items themselves; the margin covers the kill.
            await asyncio.wait(waits, timeout=budget_s + self.kill_grace_s + 1.0)
            return [w.result() if w.done() and not w.cancelled() else self._over_budget(request)
                    for w in waits]
        finally:
            if not all(f.done() for f in futures):
                self.cancel(request)
            for f in futures:
                f.cancel()  # no-op for finished or running items

    def cancel(self, request: Request) -> None:
        """Drop `request`'s queued items now; a slot running one of them kills its worker."""
        request.cancel()
        for job in self._queue.drop(request):
            if job.claimed or job.future.set_running_or_notify_cancel():
                self._set(job, self._over_budget(request))

    def run_sync(self, items: Sequence[Item], *, enforce_limit: bool = False) -> list[Verdict]:
        return [f.result() for f in self.submit(items, enforce_limit=enforce_limit)]

    # --- introspection -------------------------------------------------------------------
    def stats(self) -> PoolStats:
        with self._lock:
            c = dict(self._counts)
        return PoolStats(
            workers=self.workers,
            alive=sum(1 for s in self._slots if s.proc is not None and s.proc.is_alive()),
            busy=sum(1 for s in self._slots if s.busy),
            queue_depth=len(self._queue),
            **c,
        )

    def worker_pids(self) -> list[int]:
        return [s.proc.pid for s in self._slots if s.proc is not None and s.proc.pid]

    def busy_pids(self) -> list[int]:
        return [s.proc.pid for s in self._slots if s.busy and s.proc is not None and s.proc.pid]

    # --- called from slot threads -----------------------------------------------------------
    def _bump(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _finish(self, job: _Job, msg: sandbox.Result) -> None:
        self._queue.done(job)
        _, correct, reward, status, parsed_response, parsed_reference, detail, reward_error = msg
        if status == "timeout":
            self._bump("timeouts")
        self._bump("completed")
        self._set(job, Verdict(
            correct=correct, reward=reward, status=status, parsed_response=parsed_response,
            parsed_reference=parsed_reference, detail=detail, reward_error=reward_error,
            latency_ms=(time.monotonic() - job.submitted) * 1000.0,
        ))

    def _requeue(self, jobs: Sequence[_Job]) -> None:
        for j in jobs:
            self._queue.done(j)
        self._queue.put_front(list(jobs))

    @staticmethod
    def _over_budget(request: Request) -> Verdict:
        if request.expired:
            return Verdict(correct=False, reward=0.0, status="timeout",
                           detail=f"the request's budget of {request.budget_s:g}s was spent")
        return Verdict(correct=False, reward=0.0, status="error", detail="request cancelled")

    def _give_up(self, job: _Job) -> None:
        """Answer an item of a cancelled or over-budget request without checking it."""
        if job.owner.expired:
            self._bump("timeouts")
        self._set(job, self._over_budget(job.owner))
        self._queue.done(job)

    def _resolve(self, job: _Job, correct: bool, status: str, detail: str) -> None:
        self._queue.done(job)
        if status == "timeout":
            self._bump("timeouts")
        self._bump("completed")
        self._set(job, Verdict(
            correct=correct, reward=0.0, status=status, detail=detail,
            latency_ms=(time.monotonic() - job.submitted) * 1000.0,
        ))

    @staticmethod
    def _set(job: _Job, verdict: Verdict) -> None:
        if not job.future.done():
            job.future.set_result(verdict)

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
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from pydantic import Field

from protocol import rewards
from protocol.tasks.base import CheckResult
from services.verifier import sandbox

log = logging.getLogger(__name__)

# Imported once in the forkserver so every forked worker starts warm.
_PRELOAD = ["services.verifier.preload"]


class QueueFull(Exception):
    """The bounded queue has no room for the whole submission (nothing was queued)."""

    def __init__(self, depth: int, limit: int, retry_after_s: float) -> None:
        super().__init__(f"verification queue full ({depth}/{limit})")
        self.retry_after_s = retry_after_s


class PoolClosed(Exception):
    """Submitted to a pool that is shutting down."""


class Verdict(CheckResult):
    """A CheckResult plus the time the item spent in the service (queue + check)."""

    latency_ms: float = Field(0.0, description="submit-to-answer time in milliseconds")
    reward_error: str | None = Field(
        None, description="traceback of a user reward function that failed on this item "
        "(protocol/rewards.py); the bus worker dead-letters the group with it"
    )


@dataclass(frozen=True)
class Item:
    task: str
    response: str
    reference: str
    timeout_s: float
    # The run's reward plug-ins (protocol.rewards.Spec) and the prompt's row they receive;
    # None = grade with the task's checker alone.
    reward: rewards.Spec | None = None
    row: dict | None = None


@dataclass
class _Job:
    item: Item
    future: Future
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


class _Queue:
    """FIFO of jobs with a capacity check at submission and a front door for re-queued work."""

    def __init__(self) -> None:
        self._dq: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._dq)

    def put(self, jobs: Sequence[_Job], limit: int | None) -> None:
        with self._cv:
            if self._closed:
                raise PoolClosed("verification pool is closed")
            if limit is not None and len(self._dq) + len(jobs) > limit:
                raise QueueFull(len(self._dq), limit, retry_after_s=1.0)
            self._dq.extend(jobs)
            # Wake only as many slot threads as there is work for: each woken thread competes
            # for the GIL with the event loop.
            self._cv.notify(len(jobs))

    def put_front(self, jobs: Sequence[_Job]) -> None:
        with self._cv:
            self._dq.extendleft(reversed(jobs))
            self._cv.notify(len(jobs))

    def take(self, workers: int, batch_max: int) -> list[_Job] | None:
        """Block for work; return a fair share of the queue (≤ batch_max), None once closed."""
        with self._cv:
            while not self._dq and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            # Splitting the backlog evenly keeps every worker busy at low load and amortises
            # the IPC round trip at high load.
            n = max(1, min(batch_max, math.ceil(len(self._dq) / workers)))
            return [self._dq.popleft() for _ in range(min(n, len(self._dq)))]

    def close(self) -> list[_Job]:
        with self._cv:
            self._closed = True
            left = list(self._dq)
            self._dq.clear()
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
        backoff = 0.1
        while self.proc is None and not self.pool._stopping.is_set():
            try:
                self.spawn()
            except Exception:
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
                if j.claimed or j.future.set_running_or_notify_cancel():
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
                pool._queue.put_front(jobs)
                return
        batch = [(k, j.item.task, j.item.response, j.item.reference, j.item.timeout_s, j.item.reward, j.item.row)
                 for k, j in enumerate(jobs)]
        try:
            self.conn.send(batch)
        except (OSError, ValueError) as e:
            # The worker died while idle (e.g. killed from outside): nobody's item is at fault.
            self.discard(f"send failed: {e}")
            pool._queue.put_front(jobs)
            return
        pending = deque(jobs)
        started = time.monotonic()
        while pending:
            job = pending[0]
            left = started + job.item.timeout_s + pool.kill_grace_s - time.monotonic()
            if left <= 0 or not self.conn.poll(left):
                # Kill first, answer second: whoever sees the answer sees the pool already
                # rid of the hung process.
                self.discard("item overran its deadline")
                pending.popleft()
                pool._resolve(job, False, "timeout", f"killed after the {job.item.timeout_s:g}s deadline")
                pool._queue.put_front(list(pending))
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
                pool._queue.put_front(list(pending))
                self.ensure_worker()
                return
            if msg[0] == "bye":
                self.discard(f"planned exit ({msg[1]})", count=msg[1] != "recycled")
                pool._queue.put_front(list(pending))
                self.ensure_worker()
                return
            pending.popleft()
            pool._finish(job, msg)
            # The worker starts the next item the moment it sends this result.
            started = time.monotonic()

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
        spawn_timeout_s: float = 120.0,
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
        self.spawn_timeout_s = spawn_timeout_s
        self.ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self.ctx.set_forkserver_preload(_PRELOAD)
        self._queue = _Queue()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._counts = {"restarts": 0, "timeouts": 0, "crashes": 0, "completed": 0}
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
    def submit(self, items: Sequence[Item], *, enforce_limit: bool = True) -> list[Future]:
        """Queue all items or none (raises QueueFull). One Future[Verdict] per item, in order."""
        jobs = [_Job(item=i, future=Future()) for i in items]
        self._queue.put(jobs, self.max_queue if enforce_limit else None)
        return [j.future for j in jobs]

    async def run(self, items: Sequence[Item], *, enforce_limit: bool = True) -> list[Verdict]:
        """Verify items and wait for all verdicts. Cancelling the caller drops queued items."""
        futures = self.submit(items, enforce_limit=enforce_limit)
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        finally:
            for f in futures:
                f.cancel()  # no-op for finished or running items

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
        _, correct, reward, status, parsed_response, parsed_reference, detail, reward_error = msg
        if status == "timeout":
            self._bump("timeouts")
        self._bump("completed")
        self._set(job, Verdict(
            correct=correct, reward=reward, status=status, parsed_response=parsed_response,
            parsed_reference=parsed_reference, detail=detail, reward_error=reward_error,
            latency_ms=(time.monotonic() - job.submitted) * 1000.0,
        ))

    def _resolve(self, job: _Job, correct: bool, status: str, detail: str) -> None:
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

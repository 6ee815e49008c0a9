"""`rlrt serve verifier`: the REST API and the bus worker in one process, over one pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable

from protocol.bus import Bus
from protocol.config import BusSettings, redact_url
from services.common import serve, setup_logging
from services.verifier import worker
from services.verifier.api import build_app
from services.verifier.config import VerifierConfig
from services.verifier.jobs import JobStore
from services.verifier.pool import PoolBroken, VerifyPool
from tasks import rewards
from tasks.rewards import RewardSettings

log = logging.getLogger("rlrt.verifier")
JOBS_STREAM = "verifier:jobs"


def make_pool(cfg: VerifierConfig) -> VerifyPool:
    return VerifyPool(cfg.workers, memory_mb=cfg.memory_mb, max_queue=cfg.max_queue,
                      kill_grace_s=cfg.kill_grace_s, batch_max=cfg.ipc_batch,
                      max_items_per_worker=cfg.max_items_per_worker,
                      max_worker_rss_mb=cfg.max_worker_rss_mb,
                      spawn_budget_s=cfg.worker_start_budget_s)


async def watch_pool(pool: VerifyPool, stop: asyncio.Event, every_s: float = 1.0) -> None:
    """Raise PoolBroken (ending the service with its reason) once the pool cannot start
    workers: every verification would otherwise wait forever, and the run with it."""
    while not stop.is_set():
        if pool.broken is not None:
            raise PoolBroken(f"{pool.broken}; stopping so that the supervisor restarts the service")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


async def serve_verifier(cfg: VerifierConfig, bus_cfg: BusSettings | None = None,
                         stop: asyncio.Event | None = None, reward: RewardSettings | None = None) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT): pool, HTTP API, job runner, bus worker.
    `reward` (the run's `reward:` section) grades the bus worker's groups when it is set."""
    bus_cfg = bus_cfg or BusSettings()
    spec = reward.spec() if reward is not None else None
    if spec is not None:
        rewards.locate(spec)  # a typo in a module name fails here, once
        # read by the pool's forkserver when it starts (below), never imported here
        os.environ[rewards.PRELOAD_ENV] = rewards.preload_names(spec)
    url = cfg.redis_url or bus_cfg.redis_url
    pool = make_pool(cfg)
    # Forking the workers blocks for a moment (first time: the forkserver imports sympy).
    await asyncio.to_thread(pool.start)
    bus = Bus.from_url(url, bus_cfg) if url else None
    jobs = None
    workers: list[Callable[[asyncio.Event], Awaitable[object]]] = [lambda s: watch_pool(pool, s)]
    if bus is None:
        log.warning("no Redis URL: serving /v1/verify only (no jobs, no bus worker)")
    else:
        jobs = JobStore(bus, pool, stream=bus_cfg.stream(JOBS_STREAM), ttl_s=cfg.job_ttl_s, chunk=cfg.job_chunk)
        workers.append(lambda s: jobs.consume(cfg.group, cfg.consumer, s, concurrency=cfg.job_concurrency))
        if cfg.worker:
            workers.append(lambda s: worker.consume(
                bus, pool, s, in_stream=bus_cfg.stream(cfg.in_stream), out_stream=bus_cfg.stream(cfg.out_stream),
                group=cfg.group, consumer=cfg.consumer, timeout_s=cfg.default_timeout_s,
                concurrency=cfg.concurrency, reward=spec, policy_for=cfg.math_policy_for))

    async def ready() -> dict:
        # /v1/verify needs only the pool, so a Redis outage does not make the verifier unready
        # (an orchestrator would stop routing REST traffic to it); it is reported, and the job
        # runner and bus worker wait for Redis and resume by themselves.
        state: dict = {"ready": pool.ready}
        if pool.broken is not None:
            state["broken"] = pool.broken
        if bus is not None:
            state["redis"] = await bus.reachable()
        return state

    app = build_app(cfg, pool, jobs, ready=ready, reward=spec)
    log.info("verifier on http://%s:%d (%d workers, redis %s)", cfg.host, cfg.port, cfg.workers, redact_url(url))
    try:
        if cfg.http:
            await serve(app, cfg.host, cfg.port, workers, stop=stop)
        else:  # worker-only replica
            await serve_workers(workers, stop or asyncio.Event())
    finally:
        # After the HTTP server and the workers have finished their in-flight work.
        if bus is not None:
            await bus.close()
        await asyncio.to_thread(pool.close)


async def serve_workers(workers: list[Callable[[asyncio.Event], Awaitable[object]]], stop: asyncio.Event) -> None:
    """Run the workers without HTTP until `stop` or SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await asyncio.gather(*(w(stop) for w in workers))


def run_verifier(cfg: VerifierConfig, bus_cfg: BusSettings | None = None,
                 reward: RewardSettings | None = None) -> None:
    """Blocking entry point of `rlrt serve verifier --config FILE [--host H] [--port P]`."""
    setup_logging()
    asyncio.run(serve_verifier(cfg, bus_cfg, reward=reward))

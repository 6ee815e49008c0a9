"""Run a service: its HTTP app and its bus workers in one event loop, stopped gracefully.

On SIGTERM/SIGINT the workers stop taking new messages and finish the ones in flight
(unfinished ones stay pending in Redis for another consumer), then the HTTP server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from fastapi import FastAPI

from services.common.app import check_exposure

log = logging.getLogger("rlrt.serve")
Worker = Callable[[asyncio.Event], Awaitable[object]]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # we install our own handlers
        yield


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def serve(app: FastAPI, host: str, port: int, workers: list[Worker] | None = None,
                *, stop: asyncio.Event | None = None,
                on_shutdown: Callable[[], Awaitable[None]] | None = None,
                log_level: str = "warning") -> None:
    check_exposure(app, host)  # no token: loopback only (raises UnsafeBind otherwise)
    stop = stop or asyncio.Event()
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                    lifespan="on", timeout_graceful_shutdown=10))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    http = asyncio.create_task(server.serve(), name="http")
    tasks = [asyncio.create_task(w(stop), name=f"worker{i}") for i, w in enumerate(workers or [])]
    stopper = asyncio.create_task(stop.wait())
    # End on a stop signal, or when the HTTP server or a worker dies (then stop the rest).
    done, _ = await asyncio.wait([http, stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    failure = None
    for t in done:
        if t is not stopper and not t.cancelled() and t.exception() is not None:
            failure = t.exception()
            log.error("%s failed: %r", t.get_name(), failure)
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    server.should_exit = True
    await asyncio.gather(http, return_exceptions=True)
    if on_shutdown is not None:
        await on_shutdown()
    stopper.cancel()
    if failure is not None:
        raise failure


def run_service(app: FastAPI, host: str, port: int, workers: list[Worker] | None = None,
                **kw: object) -> None:
    """Blocking entry point used by `rlrt serve ...`."""
    asyncio.run(serve(app, host, port, workers, **kw))  # type: ignore[arg-type]

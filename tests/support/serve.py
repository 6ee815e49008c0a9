"""Run an ASGI app under a real uvicorn server on 127.0.0.1 (ephemeral port) in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator

import uvicorn
from support.polling import wait_until, wait_until_async


class _Quiet(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # a thread cannot own signal handlers
        pass

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.contextmanager
def serve_app(app: object, *, graceful_s: float = 1.0) -> Iterator[str]:
    """Yield the base URL (`http://127.0.0.1:PORT`) while `app` is served."""
    server = _Quiet(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error",
                                   lifespan="off", timeout_graceful_shutdown=graceful_s))
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn-test")
    thread.start()

    def started() -> bool:
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited during startup")
        return server.started

    wait_until(started, 30, "uvicorn to start", every_s=0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=graceful_s + 10)


@contextlib.asynccontextmanager
async def serve_app_here(app: object) -> AsyncIterator[str]:
    """Serve `app` with uvicorn inside the *current* event loop (for apps whose objects --
    engines, locks, HTTP clients -- belong to the test's loop). Yields the base URL."""
    server = _Quiet(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error",
                                   lifespan="off", timeout_graceful_shutdown=1))
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        if task.done():
            task.result()  # raises the startup error
            raise RuntimeError("uvicorn exited during startup")
        return server.started

    await wait_until_async(started, 30, "uvicorn to start", every_s=0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task



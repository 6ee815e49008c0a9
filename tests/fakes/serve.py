"""Run an ASGI app under a real uvicorn server on 127.0.0.1 (ephemeral port) in a thread."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import uvicorn


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
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited during startup")
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start within 30 s")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=graceful_s + 10)

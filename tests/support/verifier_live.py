"""Real verifier servers for tests: uvicorn on 127.0.0.1 (in a thread, or as a subprocess
through the `rlrt serve verifier` CLI), a real pool, real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
import yaml
from support.polling import wait_until

from protocol.bus import Bus
from protocol.config import BusSettings
from rlrt.processes import free_port
from services.verifier import worker
from services.verifier.api import build_app
from services.verifier.config import VerifierConfig
from services.verifier.jobs import JobStore
from services.verifier.main import JOBS_STREAM
from services.verifier.pool import VerifyPool

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Live:
    url: str
    pool: VerifyPool
    cfg: VerifierConfig
    bus_cfg: BusSettings | None


@contextlib.contextmanager
def live_verifier(cfg: VerifierConfig, pool: VerifyPool, *, redis_url: str | None = None,
                  prefix: str = "rlrt", bus_worker: bool = False) -> Iterator[Live]:
    """The verifier app (plus job runner, optionally the bus worker) on a uvicorn server in a
    background thread, listening on a free 127.0.0.1 port it bound itself (no port race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    bus_cfg = BusSettings(redis_url=redis_url, prefix=prefix, block_ms=50, claim_idle_ms=2000,
                          retry_backoff_s=0.01) if redis_url else None
    started = threading.Event()
    state: dict = {}

    async def main() -> None:
        stop = asyncio.Event()
        state["loop"], state["stop"] = asyncio.get_running_loop(), stop
        bus = Bus.from_url(redis_url, bus_cfg) if bus_cfg else None
        jobs = (JobStore(bus, pool, stream=bus_cfg.stream(JOBS_STREAM), ttl_s=cfg.job_ttl_s, chunk=cfg.job_chunk)
                if bus else None)
        app = build_app(cfg, pool, jobs)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        tasks = [asyncio.create_task(server.serve(sockets=[sock]))]
        if jobs is not None:
            tasks.append(asyncio.create_task(jobs.consume(cfg.group, cfg.consumer, stop, concurrency=2)))
        if bus is not None and bus_worker:
            tasks.append(asyncio.create_task(worker.consume(
                bus, pool, stop, in_stream=bus_cfg.stream(cfg.in_stream), out_stream=bus_cfg.stream(cfg.out_stream),
                group=cfg.group, consumer=cfg.consumer, timeout_s=cfg.default_timeout_s, concurrency=4)))
        while not server.started:
            await asyncio.sleep(0.01)
        started.set()
        await stop.wait()
        server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        if bus is not None:
            await bus.close()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    if not started.wait(30):
        raise RuntimeError("verifier test server did not start")
    try:
        yield Live(f"http://127.0.0.1:{port}", pool, cfg, bus_cfg)
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)
        sock.close()




class VerifierProcess:
    """`python -m rlrt.cli serve verifier --config FILE --port P` as a child process."""

    def __init__(self, tmp: Path, redis_url: str, prefix: str, **verifier: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / f"verifier-{self.port}.yaml"
        self.config.write_text(yaml.safe_dump({
            "bus": {"redis_url": redis_url, "prefix": prefix, "block_ms": 50, "claim_idle_ms": 60_000},
            "verifier": {"consumer": "verifier-test", **verifier},
        }))
        self.log = tmp / f"verifier-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> VerifierProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlrt.cli", "serve", "verifier", "--config", str(self.config),
             "--port", str(self.port)],
            cwd=REPO, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,  # so kill() can take the worker processes down with it
        )

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"verifier exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
            return False

        try:
            wait_until(ready, timeout_s, "the verifier to be ready", every_s=0.1)
        except AssertionError:
            self.kill()
            raise RuntimeError(f"verifier not ready in {timeout_s}s: {self.log.read_text()[-3000:]}") from None
        return self

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, not a shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.kill()

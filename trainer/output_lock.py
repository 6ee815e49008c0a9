"""One holder per directory: an exclusive flock on a lock file that names its holder's pid.

Used for the trainer's output folder (`<output_dir>/trainer.lock`): two runs writing one
folder interleave metrics.jsonl (steps 0,1,0,2,1,...), train tasks twice and overwrite each
other's checkpoints and weight directories, every process reporting success. The embedded
Redis's directory is locked the same way (rlrt/redis_server.py). The kernel drops a flock when
its holder dies, however it dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

LOCK_FILE = "trainer.lock"


class DirBusy(RuntimeError):
    """Another live process holds the directory's lock."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


def take_lock(path: str | os.PathLike, wait_s: float = 0.0) -> int:
    """An open descriptor holding an exclusive flock on `path` (created if need be), with this
    process's pid written in it; the holder's pid as `DirBusy.holder` (the message says only
    that much: callers phrase what it means) when it is still held after `wait_s`."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            write_holder(fd, os.getpid())
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise DirBusy(f"{path} is held by pid {holder}", holder) from None
            time.sleep(0.1)


def write_holder(fd: int, pid: int) -> None:
    """Name `pid` as the holder (a child that inherits the descriptor may hold it for us)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{pid}\n".encode(), 0)


class OutputLock:
    """The trainer's output folder, held for the life of a run (rank 0 only: the other ranks
    write into the folder rank 0 holds). A context manager."""

    def __init__(self, out: str | os.PathLike, wait_s: float = 10.0) -> None:
        # wait_s: a killed run's trainer may still be finishing its last step and checkpoint.
        self.out = Path(out)
        self.wait_s = wait_s
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self.fd = take_lock(self.out / LOCK_FILE, self.wait_s)
        except DirBusy as e:
            raise DirBusy(
                f"another trainer (pid {e.holder}) is writing to {self.out.resolve()}: one run "
                "per output folder (two would mix their metrics, tasks and checkpoints). Give "
                "this run its own trainer.output_dir, or stop the other one", e.holder) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

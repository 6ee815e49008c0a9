"""Child processes of a local run: start, health-check, restart, stop — never leave orphans.

Each child runs in its own session (so a terminal Ctrl-C reaches only the launcher, which
then stops the children in order) and is asked by the kernel to die with its parent
(PR_SET_PDEATHSIG), so even a SIGKILLed launcher leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# Not Linux: a no-op, and Ctrl-C handling in the launcher still stops the children.
from rlrt.redis_server import die_with_parent as _die_with_parent

# Rendezvous variables a caller that ran torch.distributed itself (a notebook, a test) may
# leave in the environment: they would point a child (the trainer, a vLLM server) at that
# caller's store port. trainer/dist.py picks a free one without them.
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Child:
    """One supervised process. `ready_url` answers 200 once it can work."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path | None = None  # None: inherit the launcher's terminal
    ready_url: str | None = None
    proc: subprocess.Popen | None = None
    restarts: int = 0
    _log: object = field(default=None, repr=False)
    _log_from: int = 0  # where this start's output begins in the (appended) log

    def start(self) -> None:
        out = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            self._log_from = self.log_path.stat().st_size
            out = self._log
        self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT if out else None,
                                     start_new_session=True, preexec_fn=_die_with_parent)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float) -> None:
        """Block until ready_url answers 200; raise with the log tail if the child dies or
        the deadline passes."""
        if self.ready_url is None:
            return
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode if self.proc else '?'}"
                                   f" while starting:\n{self.log_tail()}")
            try:
                if httpx.get(self.ready_url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s ({self.ready_url}):\n"
                                   f"{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, n: int = 2000) -> str:
        """The end of what this start wrote to its log, from a line's start: a previous run's
        lines (the log is appended to) would tell another story."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()[self._log_from:]
        if not data.strip():
            return f"(nothing in its log {self.log_path} from this start)"
        if len(data) > n:
            data = data[-n:]
            data = data[data.find(b"\n") + 1:]  # from a whole line
        return data.decode(errors="replace")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful: finish in-flight work), then SIGKILL after the timeout."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None
        return self.proc.returncode if self.proc else None


def rlrt_argv(*args: str) -> list[str]:
    """Run an `rlrt` sub-command with this interpreter (works without the console script)."""
    return [sys.executable, "-m", "rlrt.cli", *args]

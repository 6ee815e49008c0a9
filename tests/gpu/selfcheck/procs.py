"""Starting the check's roles as subprocesses (each its own interpreter, as the trainer and
the engine are) and reading their one-line JSON answers, always within a deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from support.polling import answers, wait_until

ROOT = Path(__file__).resolve().parents[3]


def role_env(*, cpu: bool, hostid: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(ROOT / "tests/gpu"),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["RLRT_GPU_CHECK_CPU"] = "1" if cpu else "0"
    # Several ranks share one GPU: NCCL refuses two ranks of one communicator on one device
    # of one host ("Duplicate GPU detected") unless each process claims its own host.
    env["NCCL_HOSTID"] = hostid
    env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    if cpu:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def start(module: str, *args: object, cpu: bool, hostid: str, log_dir: Path) -> subprocess.Popen:
    """Run `python -m selfcheck.MODULE ARGS`; its stderr goes to LOG_DIR/HOSTID.log."""
    log = log_dir / f"{hostid}.log"
    with log.open("w") as err:
        p = subprocess.Popen([sys.executable, "-m", f"selfcheck.{module}", *map(str, args)],
                             cwd=ROOT, env=role_env(cpu=cpu, hostid=hostid),
                             stdout=subprocess.PIPE, stderr=err, text=True)
    p.rlrt_log = log  # type: ignore[attr-defined]
    return p


def answer(p: subprocess.Popen, timeout_s: float) -> dict[str, Any]:
    """The role's JSON line; raises (with its log's tail) if it failed or overran."""
    try:
        out, _ = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop(p)
        raise TimeoutError(f"{p.args[2]}: no answer within {timeout_s:.0f} s; {_tail(p)}") \
            from None
    lines = [x for x in out.strip().splitlines() if x.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{p.args[2]} exited {p.returncode}; {_tail(p)}")
    return dict(json.loads(lines[-1]))


def _tail(p: subprocess.Popen) -> str:
    log: Path = p.rlrt_log  # type: ignore[attr-defined]
    return f"{log} ends: {log.read_text()[-1500:]}" if log.exists() else f"no {log}"


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()


def wait_http(url: str, p: subprocess.Popen, timeout_s: float) -> None:
    """Until `url` answers (the receiver is up); at once when the process exited instead."""
    try:
        wait_until(lambda: answers(url), timeout_s, url, proc=p)
    except AssertionError as e:
        raise RuntimeError(f"receiver exited or not up: {e}; {_tail(p)}") from None

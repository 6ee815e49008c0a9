"""Stopping the trainer on Ctrl-C (or SIGTERM to `rlrt train`) without losing its work.

The trainer, on SIGTERM, finishes the step it is in (or leaves the wait for groups at once),
writes a checkpoint at the last completed step and exits (trainer/main.py). A step may take
minutes (SmolLM2-135M on 2 CPU cores: about 6), so a fixed grace period killed it mid-step
with no checkpoint. Here the grace period follows the measured step time (the slowest step of
metrics.jsonl plus its checkpoint, three times over, at least `min_grace_s`); before any step
has completed there is no measure, and the launcher waits as long as the step takes. A second
Ctrl-C abandons the step: the trainer is killed and the last checkpoint is what remains. The
last line says which checkpoint that is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from rlrt.processes import Child

MIN_GRACE_S = 120.0


def step_seconds(metrics_jsonl: Path) -> float | None:
    """The slowest completed step's time plus its checkpoint time, from metrics.jsonl (None
    before the first step)."""
    try:
        lines = metrics_jsonl.read_text().splitlines()
    except OSError:
        return None
    worst = None
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        t = float(rec.get("time_step_s", 0.0)) + float(rec.get("time_ckpt_s", 0.0))
        worst = t if worst is None else max(worst, t)
    return worst


def grace_s(metrics_jsonl: Path, min_grace_s: float = MIN_GRACE_S) -> float | None:
    """How long to wait for the trainer after SIGTERM: None = as long as its step takes."""
    t = step_seconds(metrics_jsonl)
    return None if t is None else max(min_grace_s, 3 * t + 30)


def latest_checkpoint(root: Path) -> tuple[int, Path, float] | None:
    """(step, directory, modification time) of the checkpoint `latest.json` names."""
    p = root / "latest.json"
    try:
        info = json.loads(p.read_text())
        return int(info["step"]), root / str(info["tag"]), p.stat().st_mtime
    except (OSError, ValueError, KeyError):
        return None


def stop_trainer(child: Child, *, metrics_jsonl: Path, checkpoint_root: Path,
                 log: Callable[[str], None], min_grace_s: float = MIN_GRACE_S) -> str:
    """SIGTERM the trainer, wait for its checkpoint (see module doc), and return the line
    saying what was saved."""
    proc = child.proc
    if proc is None or proc.poll() is not None:
        return _saved(checkpoint_root, since=None)
    t0 = time.time()
    grace = grace_s(metrics_jsonl, min_grace_s)
    log("stopping the trainer: it finishes its current step and writes a checkpoint "
        + (f"(waiting up to {grace:.0f} s: 3x its slowest step so far)" if grace is not None
           else "(no step has completed yet: waiting as long as the step takes)")
        + "; Ctrl-C again abandons the step (no new checkpoint)")
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        log(f"the trainer did not stop within {grace:.0f} s: killing it")
        _kill(proc)
    except KeyboardInterrupt:
        log("second Ctrl-C: killing the trainer mid-step")
        _kill(proc)
    child.stop(timeout_s=0)  # closes its log
    return _saved(checkpoint_root, since=t0)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _saved(root: Path, since: float | None) -> str:
    ckpt = latest_checkpoint(root)
    if ckpt is None:
        return f"no checkpoint was written (none in {root}): a resumed run starts from step 0"
    step, path, mtime = ckpt
    when = "written now" if since is not None and mtime >= since else "the last one"
    return f"saved: checkpoint at step {step} ({when}) in {path}"

"""A full disk, named by the launcher (issue 26).

The trainer names a full disk itself (trainer/disk.py, exit status EXIT_DISK_FULL). A run
resumed while the disk is still full fails before the trainer starts: a service or Redis dies
while starting without a word in its log (there is no room for one), and what the launcher
showed was the previous run's log tail. So `rlrt train` asks the kernel before it starts
anything, and again when a part dies while starting: `disk_full_at` writes a probe file on
each of the run's file systems and reports the first that refuses it (ENOSPC/EDQUOT; free-space
figures would mislead: root's reserved blocks, quotas). `disk_full_line` is the one line to end
on: where, how much is free, the checkpoint kept, the command to run once space is freed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.disk import free_space, is_disk_full, kept_checkpoint

if TYPE_CHECKING:
    from rlrt.plan import RunPlan

PROBE = ".space-check"  # written and removed in each directory checked
PROBE_BYTES = 1 << 20  # more than a log line or a small JSON file needs: room to start


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_full_at(paths: Iterable[str | os.PathLike]) -> Path | None:
    """The first of `paths` (directories; their nearest existing parent) where a
    PROBE_BYTES write is refused for lack of space, or None when each has room."""
    seen = set()
    for path in paths:
        d = _existing(Path(path).resolve())
        if d.stat().st_dev in seen:  # one probe per file system
            continue
        seen.add(d.stat().st_dev)
        probe = d / PROBE
        try:
            with open(probe, "wb") as f:
                f.write(bytes(PROBE_BYTES))
                f.flush()
                os.fsync(f.fileno())  # a delayed-allocation file system refuses only here
        except OSError as e:
            if is_disk_full(e):
                return d
            # not a space problem (permissions, a read-only mount): what fails next says so
        finally:
            probe.unlink(missing_ok=True)
    return None


def disk_paths(plan: RunPlan) -> list[Path]:
    """Where the run writes: its folder (logs, Redis's AOF) and the trainer's outputs (which
    trainer.output_dir may put on another disk)."""
    return [plan.run_dir, plan.trainer_out, plan.checkpoint_root]


def disk_full_line(plan: RunPlan, path: str | os.PathLike) -> str:
    """The line a run stopped by a full disk at `path` ends with."""
    return (f"disk full at {path} ({free_space(path)} free there); kept: "
            f"{kept_checkpoint(plan.checkpoint_root)}. Free space on that disk, then: "
            f"{plan.resume_command}")

"""A full disk, named as such.

A write that fails with ENOSPC (or a quota's EDQUOT) deep inside DeepSpeed, the metrics sink or
the JSON writers would otherwise surface as a traceback, or as a consequence (Redis refusing
writes, so the run "lost Redis"). `DiskFull` says which path, how much is free there and what
was kept (the last good checkpoint), so the next step is obvious: free space, resume.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

_FULL = (errno.ENOSPC, errno.EDQUOT)
# The trainer process's exit status after a full disk (`rlrt run-trainer`), so the launcher
# names the disk rather than a consequence of it (Redis refusing writes).
EXIT_DISK_FULL = 4


def is_disk_full(e: BaseException) -> bool:
    """`e` (or what it wraps) is a write refused for lack of space."""
    while e is not None:
        if isinstance(e, DiskFull) or (isinstance(e, OSError) and e.errno in _FULL):
            return True
        e = e.__cause__ or e.__context__  # DeepSpeed and torch re-raise as RuntimeError
    return False


def free_space(path: str | os.PathLike) -> str:
    """Free space on the file system holding `path` (its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "unknown space"
    return f"{free / 2**20:.1f} MiB" if free < 2**30 else f"{free / 2**30:.2f} GiB"


def kept_checkpoint(root: str | os.PathLike) -> str:
    """What a resume would start from: the checkpoint `latest.json` names."""
    latest = Path(root) / "latest.json"
    try:
        info = json.loads(latest.read_text())
        return f"checkpoint {Path(root) / info['tag']} (step {info['step']})"
    except (OSError, ValueError, KeyError):
        return f"no checkpoint in {root}"


class DiskFull(RuntimeError):
    """A write failed for lack of space. The message is the whole story in one line."""

    def __init__(self, path: str | os.PathLike, kept: str, doing: str = "writing") -> None:
        self.path = str(path)
        super().__init__(
            f"disk full: no space left on the device {doing} {self.path} "
            f"({free_space(self.path)} free there); kept: {kept}. Free space on that disk, "
            "then resume (--resume continues from the kept checkpoint)")


def disk_full(e: BaseException, fallback_path: str | os.PathLike,
              checkpoint_root: str | os.PathLike) -> DiskFull:
    """`e`, a disk-full error from anywhere in the trainer, as a DiskFull naming its path."""
    if isinstance(e, DiskFull):
        return e
    path = fallback_path
    while e is not None:
        if isinstance(e, OSError) and e.filename:
            path = e.filename
            break
        e = e.__cause__ or e.__context__
    return DiskFull(path, kept_checkpoint(checkpoint_root))

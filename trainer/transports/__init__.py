"""Weight transports: how the trainer's weights reach the services (base.py: the interface).
`make_transport` builds the one the `push` section's mode selects."""

from __future__ import annotations

from pathlib import Path

from trainer.config import DiskPush, NcclPush
from trainer.transports.base import Collectives, PushResult, WeightTransport
from trainer.transports.disk import DiskTransport, WeightPusher
from trainer.transports.fallback import NcclWithDiskFallback
from trainer.transports.nccl import NcclTransport


def make_transport(cfg: DiskPush, weights_root: str | Path, run_id: str,
                   extra_files: dict[str, bytes | str] | None = None) -> WeightTransport:
    """The transport of `cfg` (the push section: DiskPush or NcclPush, chosen by its mode).
    Weight directories go under `weights_root`, with `extra_files` (e.g. config.json)."""
    disk = DiskTransport(cfg, WeightPusher(cfg, weights_root, run_id, extra_files))
    if isinstance(cfg, NcclPush):
        return NcclWithDiskFallback(cfg, NcclTransport(), disk)
    return disk


__all__ = ["Collectives", "DiskTransport", "NcclTransport", "NcclWithDiskFallback",
           "PushResult", "WeightPusher", "WeightTransport", "make_transport"]

"""NCCL with a disk fallback: what `push.mode: nccl` runs (GPU).

The first push of a process, and every `disk_every`-th, go by disk: the directory a failed
NCCL update rolls back to (docs/engines.md). Every other push goes by NCCL; a service whose
NCCL update failed gets the same version by disk at once, and the result says both reasons
when that fails too.
"""

from __future__ import annotations

from protocol.canary import Canary
from trainer.config import NcclPush, ServiceEndpoint
from trainer.transports.base import Collectives, PushResult, WeightTransport
from trainer.transports.disk import DiskTransport
from trainer.transports.nccl import NcclTransport


class NcclWithDiskFallback(WeightTransport):
    def __init__(self, cfg: NcclPush, nccl: NcclTransport, disk: DiskTransport) -> None:
        self.cfg = cfg
        self.nccl = nccl
        self.disk = disk

    def by_disk(self, index: int) -> bool:
        """Push number `index` (0 = the first) goes by disk."""
        return index == 0 or bool(self.cfg.disk_every and index % self.cfg.disk_every == 0)

    @property
    def in_flight(self) -> bool:
        return self.disk.in_flight

    async def settle(self) -> PushResult | None:
        return await self.disk.settle()

    async def close(self) -> None:
        await self.disk.close()

    async def catch_up(self, services: list[ServiceEndpoint], version: int, ranks: Collectives,
                       canary: Canary | None) -> PushResult:
        return await self.disk.catch_up(services, version, ranks, canary)

    async def push(self, version: int, ranks: Collectives, *, index: int,
                   canary: Canary | None) -> PushResult:
        if self.by_disk(index):
            return await self.disk.push(version, ranks, index=index, canary=canary)
        res = await self.nccl.push(version, ranks, index=index, canary=canary)
        if res.failed:  # the same version by disk, for those services only
            retry = [s for s in self.cfg.services if s.name in res.failed]
            disk = await self.disk.push_to(retry, version, ranks, canary)
            res.ok += disk.ok
            res.canary_refused.update(disk.canary_refused)
            res.failed = {k: f"{v}; disk fallback: {disk.failed[k]}"
                          for k, v in res.failed.items() if k in disk.failed}
        return res

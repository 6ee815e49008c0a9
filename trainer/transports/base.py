"""The interface every weight transport implements, and what it may ask of the ranks.

A transport takes the policy's weights at version v to the services (rollout, teacher):
disk (trainer/transports/disk.py), NCCL (nccl.py), NCCL with a disk fallback (fallback.py).
`make_transport` (trainer/transports/__init__.py) builds the one the `push` section's mode
names (trainer/config.py, a pydantic discriminated union). A transport lives on rank 0; the
work that needs every rank (gathering ZeRO-3 shards, the NCCL broadcast) it asks of
`Collectives`, which rank 0 announces to the other ranks (trainer/main.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol

import torch

from protocol.canary import Canary
from trainer.config import ServiceEndpoint


@dataclass
class PushResult:
    """What one push did, per service (reported in the metrics)."""

    version: int
    location: str | None = None
    sha256: str | None = None
    ok: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    # services that loaded the weights but refused them because the weight canary did not
    # match (max_diff, tolerance, ...): they serve another version, or nothing (consistent)
    canary_refused: dict[str, dict] = field(default_factory=dict)
    write_s: float = 0.0
    notify_s: float = 0.0


class Collectives(Protocol):
    """The collective operations a transport may need, run by every rank (rank 0 announces
    them; trainer/main.py). Each returns its result on rank 0."""

    async def gather_weights(self) -> dict[str, torch.Tensor]:
        """The full weights in the push dtype, as CPU tensors."""
        ...

    async def broadcast_nccl(self, version: int, canary: Canary | None) -> PushResult:
        """One NCCL update of every service (trainer/transports/nccl.py, nccl_push_all)."""
        ...


class WeightTransport(ABC):
    """Takes version v's weights to the services. Never raises for a service's failure: the
    result reports it (the caller decides, push.on_failure)."""

    @abstractmethod
    async def push(self, version: int, ranks: Collectives, *, index: int,
                   canary: Canary | None) -> PushResult:
        """Push `version` (with its weight canary, protocol/canary.py). `index` counts this
        process's pushes: 0 is the first, which may go *back* in version (a resumed run whose
        services loaded a killed run's later weights). A push may return before the services
        have loaded it (`in_flight`): `settle()` waits for that."""

    async def catch_up(self, services: list[ServiceEndpoint], version: int, ranks: Collectives,
                       canary: Canary | None) -> PushResult:
        """Push `version` -- the weights the trainer holds now -- to `services` only, and wait
        for them: services found serving older weights than they were pushed (a restart, or
        a push whose retries gave up while they were down). By disk, whatever the mode: a
        restarted engine has no NCCL group to receive into."""
        raise NotImplementedError(f"{type(self).__name__} cannot catch a service up")

    @property
    def in_flight(self) -> bool:
        """A push is still being loaded by the services in the background."""
        return False

    async def settle(self) -> PushResult | None:
        """Wait for the push loading in the background, if any, and return its result."""
        return None

    async def close(self) -> None:
        """Release what the transport holds open between pushes (HTTP connections)."""
        return None

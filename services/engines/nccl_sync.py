"""The NCCL weight-update protocol between the trainer and an engine server, service side.

The trainer (rank 0) broadcasts tensors straight into the engine's GPUs; the service only
drives the engine's HTTP endpoints with the *metadata* of each bucket. Everything the two
sides must agree on is in the `WeightUpdate` of `POST /v1/weights`:

    format   = "nccl"
    location = "HOST:PORT"           the trainer's TCP rendezvous (it is rank 0 / the master)
    version  = new policy version
    meta     = {"nccl": NcclSpec}    group size/name and the bucket list, in broadcast order

Wire sequence, timing and the trainer's half: docs/engines.md. The wire format itself
(`NcclSpec`, `Bucket`, `plan_buckets`) lives in protocol/weights.py, shared with the trainer;
this module validates an update and names its group.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

from protocol.messages import WeightUpdate
from protocol.weights import Bucket, NcclSpec
from services.engines.base import WeightUpdateError

__all__ = ["Bucket", "GroupKey", "NcclSpec", "nccl_from_packages", "nccl_spec", "parse_location"]


class GroupKey(BaseModel):
    model_config = ConfigDict(frozen=True)

    master_address: str
    master_port: int
    world_size: int
    group_name: str

    def __str__(self) -> str:
        return f"{self.master_address}:{self.master_port}/{self.group_name}x{self.world_size}"


def parse_location(location: str) -> tuple[str, int]:
    host, sep, port = location.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise WeightUpdateError(f"nccl location must be HOST:PORT, got {location!r}")
    return host.strip("[]"), int(port)


def nccl_spec(update: WeightUpdate) -> tuple[NcclSpec, GroupKey]:
    """Validate an nccl WeightUpdate. Raises WeightUpdateError (before anything is touched)."""
    raw = update.meta.get("nccl")
    if not isinstance(raw, dict):
        raise WeightUpdateError('format "nccl" needs meta["nccl"] with world_size and buckets')
    try:
        spec = NcclSpec.model_validate(raw)
    except ValueError as e:
        raise WeightUpdateError(f'bad meta["nccl"]: {e}') from None
    host, port = parse_location(update.location)
    return spec, GroupKey(master_address=host, master_port=port, world_size=spec.world_size,
                          group_name=spec.group_name)


# The engine's NCCL version, set for the worker by deploy/docker/with_engine.py when it runs
# the engine server beside it (read from the engine's own Python environment). How an SGLang
# service knows its server's NCCL: the server does not report it.
ENGINE_NCCL_ENV = "RLRT_ENGINE_NCCL_VERSION"


def nccl_from_packages(pip_list: str) -> str | None:
    """The NCCL version of an environment from its package list (`pip list --format=freeze`
    lines, as vLLM's dev GET /server_info reports them in system_env.pip_packages): the
    nvidia-nccl-cu12/cu13 wheel torch pins. None when it lists none. Every rank of an NCCL
    group must run the same version (docs/engines.md, "One NCCL per update group")."""
    m = re.search(r"nvidia-nccl-cu\d+\s*==\s*([\d.]+)", pip_list)
    return m.group(1) if m else None

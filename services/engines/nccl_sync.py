"""The NCCL weight-update protocol between the trainer and an engine server, service side.

The trainer (rank 0) broadcasts tensors straight into the engine's GPUs; the service only
drives the engine's HTTP endpoints with the *metadata* of each bucket. Everything the two
sides must agree on is in the `WeightUpdate` of `POST /v1/weights`:

    format   = "nccl"
    location = "HOST:PORT"           the trainer's TCP rendezvous (it is rank 0 / the master)
    version  = new policy version
    meta     = {"nccl": NcclSpec}    group size/name and the bucket list, in broadcast order

Wire sequence, timing and the trainer's half: docs/engines.md. This module has no torch
import, so the service (and its tests) need no CUDA; `trainer/` must not import services,
so it mirrors `NcclSpec` (or the lead moves it to protocol/weights.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.messages import WeightUpdate
from services.engines.base import WeightUpdateError

# Element sizes of the dtypes the engines accept, for bucket planning.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}


class Bucket(BaseModel):
    """One metadata message = the tensors the trainer broadcasts next, in this order."""

    model_config = ConfigDict(extra="forbid")

    names: list[str] = Field(min_length=1, description="engine-side (HF) parameter names")
    dtypes: list[str] = Field(description='torch dtype names without "torch.", e.g. "bfloat16"')
    shapes: list[list[int]]

    @model_validator(mode="after")
    def _aligned(self) -> Bucket:
        if not len(self.names) == len(self.dtypes) == len(self.shapes):
            raise ValueError(f"{len(self.names)} names, {len(self.dtypes)} dtypes, "
                             f"{len(self.shapes)} shapes")
        bad = sorted(set(self.dtypes) - set(DTYPE_BYTES))
        if bad:
            raise ValueError(f"unsupported dtypes {bad}; allowed: {sorted(DTYPE_BYTES)}")
        return self

    def nbytes(self) -> int:
        total = 0
        for d, s in zip(self.dtypes, self.shapes, strict=True):
            n = 1
            for x in s:
                n *= x
            total += n * DTYPE_BYTES[d]
        return total


class NcclSpec(BaseModel):
    """`WeightUpdate.meta["nccl"]`."""

    model_config = ConfigDict(extra="forbid")

    world_size: int = Field(ge=2, description="1 (trainer) + the engine's GPU count")
    rank_offset: int = Field(1, ge=1, description="rank of the engine's first GPU")
    group_name: str = Field("rlrt_weight_sync", min_length=1)
    backend: str = Field("nccl", description="SGLang only: torch backend of the update group")
    init_group: bool = Field(
        True,
        description="(re)create the group before this update (the trainer initialises its side "
        "concurrently). False: reuse the group made by an earlier update with the same "
        "location/world_size/group_name; refused if the service has none.",
    )
    packed: bool = Field(False, description="vLLM only: packed broadcast (vLLM's packed_tensor)")
    buckets: list[Bucket] = Field(min_length=1)


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


def plan_buckets(params: Iterable[tuple[str, str, Sequence[int]]],
                 bucket_bytes: int = 512 * 1024**2) -> list[Bucket]:
    """Greedy buckets of about `bucket_bytes` (slime's default is 512 MB), keeping order.
    `params` = (name, dtype name, shape); a tensor larger than a bucket gets its own."""
    buckets: list[Bucket] = []
    names: list[str] = []
    dtypes: list[str] = []
    shapes: list[list[int]] = []
    size = 0
    for name, dtype, shape in params:
        n = DTYPE_BYTES[dtype]
        for x in shape:
            n *= x
        if names and size + n > bucket_bytes:
            buckets.append(Bucket(names=names, dtypes=dtypes, shapes=shapes))
            names, dtypes, shapes, size = [], [], [], 0
        names.append(name)
        dtypes.append(dtype)
        shapes.append(list(shape))
        size += n
    if names:
        buckets.append(Bucket(names=names, dtypes=dtypes, shapes=shapes))
    return buckets

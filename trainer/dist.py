"""torch.distributed set-up for the trainer: one process per device, launched by torchrun /
the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or a single
process with nothing set. CPU uses gloo, GPU nccl (nccl refuses to run without a GPU).

Rank 0 is the only rank that talks to Redis and the services; the others receive each step's
batch and commands from it by broadcast, and take part in every collective (ZeRO gathers,
gradient reductions, checkpoint writes)."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup(device: str, timeout_s: float) -> tuple[int, int]:
    """Initialise the default process group once; returns (rank, world_size). `timeout_s`
    bounds every collective: a rank waiting on a dead peer fails instead of hanging."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:  # plain single process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    import deepspeed
    import deepspeed.ops

    if device == "cpu":
        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op (1-3 min of g++, behind a
        # file lock shared by every run on the machine) at the first init_distributed. gloo
        # does the same job for our process counts, so tell DeepSpeed the op is unavailable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # Without RANK/WORLD_SIZE deepspeed falls back to MPI discovery (mpi4py); we always set them.
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl",
                               auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (pickled; CPU tensors inside are fine)."""
    rank, size = world()
    if size == 1:
        return obj
    box = [obj if rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place sum over ranks (no-op on one process)."""
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()

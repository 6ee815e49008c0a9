"""The trainer's half of an NCCL weight update, for the GPU tests (docs/engines.md).

`init_sglang_group` mirrors SGLang's `sglang.srt.utils.init_custom_process_group` (and slime's
copy of it): torch's TCP rendezvous, then a *second* process group next to any default one.
For vLLM the tests use vLLM's own `NCCLWeightTransferEngine.trainer_init/trainer_send_weights`.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist


def init_sglang_group(host: str, port: int, world_size: int, group_name: str,
                      timeout_s: float = 300) -> Any:
    try:  # the real thing when SGLang is importable here
        from sglang.srt.utils import init_custom_process_group

        return init_custom_process_group(
            backend="nccl", init_method=f"tcp://{host}:{port}", world_size=world_size, rank=0,
            group_name=group_name, timeout=datetime.timedelta(seconds=timeout_s))
    except ImportError:
        pass
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{host}:{port}", 0, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    opt = "backend_options" if (major, minor) >= (2, 6) else "pg_options"
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend("nccl"), store,
                                      group_name=group_name, **{opt: None}, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def broadcast_sglang(group: Any, tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        dist.broadcast(t, src=0, group=group)
    torch.cuda.synchronize()


def vllm_transfer_engine() -> Any:
    """vLLM's NCCLWeightTransferEngine class (its import path moved across versions)."""
    for mod in ("vllm.distributed.weight_transfer.nccl_engine",
                "vllm.backends.distributed.weight_transfer.nccl_engine"):
        try:
            module = __import__(mod, fromlist=["NCCLWeightTransferEngine"])
            return module.NCCLWeightTransferEngine
        except ImportError:
            continue
    raise ImportError("vLLM's NCCLWeightTransferEngine is not importable here")

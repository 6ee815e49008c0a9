"""The bound default group: under a multi-GPU DeepSpeed trainer the default group is bound to a
device, and torch then builds any new group by splitting the default group's communicator --
a collective of every training rank, while only rank 0 builds the update group: it would hang.
`trainer.transports.nccl.init_custom_process_group` clears the binding meanwhile. Roles:

    python -m selfcheck.bound peer SGLANG_MODULE UPDATE_PORT GROUP TIMEOUT
        SGLang's own `init_custom_process_group` as rank 1 of the update group; receives one
        broadcast and prints it.
    python -m selfcheck.bound rank TRAIN_PORT RANK VARIANT UPDATE_PORT GROUP TIMEOUT
        one of 2 training ranks. The default group is bound for real on CUDA (`device_id`,
        which is what makes torch eager-initialise NCCL) and simulated on CPU. Rank 0 builds
        the update group and broadcasts. VARIANT "cleared": the production code. "kept": the
        negative control, the clearing disabled -- torch's split path must then be reached;
        it is stopped there (a marker exception) because under NCCL it would hang.
Each prints {"split_calls", "bound", "sent"/"got", ...}: the split source is spied on.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import runpy
import sys
from typing import Any

import torch
import torch.distributed as dist

from selfcheck.common import emit, mode

N = 1024


class SplitPathTaken(RuntimeError):
    """Raised by the spy instead of entering torch's split path (a hang under NCCL)."""


def _peer(argv: list[str]) -> None:
    sglang = runpy.run_path(argv[0])
    port, group, timeout = int(argv[1]), argv[2], float(argv[3])
    m = mode()
    if not m.cpu:
        torch.cuda.set_device(0)
    g = sglang["init_custom_process_group"](
        backend=m.backend, init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=1,
        group_name=group, timeout=datetime.timedelta(seconds=timeout))
    t = torch.empty(N, device=m.device)
    dist.broadcast(t, src=0, group=g)
    emit({"role": "peer", "got": float(t.double().sum())})
    os._exit(0)  # skip the group's teardown: the trainer side may already be gone


def _rank(argv: list[str]) -> None:
    from trainer.transports import nccl as sync

    train_port, rank, variant = int(argv[0]), int(argv[1]), argv[2]
    port, group, timeout = int(argv[3]), argv[4], float(argv[5])
    m = mode()
    kw: dict[str, Any] = {}
    if not m.cpu:
        torch.cuda.set_device(0)
        kw["device_id"] = torch.device("cuda", 0)  # binds the default group (eager NCCL init)
    dist.init_process_group(m.backend, init_method=f"tcp://127.0.0.1:{train_port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=timeout), **kw)
    c10d = dist.distributed_c10d
    if m.cpu:  # gloo has no eager binding: set what a bound NCCL default group carries
        c10d._world.default_pg.bound_device_id = torch.device("cpu", 0)
    if variant == "kept":
        sync._unbound_default_group = contextlib.nullcontext
    real, calls = c10d._get_split_source, []

    def spy(pg: Any) -> Any:
        calls.append(1)
        raise SplitPathTaken("torch took the split path")

    c10d._get_split_source = spy
    out: dict[str, Any] = {"role": "rank", "rank": rank, "variant": variant}
    if rank == 0:
        try:
            g = sync.init_custom_process_group(m.backend, "127.0.0.1", port, 0, 2, group, timeout)
            t = torch.full((N,), 3.0, device=m.device)
            dist.broadcast(t, src=0, group=g)
            if not m.cpu:
                torch.cuda.synchronize()
            out["sent"] = float(t.double().sum())
        except SplitPathTaken as e:
            out["error"] = str(e)
    c10d._get_split_source = real
    dist.barrier()  # the training group still works afterwards
    out.update(split_calls=len(calls), bound=str(c10d._world.default_pg.bound_device_id))
    emit(out)
    dist.destroy_process_group()


def main(argv: list[str]) -> None:
    {"peer": _peer, "rank": _rank}[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])

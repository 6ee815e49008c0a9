"""TEST HARNESS: the two sides of a weight-update group, each in its own process, over gloo
(tests/test_nccl_rendezvous.py). Prints one JSON line with what it saw.

    python -m support.rendezvous_roles sglang-peer PORT GROUP WORLD RANK TIMEOUT
        SGLang's released `init_custom_process_group` (tests/support/upstream.py) as the
        engine's GPU rank RANK (rank_offset + tp_rank), then receives 2 broadcasts from 0.
    python -m support.rendezvous_roles trainer TIMEOUT SPEC [SPEC...]
        our `trainer.transports.nccl.init_custom_process_group` as rank 0 of one group per
        SPEC = PORT:GROUP:WORLD:VALUE, in this order, then broadcasts full(VALUE) twice.
    python -m support.rendezvous_roles trainer-rank TRAIN_PORT RANK BOUND TIMEOUT SPEC...
        the same inside a 2-rank training job (the default gloo group, as DeepSpeed makes it)
        whose default group has a bound device when BOUND=1 (simulated: a multi-GPU
        DeepSpeed job binds one); only rank 0 builds the update groups. BOUND=2: bound, and
        the trainer does NOT clear it (the negative control: shows the simulation bites).
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

N = 16


def _trainer_groups(timeout: float, specs: list[str]) -> dict:
    from trainer.transports.nccl import init_custom_process_group

    out = {}
    for spec in specs:
        port, name, world, value = spec.split(":")
        g = init_custom_process_group("gloo", "127.0.0.1", int(port), 0, int(world), name,
                                      timeout)
        for i in range(2):
            dist.broadcast(torch.full((N,), float(value) + i), src=0, group=g)
        out[name] = {"size": g.size(), "rank": g.rank()}
    return out


def main(argv: list[str]) -> None:
    role = argv[0]
    torch.set_num_threads(1)
    if role == "sglang-peer":
        port, name, world, rank, timeout = argv[1:6]
        from support.upstream import sglang_init_custom_process_group

        init = sglang_init_custom_process_group()
        g = init(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=int(world),
                 rank=int(rank), group_name=name,
                 timeout=datetime.timedelta(seconds=float(timeout)))
        got = []
        for _ in range(2):
            t = torch.empty(N)
            dist.broadcast(t, src=0, group=g)
            got.append(t.tolist())
        print(json.dumps({"group": name, "rank": g.rank(), "size": g.size(), "got": got}),
              flush=True)
        # What we saw is printed. Skip gloo's teardown: the trainer hosts the rendezvous store,
        # and when it has already exited (the refused-name test makes it fail on purpose) the
        # group's destructor aborts this process ("terminate called without an active
        # exception"), which would turn a correct result into a race on exit order.
        os._exit(0)
    elif role == "trainer":
        timeout = float(argv[1])
        print(json.dumps({"groups": _trainer_groups(timeout, argv[2:])}), flush=True)
        # The same exit-order race as the peer's, from this side: the peers leave with
        # os._exit as soon as they printed, and gloo's group destructors here can then abort
        # ("terminate called without an active exception", SIGABRT) after the result is out.
        # The groups, their sizes and the broadcasts are what this role checks: skip teardown.
        os._exit(0)
    elif role == "trainer-rank":
        train_port, rank, timeout = int(argv[1]), int(argv[2]), float(argv[4])
        bound = argv[3] in ("1", "2")
        if argv[3] == "2":
            import contextlib

            import trainer.transports.nccl as sync

            sync._unbound_default_group = contextlib.nullcontext
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{train_port}", rank=rank,
                                world_size=2, timeout=datetime.timedelta(seconds=timeout))
        if bound:
            dist.distributed_c10d._world.default_pg.bound_device_id = torch.device("cpu", 0)
        # Spy on torch's split path: with NCCL it is a collective of every training rank,
        # and only rank 0 is here -- the hang. gloo survives it, so count the calls instead.
        c10d = dist.distributed_c10d
        real_split_source, split_calls = c10d._get_split_source, []

        def spy(pg):  # noqa: ANN001, ANN202
            split_calls.append(1)
            return real_split_source(pg)

        c10d._get_split_source = spy
        groups = _trainer_groups(timeout, argv[5:]) if rank == 0 else {}
        c10d._get_split_source = real_split_source
        dist.barrier()  # the training group still works afterwards
        print(json.dumps({"rank": rank, "groups": groups, "split_calls": len(split_calls),
                          "bound": str(dist.distributed_c10d._world.default_pg.bound_device_id)}),
              flush=True)
        dist.destroy_process_group()
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""The trainer's production NCCL push (`trainer.transports.nccl.push_buckets`, with its `Peer`)
into the SGLang receiver (sglang_receiver.py), twice: the first push makes a new group, the
second (perturbed weights) must reuse it. Every tensor's checksum is compared with what the
receiver reports for that version.

    python -m selfcheck.push RECEIVER_URL MASTER_PORT LAYERS
"""

from __future__ import annotations

import sys
import time
from typing import Any

import httpx
import torch

from protocol.weights import Bucket
from selfcheck.common import checksum, emit, mode, random_qwen3
from trainer.config import NcclPush, ServiceEndpoint
from trainer.model import named_weights, plan_buckets, shape_of
from trainer.transports.base import PushResult
from trainer.transports.nccl import Peer, dtype_name, push_buckets

BUCKET_MB = 8  # several buckets: the 151,936 x 64 embedding alone is 19 MiB in bf16


def one_push(peer: Peer, url: str, version: int, items: list[tuple[str, torch.Tensor]],
             dtype: torch.dtype) -> dict[str, Any]:
    plan = plan_buckets(items, BUCKET_MB * 1024**2, dtype)
    meta = [Bucket(names=[items[i][0] for i in idx], dtypes=[dtype_name(dtype)] * len(idx),
                   shapes=[shape_of(items[i][1]) for i in idx]) for idx in plan]
    res = PushResult(version=version)
    init = peer.group is None
    t0 = time.perf_counter()
    push_buckets([peer], version, meta, ([(items[i][0], items[i][1]) for i in idx] for idx in plan),
                 res, run_id="gpu-check", timeout_s=peer.cfg.nccl_timeout_s)
    seconds = time.perf_counter() - t0
    got = httpx.get(f"{url}/_received", timeout=30).json()
    seen = got["versions"].get(str(version), {})
    sent = {n: checksum(t) for n, t in items}
    bad = sorted(n for n in sent if seen.get(n) != sent[n])
    nbytes = sum(t.numel() * t.element_size() for _, t in items)
    return {"version": version, "succeeded": res.ok, "failed": res.failed, "new_group": init,
            "inits": got["inits"], "tensors": len(sent), "buckets": len(plan),
            "checksum_mismatch": bad, "bytes": nbytes, "seconds": round(seconds, 3),
            "gb_per_s": round(nbytes / seconds / 1e9, 3)}


def main(argv: list[str]) -> None:
    url, master_port, layers = argv[0], int(argv[1]), int(argv[2])
    m = mode()
    if not m.cpu:
        torch.cuda.set_device(0)
    model = random_qwen3(layers=layers).to(m.device, m.dtype)
    items = [(n, t.detach()) for n, t in named_weights(model)]
    svc = ServiceEndpoint(name="rollout", url=url, engine="sglang")
    cfg = NcclPush(services=[svc], master_address="127.0.0.1", master_port=master_port,
                   nccl_backend=m.backend, nccl_timeout_s=120)
    peer = Peer(svc, cfg, master_port)
    pushes = [one_push(peer, url, 1, items, m.dtype)]
    with torch.no_grad():  # new weights, same shapes: what the next step pushes
        for _, t in items:
            t.add_(torch.randn_like(t) * 1e-2)
    pushes.append(one_push(peer, url, 2, items, m.dtype))
    emit({"pushes": pushes})


if __name__ == "__main__":
    main(sys.argv[1:])

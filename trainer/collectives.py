"""The trainer's collective operations: the work every rank does together, one method each.

Rank 0 runs the training loop (trainer/main.py) and calls these through `RankZero`, which
announces each operation to the other ranks by broadcast before running it; ranks 1..n-1 sit
in `CollectiveOps.follow()` and run what is announced, in the same order, so every torch
collective inside (DeepSpeed's all-reduces, ZeRO-3 gathers, checkpoint barriers) pairs up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from protocol.canary import Canary
from trainer import dist
from trainer.batch import TrainBatch
from trainer.canary import canary_logprobs
from trainer.checkpoint import Checkpointer
from trainer.config import NcclPush, TrainerConfig
from trainer.model import DTYPES, Policy, export_pretrained, full_state_dict
from trainer.reference import Reference
from trainer.threads import ThreadSwitch
from trainer.transports.base import PushResult
from trainer.transports.nccl import nccl_push_all
from trainer.update import train_step

_STOP = "stop"  # the announcement that ends `follow()`


def push_dtype(cfg: TrainerConfig, policy: Policy) -> torch.dtype:
    """The dtype pushed weights travel in (push.dtype; auto = the training dtype)."""
    return policy.dtype if cfg.push.dtype == "auto" else DTYPES[cfg.push.dtype]


class CollectiveOps:
    """Every rank's side of the collective operations. Each returns its result on rank 0
    (None, or this rank's share, elsewhere)."""

    def __init__(self, cfg: TrainerConfig, policy: Policy, ckpt: Checkpointer,
                 tokenizer: Any, reference: Reference | None = None,
                 threads: ThreadSwitch | None = None) -> None:
        self.cfg = cfg
        self.policy = policy
        self.ckpt = ckpt
        self.tokenizer = tokenizer
        self.reference = reference  # the frozen KL reference (kl_coef > 0), else None
        self.threads = threads  # trainer.idle_threads (trainer/threads.py), else None

    def train(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """One optimizer step on `batch` (trainer/update.py); its metrics."""
        if self.threads is None:
            return train_step(self.cfg, self.policy, batch, step, self.reference)
        with self.threads.update():
            m = train_step(self.cfg, self.policy, batch, step, self.reference,
                           between=self.threads.apply)
        return {**m, "time_idle_threads_s": self.threads.idle_s}

    def gather_weights(self) -> dict[str, torch.Tensor] | None:
        """The full weights in the push dtype, as CPU tensors on rank 0."""
        # No copy: the push completes before the next optimizer step touches the weights.
        return full_state_dict(self.policy, push_dtype(self.cfg, self.policy),
                               bucket_bytes=int(self.cfg.push.bucket_mb * 1024**2), copy=False)

    def broadcast_nccl(self, version: int, canary: Canary | None) -> PushResult | None:
        """One NCCL update of every service (trainer/transports/nccl.py)."""
        assert isinstance(self.cfg.push, NcclPush), "an NCCL broadcast needs push.mode: nccl"
        return nccl_push_all(self.policy, self.cfg.push, version=version, canary=canary,
                             dtype=push_dtype(self.cfg, self.policy), run_id=self.cfg.run_id)

    def canary_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """The policy's log-probs of the weight canary's sequences (trainer/canary.py)."""
        return canary_logprobs(self.policy, sequences)

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> Path:
        return self.ckpt.save(self.policy, step, state)

    def export_final(self) -> Path | None:
        """save_pretrained the final model to <output_dir>/final."""
        return export_pretrained(self.policy, self.cfg.out / "final", self.tokenizer)

    def _operation(self, name: str) -> Callable[..., Any]:
        ops: dict[str, Callable[..., Any]] = {
            "train": self.train, "gather_weights": self.gather_weights,
            "broadcast_nccl": self.broadcast_nccl, "canary_logprobs": self.canary_logprobs,
            "save_checkpoint": self.save_checkpoint, "export_final": self.export_final}
        if name not in ops:
            raise ValueError(f"unknown collective operation {name!r}")
        return ops[name]

    def follow(self) -> None:
        """Ranks 1..n-1: run each operation rank 0 announces, until it announces the stop."""
        while True:
            name, args = dist.broadcast_object()
            if name == _STOP:
                if args and args[0]:
                    # Rank 0 failed: so must this rank, or a launcher per node (a Kubernetes
                    # Indexed Job pod, a compose container) sees it succeed and never
                    # restarts it to rejoin the restarted rank 0.
                    raise RuntimeError("rank 0 stopped the run on an error")
                return
            self._operation(name)(*args)


class RankZero:
    """Rank 0's handle on the collective operations: each call announces the operation, then
    runs it on the compute thread (the event loop keeps serving the bus meanwhile). It is what
    the weight transports ask for the gather and the NCCL broadcast (transports/base.py).

    One compute thread for every operation, always the same: torch's intra-op thread count
    belongs to the calling thread, and each thread that runs a multi-threaded op gets its own
    OpenMP team; several teams on a small CPU throttle each other's spinning workers (the update
    at 2 threads ran 0.19 s instead of 0.14 s per step once a second thread had its own team)."""

    def __init__(self, ops: CollectiveOps) -> None:
        self.ops = ops
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlrt-compute")

    async def _announce(self, fn: Callable[..., Any], *args: Any) -> Any:
        def run() -> Any:
            dist.broadcast_object((fn.__name__, args))
            return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self.compute, run)

    async def train(self, batch: TrainBatch, step: int) -> dict[str, float]:
        return await self._announce(self.ops.train, batch, step)

    async def gather_weights(self) -> dict[str, torch.Tensor]:
        return await self._announce(self.ops.gather_weights)

    async def broadcast_nccl(self, version: int, canary: Canary | None) -> PushResult:
        return await self._announce(self.ops.broadcast_nccl, version, canary)

    async def canary_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return await self._announce(self.ops.canary_logprobs, sequences)

    async def save_checkpoint(self, step: int, state: dict[str, Any]) -> Path:
        return await self._announce(self.ops.save_checkpoint, step, state)

    async def export_final(self) -> Path | None:
        return await self._announce(self.ops.export_final)

    async def stop(self, failed: bool = False) -> None:
        """Release the other ranks from `follow()`; `failed`: they exit with an error too."""
        try:
            await asyncio.to_thread(dist.broadcast_object, (_STOP, (failed,)))
        finally:
            self.compute.shutdown(wait=False)

"""The trainer process. Entry point: `run_trainer(cfg, bus, resume=...)`, called on every rank
(one process per device; a plain single process needs no launcher).

One step t (the policy is at version t), orchestrated by rank 0:

    driver.collect(t)          admit PromptTasks (bounded by max_staleness), take ScoredGroups
    build_batch                padded tensors, broadcast to every rank
    update_step                old log-probs (pi_old, and the KL reference's), advantages, then
                               per PPO mini-batch: micro-batched loss/backward, AdamW
    -> version t+1
    push (every k)             full weights gathered (ZeRO-3: per bucket), written once,
                               POSTed to every service's /v1/weights (or NCCL, GPU); the
                               services load it in the background, and step t+1 waits
                               for that before publishing its prompts (push.overlap)
    metrics                    metrics.jsonl / trained.jsonl / TensorBoard / Prometheus / bar
    checkpoint (every k)       all ranks; then the inbox forgets the groups it covers

SIGTERM / SIGINT: the current wait or step finishes, a checkpoint is written at the last
completed step, the process exits cleanly. Every wait is bounded (wait_timeout_s, push
deadlines, collective timeouts) and fails with an error naming what it waited for.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import torch

from protocol.bus import Bus
from protocol.canary import Canary
from protocol.config import BusSettings
from protocol.messages import ScoredGroup
from trainer import dist
from trainer.batch import build_batch
from trainer.canary import canary_dtype, canary_logprobs, fixed_sequences
from trainer.checkpoint import Checkpointer
from trainer.config import TrainerConfig
from trainer.data import PromptSource
from trainer.driver import Driver, DriverState
from trainer.inbox import Inbox
from trainer.metrics import MetricsSink
from trainer.model import DTYPES, Policy, build_policy, export_pretrained, full_state_dict
from trainer.reference import Reference, build_reference
from trainer.stats import batch_stats, collect_stats, trained_record
from trainer.update import train_step
from trainer.weight_push import PushResult, WeightPusher

log = logging.getLogger("rlrt.trainer")

CONSUMER_GROUP = "trainer"


class TrainerError(RuntimeError):
    pass


def _push_dtype(cfg: TrainerConfig, policy: Policy) -> torch.dtype:
    return policy.dtype if cfg.push.dtype == "auto" else DTYPES[cfg.push.dtype]


class _Collective:
    """The work every rank does together. Rank 0 announces each call by broadcast; the other
    ranks loop in `follow()` and run the same call, so collectives always pair up."""

    def __init__(self, cfg: TrainerConfig, policy: Policy, ckpt: Checkpointer,
                 tokenizer: Any, reference: Reference | None = None) -> None:
        self.cfg = cfg
        self.policy = policy
        self.ckpt = ckpt
        self.tokenizer = tokenizer
        self.reference = reference  # the frozen KL reference (kl_coef > 0), else None

    def run(self, op: str, *args: Any) -> Any:
        if op == "train":
            batch, step = args
            return train_step(self.cfg, self.policy, batch, step, self.reference)
        if op == "gather":
            # No copy: the push completes before the next optimizer step touches the weights.
            return full_state_dict(self.policy, _push_dtype(self.cfg, self.policy),
                                   bucket_bytes=int(self.cfg.push.bucket_mb * 1024**2),
                                   copy=False)
        if op == "nccl":
            from trainer.weight_sync_nccl import nccl_push_all

            return nccl_push_all(self.policy, self.cfg.push, version=args[0], canary=args[1],
                                 dtype=_push_dtype(self.cfg, self.policy),
                                 run_id=self.cfg.run_id)
        if op == "canary":
            return canary_logprobs(self.policy, args[0])
        if op == "ckpt":
            step, state = args
            return self.ckpt.save(self.policy, step, state)
        if op == "export":
            return export_pretrained(self.policy, self.cfg.out / "final", self.tokenizer)
        raise ValueError(f"unknown collective {op!r}")

    def lead(self, op: str, *args: Any) -> Any:
        """Rank 0: announce and run. Blocking; called through asyncio.to_thread."""
        dist.broadcast_object((op, args))
        return self.run(op, *args)

    def follow(self) -> None:
        while True:
            op, args = dist.broadcast_object()
            if op == "stop":
                return
            self.run(op, *args)


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_trainer(cfg: TrainerConfig, bus: BusSettings, *, resume: bool = False) -> dict[str, Any]:
    """Run (or, with `resume`, continue from the latest checkpoint) the training loop.
    Returns a summary on rank 0 ({} on the other ranks). Raises on unrecoverable errors
    (DriverError: the pipeline stopped delivering; TrainerError; config errors)."""
    from trainer.model import resolve_device

    device = resolve_device(cfg)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    # Followers wait at a broadcast while rank 0 collects groups and pushes: the collective
    # timeout must outlast the longest of those bounded waits.
    rank, world = dist.setup(device, cfg.wait_timeout_s + cfg.push.deadline_s + 600)
    _seed_all(cfg.seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path or cfg.model_path)
    policy = build_policy(cfg, rank=rank, world_size=world, device=device)
    ckpt = Checkpointer(cfg.checkpoint_root, cfg.checkpoint.keep)
    state = ckpt.load(policy) if resume else None
    if resume and state is None:
        log.warning("--resume: no checkpoint in %s; starting a fresh run", ckpt.root)
    reference = build_reference(cfg, rank=rank, world_size=world, device=device)
    coll = _Collective(cfg, policy, ckpt, tokenizer, reference)
    if rank != 0:
        coll.follow()
        return {}
    return asyncio.run(_Lead(cfg, bus, coll, tokenizer, state).run())


class _Lead:
    """Rank 0's loop: bus, driver, pushes, metrics, checkpoints."""

    def __init__(self, cfg: TrainerConfig, bus: BusSettings, coll: _Collective, tokenizer: Any,
                 state: dict[str, Any] | None) -> None:
        self.cfg = cfg
        self.bus_cfg = bus
        self.coll = coll
        self.policy = coll.policy
        self.tokenizer = tokenizer
        self.state = state
        self.start_step = int(state["step"]) if state else 0
        self.stop = asyncio.Event()
        self.stop_reason: str | None = None
        self.pushes = 0
        self.notifying: asyncio.Task[PushResult] | None = None  # a push loading in the background
        self.unreported: PushResult | None = None  # a finished push not yet in the metrics
        self.canary_seqs: list[list[int]] | None = None  # fixed for the run

    # ------------------------------------------------------------------ helpers
    async def _all(self, op: str, *args: Any) -> Any:
        return await asyncio.to_thread(self.coll.lead, op, *args)

    def _on_signal(self, signum: int) -> None:
        self.stop_reason = signal.Signals(signum).name
        log.warning("%s: finishing the current step, then checkpoint and exit", self.stop_reason)
        self.stop.set()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (e.g. embedded in a test): no signal handling

    def _max_seq_len(self) -> int:
        return int(self.cfg.max_seq_len or self.policy.hf_model.config.max_position_embeddings)

    async def canary(self) -> Canary | None:
        """The weight canary of the current weights (protocol/canary.py); a collective."""
        cfg = self.cfg.push
        if not cfg.canary:
            return None
        if self.canary_seqs is None:
            self.canary_seqs = fixed_sequences(self.policy.hf_model, self.tokenizer,
                                               cfg.canary_sequences, cfg.canary_tokens)
        logprobs = await self._all("canary", self.canary_seqs)
        dtype = canary_dtype(self.policy.dtype, _push_dtype(self.cfg, self.policy))
        return Canary(sequences=self.canary_seqs, logprobs=logprobs, dtype=dtype)

    async def push(self, version: int) -> PushResult:
        """Push `version` to the services. With push.overlap (disk mode) this returns once the
        directory is written -- the weights may change from here on -- and the services are
        notified in the background; `settle()` collects that result."""
        cfg = self.cfg.push
        first = self.pushes == 0
        by_disk = cfg.mode == "disk" or first or (cfg.disk_every and self.pushes % cfg.disk_every == 0)
        self.pushes += 1
        if by_disk:
            sd = await self._all("gather")
            canary = await self.canary()
            # The first push of a process may go *back* in version (a resumed run whose
            # services had loaded later weights from the killed one): say so explicitly.
            meta = {"reason": "start", "allow_rollback": True} if first else {"reason": "step"}
            if cfg.overlap and not first:
                update, write_s = await self.pusher.write_update(sd, version, meta, canary)
                self.notifying = asyncio.create_task(self.pusher.notify(update))
                return PushResult(version=version, location=update.location,
                                  sha256=update.sha256, write_s=write_s)
            res = await self.pusher.push(sd, version, meta=meta, canary=canary)
        else:
            canary = await self.canary()
            res = await self._all("nccl", version, canary)
            if res.failed:  # fall back to the directory for those services
                retry = [s for s in cfg.services if s.name in res.failed]
                sd = await self._all("gather")
                disk = await self.pusher.push(sd, version, services=retry, canary=canary)
                res.ok += disk.ok
                res.canary_refused.update(disk.canary_refused)
                res.failed = {k: f"{v}; disk fallback: {disk.failed[k]}"
                              for k, v in res.failed.items() if k in disk.failed}
        self._check_push(res)
        return res

    def _check_push(self, res: PushResult) -> None:
        if res.failed and self.cfg.push.on_failure == "raise":
            raise TrainerError(f"weight push v{res.version} failed: {res.failed}")

    async def settle(self) -> dict[str, Any]:
        """Wait for a push still notifying in the background; the figures of the previous
        push (that one, or the last synchronous one not yet reported), for the metrics."""
        t0 = time.perf_counter()
        if self.notifying is not None:
            self.unreported = await self.notifying
            self.notifying = None
            self._check_push(self.unreported)
        res, self.unreported = self.unreported, None
        if res is None:
            return {}
        return {"push_wait_s": time.perf_counter() - t0, "push_notify_s": res.notify_s,
                "push_ok": len(res.ok), "push_failed": sorted(res.failed),
                "push_canary_refused": sorted(res.canary_refused)}

    async def save(self, version: int) -> float:
        t0 = time.perf_counter()
        state = {"version": version, "driver": self.boundary.to_dict(),
                 "data_skipped": dict(self.source.skipped)}
        await self._all("ckpt", version, state)
        await self.inbox.commit(self.uncommitted)  # only now are those groups safe to forget
        self.uncommitted = []
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ the loop
    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "trainer_config.json").write_text(cfg.model_dump_json(indent=1))
        bus = Bus.from_url(None, self.bus_cfg)
        consume_stop = asyncio.Event()
        consumer: asyncio.Task | None = None
        sink: MetricsSink | None = None
        try:
            dstate = (DriverState.from_dict(self.state["driver"]) if self.state
                      else DriverState())
            self.inbox = Inbox(bus.r, f"{self.bus_cfg.prefix}:trainer:{dstate.nonce}")
            restored = await self.inbox.restore() if self.state else 0
            max_len = self._max_seq_len()
            self.source = PromptSource(
                cfg.data, self.tokenizer, seed=cfg.seed,
                max_prompt_tokens=cfg.data.max_prompt_tokens
                or max_len - cfg.sampling.max_new_tokens,
                report_path=cfg.out / "data_skipped.jsonl")
            if self.state:
                self.source.skipped.update(self.state.get("data_skipped", {}))
            driver = Driver(
                bus=bus, prompts_stream=self.bus_cfg.stream("prompts"), inbox=self.inbox,
                source=self.source, run_id=cfg.run_id, prompts_per_step=cfg.prompts_per_step,
                group_size=cfg.group_size, max_staleness=cfg.max_staleness,
                zero_variance=cfg.zero_variance, backfill_max=cfg.backfill_max,
                sampling=cfg.sampling,
                teacher=cfg.algorithm.teacher_request(
                    chat_template_kwargs=dict(cfg.data.chat_template_kwargs),
                    system_prompt=cfg.data.system_prompt),
                wait_timeout_s=cfg.wait_timeout_s, publish_timeout_s=cfg.publish_timeout_s,
                max_dropped=cfg.max_dropped_per_step, state=dstate,
                teacher_version=cfg.algorithm.teacher_version_rule,
                rescore_stream=self.bus_cfg.stream("verified"),
                max_without_context=cfg.max_groups_without_context)
            self.pusher = WeightPusher(
                cfg.push, cfg.weights_root, cfg.run_id,
                extra_files={"config.json": self.policy.hf_model.config.to_json_string()})
            self.boundary = DriverState.from_dict(dstate.to_dict())
            self.uncommitted: list[str] = []
            sink = MetricsSink(cfg.out, cfg.metrics, total_steps=cfg.total_steps,
                               start_step=self.start_step)
            consumer = asyncio.create_task(bus.consume(
                self.bus_cfg.stream("scored"), CONSUMER_GROUP, "trainer-0", self.inbox.receive,
                ScoredGroup, consume_stop, concurrency=16))
            self._install_signals()
            log.info("trainer: start at step %d of %d (restored %d uncommitted groups)",
                     self.start_step, cfg.total_steps, restored)
            return await self._loop(driver, sink, consumer)
        finally:
            consume_stop.set()
            if consumer is not None:
                try:
                    await asyncio.wait_for(consumer, timeout=10)
                except (asyncio.TimeoutError, Exception) as e:  # noqa: BLE001 - shutting down
                    log.debug("consumer shutdown: %r", e)
            try:
                await asyncio.to_thread(dist.broadcast_object, ("stop", ()))
            except Exception as e:  # noqa: BLE001 - best effort: peers time out otherwise
                log.error("could not stop the other ranks: %r", e)
            if sink is not None:
                sink.close()
            await bus.close()

    async def _loop(self, driver: Driver, sink: MetricsSink, consumer: asyncio.Task
                    ) -> dict[str, Any]:
        cfg = self.cfg
        version = self.start_step
        last_ckpt = self.start_step if self.state else -1
        record: dict[str, Any] = {}
        if cfg.push.on_start and cfg.push.services:
            res = await self.push(version)
            self.unreported = res  # reported with step 0, as "the previous push"
            log.info("initial push v%d: ok %s failed %s", version, res.ok, list(res.failed))
            for name, why in res.failed.items():
                if "409" in why:
                    log.error("%s refused version %d (%s): if it serves a newer version (a "
                              "resumed run), its samples are held back until the trainer "
                              "catches up, and the run stops if it cannot", name, version, why)
        for step in range(self.start_step, cfg.total_steps):
            if self.stop.is_set():
                break
            if consumer.done():  # the bus consumer died: surface its error, do not wait on it
                consumer.result()
                raise TrainerError("the ScoredGroup consumer stopped unexpectedly")
            t_step = time.perf_counter()
            # Let the services finish loading the last push before this step's prompts go out:
            # an engine drains its running rows before it swaps weights, so prompts published
            # earlier would start on the old weights and then stall the swap half-batched.
            # The wait costs nothing extra: the rows it waits for are this step's groups.
            settled = await self.settle()
            coll = await driver.collect(step, self.stop)
            if coll is None:
                break
            t0 = time.perf_counter()
            batch = build_batch(coll.groups, step, self.tokenizer.pad_token_id or 0,
                                self._max_seq_len())
            t_batch = time.perf_counter() - t0
            m = await self._all("train", batch, step)
            version = step + 1
            record = {"step": step, "version": version, **batch_stats(batch, coll.groups, step),
                      **collect_stats(coll), **m, "time_batch_s": t_batch}
            if version % cfg.push.every == 0 or version == cfg.total_steps:
                t0 = time.perf_counter()
                res = await self.push(version)
                record.update(time_push_s=time.perf_counter() - t0, push_write_s=res.write_s)
                if self.notifying is None:  # completed within this step: report it
                    settled = {"push_notify_s": res.notify_s, "push_ok": len(res.ok),
                               "push_failed": sorted(res.failed),
                               "push_canary_refused": sorted(res.canary_refused)}
            record.update(settled)
            self.uncommitted += coll.consumed
            self.boundary = DriverState.from_dict(driver.state.to_dict())
            if cfg.checkpoint.every and version % cfg.checkpoint.every == 0:
                record["time_ckpt_s"] = await self.save(version)
                last_ckpt = version
            record.update(inflight=len(driver.state.inflight), admitted=driver.state.admitted,
                          inbox_pending=self.inbox.pending(),
                          **{f"data_skipped_{k}": v for k, v in self.source.skipped.items()},
                          **{f"total_{k}": v for k, v in driver.state.totals.items()},
                          time_step_s=time.perf_counter() - t_step)
            sink.log(record, staleness=batch.staleness.tolist(),
                     trained=trained_record(coll.groups, step))
        settled = await self.settle()  # the services serve the last pushed version from here
        if settled.get("push_failed"):
            log.error("final weight push v%d failed for %s", version, settled["push_failed"])
        completed = version >= cfg.total_steps
        ckpt_path = None
        if last_ckpt != version and (completed or cfg.checkpoint.on_sigterm):
            await self.save(version)
            last_ckpt = version
        if last_ckpt == version:
            ckpt_path = str(self.coll.ckpt.root / f"step-{version:08d}")
        final = None
        if completed and cfg.export_final:
            final = await self._all("export")
        return {"start_step": self.start_step, "version": version, "completed": completed,
                "stopped": self.stop_reason, "checkpoint": ckpt_path,
                "final_model": str(final) if final else None, "output_dir": str(cfg.out),
                "last_metrics": record}


def main(argv: list[str] | None = None) -> None:
    """`python -m trainer.main --config FILE [--resume]` (torchrun-compatible)."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = TrainerConfig.load(a.config)
    summary = run_trainer(cfg, BusSettings.load(a.config), resume=a.resume)
    if summary:
        print(json.dumps({k: v for k, v in summary.items() if k != "last_metrics"}))


if __name__ == "__main__":
    main()


__all__ = ["TrainerError", "main", "run_trainer"]

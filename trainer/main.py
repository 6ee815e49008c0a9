"""The trainer process. Entry point: `run_trainer(cfg, bus, resume=...)`, called on every rank
(one process per device; a plain single process needs no launcher).

Rank 0 runs the loop (`_RankZeroLoop`); what every rank does together (the update, gathers,
checkpoints) is in trainer/collectives.py, and how weights travel in trainer/transports/.
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

import httpx
import torch

from protocol.bus import Bus
from protocol.canary import Canary
from protocol.config import BusSettings, secret_value
from protocol.messages import ScoredGroup, VerifiedGroup
from protocol.topology import STAGES, trainer_input
from protocol.trace import span
from protocol.weights_client import WeightsClient
from trainer import dist
from trainer.batch import build_batch
from trainer.bus_sync import inbox_key, mark, resync
from trainer.canary import canary_dtype, fixed_sequences
from trainer.checkpoint import Checkpointer
from trainer.collectives import CollectiveOps, RankZero, push_dtype
from trainer.config import DiskPush, ServiceEndpoint, TrainerConfig
from trainer.data import PromptSource
from trainer.driver import Driver, DriverState
from trainer.fingerprint import check_resume, fingerprint, record_config
from trainer.inbox import Inbox
from trainer.metrics import MetricsSink
from trainer.model import build_policy
from trainer.output_lock import OutputLock
from trainer.reference import build_reference
from trainer.stats import batch_stats, collect_stats, trained_record
from trainer.threads import ThreadSwitch
from trainer.transports import PushResult, make_transport

log = logging.getLogger("rlrt.trainer")

class TrainerError(RuntimeError):
    pass


def _served(svc: ServiceEndpoint, cfg: DiskPush) -> int | None:
    """The weights version `svc` serves by its own answer; None when it does not say (down,
    still starting): it is asked again at the next catch-up."""
    client = WeightsClient(svc.name, svc.url, secret_value(cfg.control_token))
    try:
        v = client.version(timeout=cfg.connect_timeout_s).get("version")
    except (httpx.HTTPError, ValueError):
        return None
    return v if isinstance(v, int) else None


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_trainer(cfg: TrainerConfig, bus: BusSettings, *, resume: bool = False,
                resume_from: int | None = None, allow_config_change: bool = False
                ) -> dict[str, Any]:
    """Run (or, with `resume`, continue from the newest checkpoint that verifies; with
    `resume_from`, from that step's) the training loop. Returns a summary on rank 0 ({} on the
    other ranks). Raises on unrecoverable errors (DriverError: the pipeline stopped
    delivering; TrainerError; config errors; ConfigChanged: a resume that would change what
    the run trains, unless `allow_config_change`; DirBusy: another trainer writes to the
    output folder)."""
    import contextlib
    import os

    # Rank 0 holds the output folder for the run (trainer/output_lock.py).
    first = os.environ.get("RANK", "0") == "0"
    with OutputLock(cfg.out) if first else contextlib.nullcontext():
        return _run_trainer(cfg, bus, resume=resume or resume_from is not None,
                            resume_from=resume_from, allow_config_change=allow_config_change)


def _run_trainer(cfg: TrainerConfig, bus: BusSettings, *, resume: bool,
                 resume_from: int | None, allow_config_change: bool) -> dict[str, Any]:
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
    state = ckpt.load(policy, step=resume_from) if resume else None
    if resume and state is None:
        log.warning("--resume: no checkpoint in %s; starting a fresh run", ckpt.root)
    changed = check_resume(cfg, state, allow_change=allow_config_change)
    reference = build_reference(cfg, rank=rank, world_size=world, device=device)
    ops = CollectiveOps(cfg, policy, ckpt, tokenizer, reference,
                        threads=_thread_switch(cfg, policy, world, device))
    if rank != 0:
        ops.follow()
        return {}
    return asyncio.run(_RankZeroLoop(cfg, bus, RankZero(ops), tokenizer, state, changed).run())


def _thread_switch(cfg: TrainerConfig, policy: Any, world: int, device: str
                   ) -> ThreadSwitch | None:
    """trainer.idle_threads (trainer/threads.py): one CPU process, not bitwise-deterministic."""
    if cfg.idle_threads is None or cfg.idle_threads == torch.get_num_threads():
        return None
    if world > 1 or device != "cpu" or cfg.deterministic:
        log.warning("trainer.idle_threads ignored: it applies to one CPU trainer process "
                    "without trainer.deterministic")
        return None
    switch = ThreadSwitch(busy=torch.get_num_threads(), idle=cfg.idle_threads)
    switch.attach(policy.hf_model)
    return switch


class _RankZeroLoop:
    """The training loop, on rank 0: the bus, the driver, weight pushes, metrics and
    checkpoints. The work of every rank it asks of `ranks` (trainer/collectives.py)."""

    def __init__(self, cfg: TrainerConfig, bus: BusSettings, ranks: RankZero, tokenizer: Any,
                 state: dict[str, Any] | None, changed: list[str] | None = None) -> None:
        self.cfg = cfg
        self.fingerprint = fingerprint(cfg)  # saved with every checkpoint
        self.changed = changed or []  # fingerprint changes this resume accepted
        self.bus_cfg = bus
        self.ranks = ranks
        self.policy = ranks.ops.policy
        self.tokenizer = tokenizer
        self.state = state
        self.start_step = int(state["step"]) if state else 0
        self.stop = asyncio.Event()
        self.stop_reason: str | None = None
        self.pushes = 0
        self.transport = make_transport(
            cfg.push, cfg.weights_root, cfg.run_id,
            extra_files={"config.json": self.policy.hf_model.config.to_json_string()})
        self.unreported: PushResult | None = None  # a finished push not yet in the metrics
        self.last_pushed: int | None = None  # the version of this process's last push
        self.caught_up: list[str] = []  # services caught up during this step (metrics)
        self.canary_seqs: list[list[int]] | None = None  # fixed for the run
        self.bus = Bus.from_url(None, bus)
        self.dstate = DriverState.from_dict(state["driver"]) if state else DriverState()
        self.inbox = Inbox(self.bus.r, inbox_key(bus.prefix, self.dstate.nonce))
        # The driver state at the last completed step, and the groups trained since the last
        # checkpoint: what the next checkpoint saves and lets the inbox forget.
        self.boundary = DriverState.from_dict(self.dstate.to_dict())
        self.uncommitted: list[str] = []
        # Built by run(), inside its clean-up: reading the data may fail, and the other ranks
        # must then be released.
        self.source: PromptSource | None = None
        self.driver: Driver | None = None
        self.admission: asyncio.Task | None = None  # the step's admission, after the push loads
        self.settled: dict[str, Any] = {}  # the figures of the last push loaded (metrics)

    # ------------------------------------------------------------------ helpers
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

    async def _receive(self, group: ScoredGroup) -> None:
        """Bus handler: into the inbox; the update may take the idle cores once the pipeline
        has drained (trainer.idle_threads)."""
        await self.inbox.receive(group)
        self._drained()

    async def _receive_unscored(self, group: VerifiedGroup) -> None:
        """Bus handler of a run without a teacher service (trainer.teacher_service false)."""
        await self._receive(ScoredGroup.unscored(group))

    def _drained(self) -> None:
        threads = self.ranks.ops.threads
        if threads is not None and self.driver is not None:
            # An admission still to come (`_admit`) is work about to start upstream.
            admitting = self.admission is not None and not self.admission.done()
            threads.set_drained(not admitting and self.driver.drained())

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
        logprobs = await self.ranks.canary_logprobs(self.canary_seqs)
        dtype = canary_dtype(self.policy.dtype, push_dtype(self.cfg, self.policy))
        return Canary(sequences=self.canary_seqs, logprobs=logprobs, dtype=dtype)

    async def push(self, version: int) -> PushResult:
        """Push `version` to the services by the configured transport (trainer/transports/).
        A disk push with push.overlap returns once the directory is written -- the weights may
        change from here on -- and the services are notified in the background; `settle()`
        collects that result."""
        index, self.pushes = self.pushes, self.pushes + 1
        canary = await self.canary()
        res = await self.transport.push(version, self.ranks, index=index, canary=canary)
        self.last_pushed = version
        self._check_push(res)
        return res

    async def catch_up(self, version: int) -> None:
        """The driver met a stale group, or one scored by an older teacher (trainer/driver.py,
        "Services behind"). Ask each service the version it serves; push the current weights
        (version `version`) to those serving older than this process's last push, and wait for
        them (push.catch_up)."""
        cfg = self.cfg.push
        if not cfg.catch_up or not cfg.services or self.last_pushed is None:
            return
        served = await asyncio.gather(*(asyncio.to_thread(_served, s, cfg) for s in cfg.services))
        behind = [s for s, v in zip(cfg.services, served, strict=True)
                  if v is not None and v < self.last_pushed]
        if not behind:
            return
        log.warning("catch-up: %s serve%s older weights than pushed (v%d); pushing v%d to them",
                    ", ".join(f"{s.name} (v{v})" for s, v in zip(cfg.services, served, strict=True)
                              if s in behind), "" if len(behind) > 1 else "s",
                    self.last_pushed, version)
        res = await self.transport.catch_up(behind, version, self.ranks, await self.canary())
        self.caught_up += res.ok
        if res.failed:
            log.error("catch-up push v%d failed for %s", version, res.failed)

    def _check_push(self, res: PushResult) -> None:
        if res.failed and self.cfg.push.on_failure == "raise":
            raise TrainerError(f"weight push v{res.version} failed: {res.failed}")

    async def settle(self) -> dict[str, Any]:
        """Wait for a push still notifying in the background; the figures of the previous
        push (that one, or the last synchronous one not yet reported), for the metrics."""
        t0 = time.perf_counter()
        loaded = await self.transport.settle()
        if loaded is not None:
            self.unreported = loaded
            self._check_push(loaded)
        res, self.unreported = self.unreported, None
        if res is None:
            return {}
        return {"push_wait_s": time.perf_counter() - t0, "push_notify_s": res.notify_s,
                "push_ok": len(res.ok), "push_failed": sorted(res.failed),
                "push_canary_refused": sorted(res.canary_refused)}

    async def _settle(self) -> None:
        """Wait for the last push to load (the driver's before_admit); keep its figures."""
        self.settled = await self.settle()

    async def _admit(self, driver: Driver, step: int) -> None:
        """In the background of step `step`'s update: the services load the last push, then
        the prompts the driver did not admit go out."""
        await self._settle()
        await driver.top_up(step)
        self._drained()  # the rollout has work again: the update gives its core back

    async def _admitted(self) -> None:
        """The background admission has finished (its error, if any, is raised here)."""
        if self.admission is not None:
            task, self.admission = self.admission, None
            await task

    async def save(self, version: int) -> float:
        t0 = time.perf_counter()
        assert self.source is not None, "run() builds the prompt source before any step"
        state = {"version": version, "driver": self.boundary.to_dict(),
                 "data_skipped": dict(self.source.skipped), "fingerprint": self.fingerprint,
                 "bus_marked": True}
        await self.ranks.save_checkpoint(version, state)
        await self.inbox.commit(self.uncommitted)  # only now are those groups safe to forget
        self.uncommitted = []
        # The bus now reflects this checkpoint (trainer/bus_sync.py checks it on resume).
        await mark(self.inbox.r, self.bus_cfg.prefix, self.boundary.nonce, version)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ the loop
    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        record_config(cfg, self.start_step, self.fingerprint, self.changed)
        bus, dstate = self.bus, self.dstate
        consume_stop = asyncio.Event()
        consumer: asyncio.Task | None = None
        sink: MetricsSink | None = None
        finished = False  # the loop returned (done or a resumable stop), not raised
        try:
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
                bus=bus, prompts_stream=self.bus_cfg.stream(STAGES["trainer"].out_stream), inbox=self.inbox,
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
                rescore_stream=self.bus_cfg.stream(STAGES["teacher"].in_stream),
                max_without_context=cfg.max_groups_without_context,
                dead_tolerance=cfg.dead_letter_tolerance, on_lagging=self.catch_up)
            self.driver = driver
            # A bus that lost or outran the checkpoint's history: its tasks are re-admitted.
            self.resync = self.state and await resync(bus.r, self.bus_cfg.prefix, driver,
                                                      self.start_step, self.state)
            self.inbox = self.resync.inbox if self.resync else self.inbox
            sink = MetricsSink(cfg.out, cfg.metrics, total_steps=cfg.total_steps,
                               start_step=self.start_step)
            # Without a teacher service the verifier's groups are the input (unscored).
            in_stream, in_type = trainer_input(cfg.teacher_service)
            consumer = asyncio.create_task(bus.consume(
                self.bus_cfg.stream(in_stream), STAGES["trainer"].group, "trainer-0",
                self._receive if cfg.teacher_service else self._receive_unscored,
                in_type, consume_stop, concurrency=16))
            self._install_signals()
            log.info("trainer: start at step %d of %d (restored %d uncommitted groups)",
                     self.start_step, cfg.total_steps, restored)
            result = await self._loop(driver, sink, consumer)
            finished = True
            return result
        finally:
            if self.admission is not None:
                self.admission.cancel()
            consume_stop.set()
            if consumer is not None:
                try:
                    await asyncio.wait_for(consumer, timeout=10)
                except (asyncio.TimeoutError, Exception) as e:  # noqa: BLE001 - shutting down
                    log.debug("consumer shutdown: %r", e)
            try:
                await self.ranks.stop(failed=not finished)
            except Exception as e:  # noqa: BLE001 - best effort: peers time out otherwise
                log.error("could not stop the other ranks: %r", e)
            if sink is not None:
                sink.close()
            await self.transport.close()
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
        if self.resync:
            await self.resync.readmit(version)
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
            # When this step's groups are already here (max_staleness >= 1) the update need not
            # wait for that: the driver takes them without admitting, and the admission waits
            # for the load in the background while the update runs (`_admit`).
            with span("trainer", "wait"):  # for the groups (and the last push to load)
                self.settled = {}
                collected = await driver.collect(step, self.stop, before_admit=self._settle)
            if collected is None:
                break
            if not collected.admitted:
                self.admission = asyncio.create_task(self._admit(driver, step))
            t0 = time.perf_counter()
            batch = build_batch(collected.groups, step, self.tokenizer.pad_token_id or 0,
                                self._max_seq_len())
            t_batch = time.perf_counter() - t0
            self._drained()  # with max_staleness 0 nothing is in flight: all cores at once
            with span("trainer", "update"):
                m = await self.ranks.train(batch, step)
            version = step + 1
            await self._admitted()  # long done: loading a push takes less than an update
            settled = self.settled
            record = {"step": step, "version": version,
                      **batch_stats(batch, collected.groups, step),
                      **collect_stats(collected), **m, "time_batch_s": t_batch}
            if version % cfg.push.every == 0 or version == cfg.total_steps:
                t0 = time.perf_counter()
                with span("trainer", "push"):
                    res = await self.push(version)
                record.update(time_push_s=time.perf_counter() - t0, push_write_s=res.write_s)
                if not self.transport.in_flight:  # completed within this step: report it
                    settled = {"push_notify_s": res.notify_s, "push_ok": len(res.ok),
                               "push_failed": sorted(res.failed),
                               "push_canary_refused": sorted(res.canary_refused)}
            record.update(settled)
            if self.caught_up:
                record["push_catch_up"], self.caught_up = sorted(self.caught_up), []
            self.uncommitted += collected.consumed
            self.boundary = DriverState.from_dict(driver.state.to_dict())
            if cfg.checkpoint.every and version % cfg.checkpoint.every == 0:
                with span("trainer", "checkpoint"):
                    record["time_ckpt_s"] = await self.save(version)
                last_ckpt = version
            record.update(inflight=len(driver.state.inflight), admitted=driver.state.admitted,
                          inbox_pending=self.inbox.pending(),
                          **{f"data_skipped_{k}": v for k, v in self.source.skipped.items()},
                          **{f"total_{k}": v for k, v in driver.state.totals.items()},
                          time_step_s=time.perf_counter() - t_step)
            sink.log(record, staleness=batch.staleness.tolist(),
                     trained=trained_record(collected.groups, step))
        settled = await self.settle()  # the services serve the last pushed version from here
        if settled.get("push_failed"):
            log.error("final weight push v%d failed for %s", version, settled["push_failed"])
        completed = version >= cfg.total_steps
        ckpt_path = None
        if last_ckpt != version and (completed or cfg.checkpoint.on_sigterm):
            await self.save(version)
            last_ckpt = version
        if last_ckpt == version:
            ckpt_path = str(self.ranks.ops.ckpt.root / f"step-{version:08d}")
        final = None
        if completed and cfg.export_final:
            final = await self.ranks.export_final()
        return {"start_step": self.start_step, "version": version, "completed": completed,
                "stopped": self.stop_reason, "checkpoint": ckpt_path,
                "final_model": str(final) if final else None, "output_dir": str(cfg.out),
                "last_metrics": record}


def main(argv: list[str] | None = None) -> None:
    """`python -m trainer.main -c FILE [--set KEY.PATH=VALUE ...] [--resume] [--print-config]`,
    torchrun-compatible: every rank resolves the same config (protocol/config.py)."""
    import argparse
    import json
    import sys

    import yaml

    from protocol.config import ConfigError, dump_config, resolve

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", required=True,
                   help="run config (YAML): the trainer and bus sections, top-level model/data")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY.PATH=VALUE",
                   help="override a config value (YAML value), e.g. --set trainer.lr=1e-5; "
                   "beats the YAML and its environment form RLRT_<SECTION>__<FIELD>; repeatable")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved trainer and bus sections (YAML) and exit")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--resume-from", type=int, default=None, metavar="STEP",
                   help="resume from this (older) checkpoint step")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the algorithm, group size, model, data or task changed")
    a = p.parse_args(argv)
    try:
        raw = resolve(a.config, a.sets, models={"trainer": TrainerConfig, "bus": BusSettings})
        cfg, bus = TrainerConfig.from_resolved(raw), BusSettings.from_resolved(raw)
    except ConfigError as e:  # one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if a.print_config:
        print(yaml.safe_dump({"trainer": dump_config(cfg), "bus": dump_config(bus)},
                             sort_keys=False), end="")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    summary = run_trainer(cfg, bus, resume=a.resume,
                          resume_from=a.resume_from, allow_config_change=a.allow_config_change)
    if summary:
        print(json.dumps({k: v for k, v in summary.items() if k != "last_metrics"}))


if __name__ == "__main__":
    main()


__all__ = ["TrainerError", "main", "run_trainer"]

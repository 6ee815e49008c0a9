"""TEST HARNESS (not service code): a stand-in for the whole rollout -> verifier -> teacher
pipeline, so the trainer's driver can be tested against real Redis and real HTTP without
the services.

- `POST /v1/weights` / `GET /v1/version`: a small FastAPI test double of the services'
  documented control API. It loads the pushed safetensors directory (sha256-checked) into its
  model, and can be told to fail (HTTP status), to be slow, or to refuse.
- A bus consumer turns each PromptTask into a ScoredGroup: G responses sampled from the tiny
  model in plain torch (seeded by the task's sampling seed), a toy reward (parity of the
  token ids' sum: about half correct, deterministic), and teacher log-probs from the same
  model where the task's TeacherRequest asks for them (tasks.teacher builds the context).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Header, HTTPException
from support.serve import serve_app as serve  # the control API double runs like any test app
from transformers import AutoModelForCausalLM, AutoTokenizer

from protocol.bus import Bus
from protocol.config import BusSettings
from protocol.messages import (
    PromptTask,
    Response,
    ScoredGroup,
    TeacherScores,
    Verification,
    VerifiedGroup,
    WeightUpdate,
    derive_id,
)
from protocol.weights import load_weights_dir
from tasks.teacher import teacher_context_for_group, teacher_needed_for_group
from trainer.config import TrainerConfig


def parity_reward(token_ids: list[int]) -> float:
    return 1.0 if sum(token_ids) % 2 == 0 else 0.0


@dataclass
class Controls:
    """Knobs a test flips to make the weights endpoint misbehave."""

    fail_times: int = 0  # the next n calls answer `fail_status`
    fail_status: int = 503
    delay_s: float = 0.0  # every call waits this long before answering
    calls: list[int] = field(default_factory=list)  # versions received, in order
    # A push of this version finds the service just restarted: it answers 503 and serves its
    # base weights (version 0) from then on, as a killed service that came back would.
    restart_at: int | None = None


def weights_app(on_update: Callable[[WeightUpdate], None], controls: Controls,
                version: Callable[[], int], token: str | None,
                on_restart: Callable[[], None] | None = None) -> FastAPI:
    """The test double of POST /v1/weights and GET /v1/version."""
    app = FastAPI()

    def auth(authorization: str | None) -> None:
        if token and authorization != f"Bearer {token}":
            raise HTTPException(401, "bad token")

    @app.post("/v1/weights")
    async def weights(update: WeightUpdate, authorization: str | None = Header(None)) -> dict:
        auth(authorization)
        controls.calls.append(update.version)
        if controls.delay_s:
            await asyncio.sleep(controls.delay_s)
        if controls.fail_times > 0:
            controls.fail_times -= 1
            raise HTTPException(controls.fail_status, "told to fail")
        if controls.restart_at == update.version and on_restart is not None:
            controls.restart_at = None
            await asyncio.to_thread(on_restart)
            raise HTTPException(503, "engine not ready: restarting")
        await asyncio.to_thread(on_update, update)
        return {"ok": True, "version": update.version}

    @app.get("/v1/version")
    async def get_version(authorization: str | None = Header(None)) -> dict:
        auth(authorization)
        return {"version": version()}

    return app


class StandinPipeline:
    def __init__(self, model_dir: str | Path, bus: BusSettings, *, token: str | None = None,
                 reward: Callable[[list[int]], float] = parity_reward) -> None:
        self.model_dir = str(model_dir)
        self.bus_cfg = bus
        self.token = token
        self.reward = reward
        self.tok = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        self.model.eval()
        self.version = 0
        self.lock = threading.Lock()
        self.controls = Controls()
        self.handled = 0
        self.rescored = 0  # groups scored again for a trainer at a newer version
        self.busy = 0
        self.restarts = 0
        self._stop = threading.Event()

    # ------------------------------------------------------------------ weights
    def load(self, update: WeightUpdate) -> None:
        sd = load_weights_dir(update.location, update.sha256)
        with self.lock:
            missing, unexpected = self.model.load_state_dict(sd, strict=False)
            tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
            if set(missing) - tied or unexpected:
                raise ValueError(f"weights do not fit: missing {missing} unexpected {unexpected}")
            self.model.tie_weights()
            self.version = update.version

    def restart(self) -> None:
        """Back to the base weights, version 0 (Controls.restart_at)."""
        base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        with self.lock:
            self.model.load_state_dict(base.state_dict())
            self.version = 0
            self.restarts += 1

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, task: PromptTask) -> tuple[list[Response], int]:
        g = torch.Generator().manual_seed(int(task.sampling.seed or 0))
        eos = self.tok.eos_token_id
        with self.lock:
            version = self.version
            out = []
            for _ in range(task.group_size):
                ids = [int(x) for x in task.prompt_ids]
                toks: list[int] = []
                lps: list[float] = []
                finish = "length"
                for _ in range(task.sampling.max_new_tokens):
                    logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
                    logp = torch.log_softmax(logits / max(task.sampling.temperature, 1e-6), -1)
                    t = int(torch.multinomial(logp.exp(), 1, generator=g))
                    toks.append(t)
                    lps.append(float(logp[t]))
                    ids.append(t)
                    if t == eos:
                        finish = "stop"
                        break
                out.append(Response(token_ids=np.asarray(toks, np.int32),
                                    logprobs=np.asarray(lps, np.float32), finish_reason=finish))
        return out, version

    @torch.no_grad()
    def teacher_scores(self, group: VerifiedGroup) -> list[TeacherScores | None]:
        need = teacher_needed_for_group(group)
        out: list[TeacherScores | None] = []
        for i, want in enumerate(need):
            ctx = teacher_context_for_group(group, i, self.tok) if want else None
            if ctx is None:
                out.append(None)
                continue
            with self.lock:
                logits = self.model(input_ids=torch.tensor([ctx.input_ids])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            n = len(ctx.input_ids) - ctx.response_start
            pos = torch.arange(ctx.response_start, ctx.response_start + n)
            q = logp[pos - 1, torch.tensor(ctx.input_ids)[pos]]
            out.append(TeacherScores(logprobs=q.numpy().astype(np.float32),
                                     context_mode=ctx.demonstration.mode,
                                     demo_index=ctx.demonstration.index))
        return out

    async def handle(self, task: PromptTask, bus: Bus) -> None:
        self.busy += 1
        try:
            responses, version = await asyncio.to_thread(self.sample, task)
            verifs = []
            for r in responses:
                rew = self.reward(r.token_ids.tolist())
                verifs.append(Verification(reward=rew, correct=rew == 1.0))
            vg = VerifiedGroup(run_id=task.run_id, msg_id=derive_id(task.msg_id, "verified"),
                               task=task, responses=responses, engine_version=version,
                               verifications=verifs, parent_id=task.msg_id)
            teacher = await asyncio.to_thread(self.teacher_scores, vg)
            scored_tok = sum(len(t.logprobs) for t in teacher if t is not None)
            sg = ScoredGroup(**{**vg.model_dump(), "msg_id": derive_id(task.msg_id, "scored")},
                             teacher=teacher, teacher_version=version, scored_tokens=scored_tok,
                             skipped_tokens=sum(len(r.token_ids) for r in responses) - scored_tok)
            await bus.publish(self.bus_cfg.stream("scored"), sg)
            self.handled += 1
        finally:
            self.busy -= 1

    async def rescore(self, vg: VerifiedGroup, bus: Bus) -> None:
        """What the teacher service does with a group the trainer sends back (teacher_version
        match_s): score it again with the current weights."""
        version = self.version
        teacher = await asyncio.to_thread(self.teacher_scores, vg)
        scored_tok = sum(len(t.logprobs) for t in teacher if t is not None)
        sg = ScoredGroup(**{**vg.model_dump(), "msg_id": derive_id(vg.msg_id, "scored")},
                         teacher=teacher, teacher_version=version, scored_tokens=scored_tok,
                         skipped_tokens=sum(len(r.token_ids) for r in vg.responses) - scored_tok)
        await bus.publish(self.bus_cfg.stream("scored"), sg)
        self.rescored += 1

    # ------------------------------------------------------------------ running
    def _consume(self) -> None:
        async def main() -> None:
            bus = Bus.from_url(None, self.bus_cfg)
            stop = asyncio.Event()

            async def watch() -> None:
                while not self._stop.is_set():
                    await asyncio.sleep(0.05)
                stop.set()

            w = asyncio.create_task(watch())
            try:
                await asyncio.gather(
                    bus.consume(self.bus_cfg.stream("prompts"), "standin", "standin-0",
                                lambda t: self.handle(t, bus), PromptTask, stop),
                    bus.consume(self.bus_cfg.stream("verified"), "standin-teacher",
                                "standin-0", lambda g: self.rescore(g, bus), VerifiedGroup,
                                stop))
            finally:
                w.cancel()
                await bus.close()

        asyncio.run(main())

    @contextlib.contextmanager
    def running(self) -> Iterator[str]:
        """Serve the weights endpoint and consume prompts; yields the base URL."""
        app = weights_app(self.load, self.controls, lambda: self.version, self.token,
                          self.restart)
        with serve(app) as url:
            th = threading.Thread(target=self._consume, daemon=True)
            th.start()
            try:
                yield url
            finally:
                self._stop.set()
                th.join(timeout=30)


def standin_config(model: str | Path, out: str | Path, url: str, *,
                   push: dict | None = None, **overrides: object) -> TrainerConfig:
    """The small trainer config the stand-in tests share (2 prompts x G 4, 6 tokens, ZeRO 0,
    one torch thread), pushing to the stand-in at `url` with its token; `push` adds push
    knobs, `overrides` replace any other field."""
    fields: dict = dict(
        model_path=str(model), output_dir=str(out), zero_stage=0, prompts_per_step=2,
        group_size=4, sampling={"max_new_tokens": 6, "seed": 7}, lr=1e-3, warmup_steps=1,
        total_steps=3, max_staleness=1, zero_variance="backfill", algorithm={"preset": "rlrt"},
        torch_threads=1, micro_batch_size=4, data={"source": "countdown", "num_prompts": 30},
        metrics={"prometheus_port": 0})
    fields.update(overrides)
    fields["push"] = {"services": [{"name": "standin", "url": url}], "control_token": "tok",
                      **(push or {})}
    return TrainerConfig(**fields)

"""vLLM backend (teacher on GPUs): a client of a running `vllm serve` (OpenAI server, vLLM
>= 0.22 with VLLM_SERVER_DEV_MODE=1 and `--weight-transfer-config '{"backend":"nccl"}'`).

Wire formats: docs/engines.md ("vLLM").

Scoring a given continuation: POST /v1/completions with `prompt` = token ids (a batch of
sequences), `max_tokens: 1`, `prompt_logprobs: 0`. `choices[i].prompt_logprobs` is aligned to
the prompt: entry 0 is null (nothing predicts the first token), entry j is a dict keyed by
the *string* token id holding the actual token (plus top-k); we look up `str(seq[j])`. NaN
becomes -inf (as TRL does). Prompt log-probs are raw in every `--logprobs-mode`. Batches are
cut by a token budget: prompt log-probs cost a full-vocabulary log-softmax per token.

Weight updates (docs/engines.md), inside POST /pause?mode=wait ... POST /resume:
- nccl: [POST /shutdown_weight_transfer_engine -> /init_weight_transfer_engine] (when the
  group is new: vLLM overwrites its communicator on a re-init without destroying it, so the
  old one is shut down first) -> /start_weight_update -> /update_weights per bucket (each
  blocks until the trainer's broadcast of that bucket arrives) -> /finish_weight_update
  {weight_version}. A session left open (this service restarted mid-update) makes vLLM refuse
  the start and the shutdown: it is finished (no version) and the call repeated.
- disk fallback: POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path"}}
  (the worker's reload_weights(weights_path=...)) -> /update_weight_version.
Both then POST /reset_prefix_cache: cached KV was computed with the old weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from protocol.messages import SamplingParams, WeightUpdate
from services.engines.base import (
    EngineError,
    GenOutput,
    InvalidRequest,
    UpstreamError,
    WeightUpdateError,
    check_prompt,
    check_score_request,
)
from services.engines.http import EngineHTTP, as_logprob, parse_version
from services.engines.nccl_sync import GroupKey, NcclSpec, nccl_from_packages
from services.engines.remote import INCONSISTENT, VERSION, RemoteEngine, UpdateRefused

log = logging.getLogger("rlrt.engines.vllm")
_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}
# vLLM 0.32's worker refusals while a weight-update session is open (v1/worker/gpu_worker.py;
# the API server answers 500 "Call to collective_rpc method failed: <text>"):
SESSION_ACTIVE = "called while a weight update is already active"  # start_weight_update
SHUTDOWN_REFUSED = "Cannot release a trainer connection during a weight update"


class VLLMEngine(RemoteEngine):
    kind = "vllm"

    def __init__(self, http: EngineHTTP, *, served_model_name: str | None = None,
                 max_tokens_per_request: int = 16384, reload_method: str = "reload_weights",
                 follow: bool = False, **kw: Any) -> None:
        super().__init__(http, **kw)
        # follow: another service (the rollout's) loads the weights into this server; this one
        # only adopts the version the server reports (engine.share_rollout_server)
        self.follow = follow
        self._server_lost = False  # a request failed in transport: the server may have restarted
        self.served_model_name = served_model_name
        self.max_tokens_per_request = max_tokens_per_request
        # the worker method of a disk update: "rlrt_reload_weights" when the server runs our
        # worker extension (services/engines/vllm_ext: tied embeddings on vLLM-CPU)
        self.reload_method = reload_method
        # "server" once /get_world_size answered: then the trainer must agree (docs/engines.md)
        self.world_size_from = "config"
        self.nccl_version: str | None = None  # the server's, when it says (start())

    async def start(self) -> None:
        await super().start()
        if self.served_model_name is None:
            data = await self.http.get("/v1/models", timeout_s=30)
            try:
                self.served_model_name = str(data["data"][0]["id"])
            except (KeyError, IndexError, TypeError) as e:
                raise UpstreamError(f"vllm /v1/models: malformed reply ({e})") from None
        try:
            # TP x PP x DP (include_dp defaults to true): every worker of every DP replica joins
            # the one group, ranked rank_offset + dp_rank * TP*PP + rank (nccl_common.py)
            data = await self.http.get("/get_world_size", timeout_s=30)
            self.engine_world_size = int(data["world_size"])
            self.world_size_from = "server"
        except (EngineError, KeyError, TypeError, ValueError):
            pass  # dev endpoints off: keep the configured size
        self.nccl_version = await self._server_nccl()

    async def _server_nccl(self) -> str | None:
        """The NCCL the server's PyNccl loads, for the trainer to compare before a group
        forms: vLLM's dev GET /server_info lists its environment's packages (torch's
        nvidia-nccl wheel). None when unknown: the endpoint is off, or VLLM_NCCL_SO_PATH
        points PyNccl at another library."""
        try:
            info = await self.http.get("/server_info", params={"config_format": "json"},
                                       timeout_s=120)
            if (info.get("vllm_env") or {}).get("VLLM_NCCL_SO_PATH"):
                return None
            return nccl_from_packages(str(info["system_env"]["pip_packages"] or ""))
        except (EngineError, KeyError, TypeError, AttributeError) as e:
            log.info("vllm /server_info: no NCCL version (%s)", e)
            return None

    async def health(self) -> dict[str, Any]:
        return {**await super().health(), "engine_world_size_from": self.world_size_from,
                "nccl_version": self.nccl_version}

    # ------------------------------------------------------------------ scoring
    async def score(self, sequences: Sequence[Sequence[int]],
                    response_offsets: Sequence[int]) -> list[np.ndarray]:
        if not self.follow:
            return await self._score(sequences, response_offsets, gated=True)
        # Another service swaps this server's weights: read its version before and after; the
        # same version on both sides means every sequence was scored by it (a swap needs a
        # pause, which drains running requests). A change shows the teacher worker a new
        # version, and it scores again.
        before = await self._follow_version()
        out = await self._score(sequences, response_offsets, gated=True)
        after = await self._follow_version()
        if after != before:
            log.info("vllm weights changed from %s to %s during scoring", before, after)
        return out

    async def _srv_score(self, sequences: list[list[int]], offsets: list[int]) -> list[np.ndarray]:
        return await self._score(sequences, offsets, gated=False)

    async def _score(self, sequences: Sequence[Sequence[int]], response_offsets: Sequence[int],
                     *, gated: bool) -> list[np.ndarray]:
        # max_tokens=1 needs one free position after the sequence.
        limit = (self.context_len - 1) if self.context_len else 2**31 - 1
        seqs = check_score_request(sequences, response_offsets, self.vocab_size or 2**31 - 1, limit)
        out: list[np.ndarray] = []
        for chunk in self._chunks(seqs):
            lps = await self._prompt_logprobs([seqs[i] for i in chunk], gated=gated)
            for i, row in zip(chunk, lps, strict=True):
                out.append(np.asarray(row[int(response_offsets[i]):], dtype=np.float32))
        return out

    def _chunks(self, seqs: list[list[int]]) -> list[list[int]]:
        chunks: list[list[int]] = [[]]
        size = 0
        for i, s in enumerate(seqs):
            if chunks[-1] and size + len(s) > self.max_tokens_per_request:
                chunks.append([])
                size = 0
            chunks[-1].append(i)
            size += len(s)
        return [c for c in chunks if c]

    async def _prompt_logprobs(self, seqs: list[list[int]], *,
                               gated: bool = True) -> list[list[float]]:
        body = {"model": self.served_model_name, "prompt": seqs, "max_tokens": 1,
                "temperature": 0.0, "prompt_logprobs": 0}
        # ungated: the weight canary, scored inside an update while our gate is closed
        async with self._request_slot() if gated else contextlib.nullcontext():
            raw = await self._completions(body)
        choices = self._choices(raw, len(seqs))
        out = []
        for i, (choice, seq) in enumerate(zip(choices, seqs, strict=True)):
            plp = choice.get("prompt_logprobs")
            if not isinstance(plp, list) or len(plp) != len(seq):
                raise UpstreamError(f"malformed vllm reply: prompt_logprobs of sequence {i} has "
                                    f"{len(plp) if isinstance(plp, list) else plp!r} entries "
                                    f"for {len(seq)} tokens")
            row = [float("nan")]  # position 0 has no log-prob (vLLM sends null)
            for j in range(1, len(seq)):
                entry = plp[j]
                hit = entry.get(str(seq[j])) if isinstance(entry, dict) else None
                if not isinstance(hit, dict) or "logprob" not in hit:
                    raise UpstreamError(f"malformed vllm reply: no log-prob for token {seq[j]} at "
                                        f"position {j} of sequence {i}")
                row.append(as_logprob(hit["logprob"], f"sequence {i} position {j}"))
            out.append(row)
        return out

    async def _completions(self, body: dict[str, Any]) -> Any:
        """POST /v1/completions. After a transport failure (the server died or restarted) the
        server's version is checked first: a restarted server serves its base weights, so this
        quarantines (and the request waits for a push) instead of stamping them with ours."""
        for attempt in range(2):
            if self._server_lost:
                await self._server_back()
            try:
                return await self.http.post("/v1/completions", body)
            except UpstreamError as e:
                if not isinstance(e.__cause__, httpx.TransportError) or attempt:
                    raise
                self._server_lost = True
                log.warning("vllm server lost (%s); waiting for it to come back", e)
        raise AssertionError("unreachable")

    async def _server_back(self) -> None:
        """Wait (up to quarantine_wait_s) until the server answers /health again, then check
        its weight version: a restarted server quarantines this engine until a push."""
        deadline = time.monotonic() + self.quarantine_wait_s
        while True:
            try:
                await self._srv_healthy()
                break
            except EngineError as e:
                if time.monotonic() > deadline:
                    raise UpstreamError(f"vllm server still down after "
                                        f"{self.quarantine_wait_s:g}s: {e}") from None
                await asyncio.sleep(1.0)
        known, reported = await self._srv_reported()
        self._server_lost = False
        if not known:
            return
        if self.follow:
            self._stamp(reported)
        elif (reported or 0) != self._version:
            # raise even inside an update (where _stamp would not): this request must not
            # run on the restarted server's base weights under our version
            msg = (f"vllm server came back at weight version {reported} but this service "
                   f"loaded {self._version} (restarted); push the weights again")
            self._quarantine(msg)
            raise UpstreamError(msg)

    @staticmethod
    def _choices(raw: Any, n: int) -> list[dict[str, Any]]:
        try:
            choices = sorted(raw["choices"], key=lambda c: int(c["index"]))
        except (KeyError, TypeError, ValueError) as e:
            raise UpstreamError(f"malformed vllm reply: {type(e).__name__}: {e}") from None
        if len(choices) != n or not all(isinstance(c, dict) for c in choices):
            raise UpstreamError(f"malformed vllm reply: {len(choices)} choices for {n} prompts")
        return choices

    # ------------------------------------------------------------------ sampling
    async def generate(self, prompt_ids: Sequence[int], n: int,
                       params: SamplingParams) -> list[GenOutput]:
        """Sampling through /v1/completions (the teacher does not need it; provided so a vLLM
        server can also serve rollouts). Tokens come back as "token_id:N" strings."""
        ids = check_prompt(prompt_ids, n, self.vocab_size or 2**31 - 1,
                           self.context_len or 2**31 - 1)
        max_new = params.max_new_tokens
        if self.context_len is not None:
            max_new = min(max_new, self.context_len - len(ids))
        body: dict[str, Any] = {
            "model": self.served_model_name, "prompt": ids, "n": n, "max_tokens": max_new,
            "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "logprobs": 0, "return_tokens_as_token_ids": True,
        }
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        if params.seed is not None:
            body["seed"] = params.seed
        async with self._request_slot():
            version = self._version
            raw = await self._completions(body)
        outs = []
        for i, c in enumerate(self._choices(raw, n)):
            try:
                lp = c["logprobs"]
                toks = [int(str(t).removeprefix("token_id:")) for t in lp["tokens"]]
                vals = [as_logprob(x, f"choice {i} token {k}")
                        for k, x in enumerate(lp["token_logprobs"])]
                finish = _FINISH.get(c.get("finish_reason") or "length", "length")
            except (KeyError, TypeError, ValueError) as e:
                raise UpstreamError(f"malformed vllm choice {i}: {e}") from None
            outs.append(GenOutput(token_ids=np.asarray(toks), logprobs=np.asarray(vals),
                                  finish_reason=finish,  # type: ignore[arg-type]
                                  weight_version=version, text=str(c.get("text") or "")))
        return outs

    # ------------------------------------------------------------------ weight hooks
    async def _srv_reported(self) -> tuple[bool, int | None]:
        try:
            data = await self.http.get("/weight_info", timeout_s=30)
        except InvalidRequest:  # dev endpoints off (404): the server says nothing
            return False, None
        return True, parse_version(data.get("weight_version") if isinstance(data, dict) else None)

    # ------------------------------------------------------------------ follower
    def _stamp(self, reported: int | None) -> int:
        if not self.follow:
            return super()._stamp(reported)
        if reported is None and self._version > 0:  # restarted: base weights, not ours
            msg = (f"vllm server reports no version of ours but this service followed "
                   f"{self._version} (server restarted?); waiting for the next push")
            self._quarantine(msg)
            raise UpstreamError(msg)
        if reported is not None and reported != self._version:
            self._version = reported
            VERSION.labels(self.kind).set(reported)
        return self._version

    async def _follow_version(self) -> int:
        known, reported = await self._srv_reported()
        return self._stamp(reported) if known else self._version

    async def update_weights(self, update: WeightUpdate) -> int:
        if not self.follow:
            return await super().update_weights(update)
        # The rollout service loads (and canary-checks) the same push into the same server;
        # wait until the server reports this version (or a later one).
        if update.version < self._version and not update.meta.get("allow_rollback"):
            raise WeightUpdateError(f"stale update: version {update.version} < serving "
                                    f"{self._version}")
        deadline = time.monotonic() + self.weight_timeout_s
        while True:
            try:
                _known, reported = await self._srv_reported()
            except EngineError:
                reported = None  # down or restarting: keep waiting
            if reported is not None and reported >= update.version:
                self._version = reported
                self._last_error = None
                self._usable.set()
                VERSION.labels(self.kind).set(reported)
                INCONSISTENT.labels(self.kind).set(0)
                return reported
            if time.monotonic() > deadline:
                raise WeightUpdateError(
                    f"the shared vllm server did not reach version {update.version} within "
                    f"{self.weight_timeout_s:g}s (the rollout service loads it)")
            await asyncio.sleep(0.05)

    async def _srv_healthy(self) -> bool:
        await self.http.get("/health", timeout_s=30, expect_json=False)
        return True

    async def _srv_pause(self) -> None:
        # Our gate is closed: first let our own requests finish. mode=wait drains only what the
        # engine core already holds; a request still on its way (parsed by the API server but
        # not yet scheduled) would be queued, run on the NEW weights after /resume and be
        # stamped with the old version (seen in tests/test_vllm_parity.py, fake and real).
        deadline = time.monotonic() + self.weight_timeout_s
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._inflight:
            raise UpdateRefused(f"{self._inflight} request(s) still running after "
                                f"{self.weight_timeout_s:g}s; the update was not started")
        # mode=wait: let running scoring requests finish (they are short), admit no new ones.
        try:
            await self.http.post("/pause", params={"mode": "wait"}, timeout_s=self.weight_timeout_s)
        except EngineError as e:
            raise UpdateRefused(f"vllm /pause failed: {e}") from None

    async def _srv_resume(self) -> None:
        await self.http.post("/resume", timeout_s=60)

    async def _reset_cache(self) -> None:
        try:
            await self.http.post("/reset_prefix_cache", timeout_s=60, expect_json=False)
        except EngineError as e:  # the weights are in; a stale prefix cache only costs a miss
            log.warning("vllm reset_prefix_cache failed after a weight update: %s", e)

    async def _srv_load_dir(self, path: str, version: int) -> None:
        body = {"method": self.reload_method, "kwargs": {"weights_path": path},
                "timeout": self.weight_timeout_s}
        await self.http.post("/collective_rpc", body, timeout_s=self.weight_timeout_s + 30)
        await self.http.post("/update_weight_version", {"new_version": str(version)}, timeout_s=60)
        await self._reset_cache()

    async def _srv_nccl(self, spec: NcclSpec, key: GroupKey, version: int) -> None:
        if spec.init_group or self._group != key:
            if not spec.init_group:
                raise UpdateRefused(f"no weight-transfer group {key} on this service "
                                    f"(current: {self._group}); resend with init_group=true")
            # `packed` is a wire parameter of the group (vLLM's NCCLWeightTransferInitInfo),
            # not of a bucket: NCCLWeightTransferUpdateInfo has no such field.
            init_info = {"master_address": key.master_address, "master_port": key.master_port,
                         "rank_offset": spec.rank_offset, "world_size": key.world_size,
                         "packed": spec.packed}
            self._group = None
            await self._shutdown_group()
            try:
                # Blocks until the trainer joins the rendezvous (it initialises concurrently).
                await self.http.post("/init_weight_transfer_engine", {"init_info": init_info},
                                     timeout_s=self.weight_timeout_s)
            except EngineError as e:
                raise UpdateRefused(f"vllm init_weight_transfer_engine failed: {e}") from None
            self._group = key
        for attempt in range(2):
            try:
                await self.http.post("/start_weight_update", {}, timeout_s=60)
                break
            except EngineError as e:
                if attempt or SESSION_ACTIVE not in str(e):
                    raise UpdateRefused(f"vllm start_weight_update failed: {e}") from None
                await self._close_leftover(e)
        try:
            for b in spec.buckets:
                info: dict[str, Any] = {"names": b.names, "dtype_names": b.dtypes,
                                        "shapes": b.shapes}
                await self.http.post("/update_weights", {"update_info": info},
                                     timeout_s=self.weight_timeout_s)
        except EngineError:
            # Close the session so vLLM accepts the next start (vLLM 0.32 ends it itself after
            # a failed chunk, and refuses this finish then; not after a timeout). The weights
            # are mixed now, which the caller handles (rollback or quarantine).
            try:
                await self.http.post("/finish_weight_update", {}, timeout_s=60)
            except EngineError as e2:
                log.warning("vllm finish_weight_update after a failed bucket: %s", e2)
            raise
        await self.http.post("/finish_weight_update", {"weight_version": str(version)},
                             timeout_s=self.weight_timeout_s)
        await self._reset_cache()

    async def _close_leftover(self, e: EngineError) -> None:
        """A session someone left open (this service, restarted mid-update): finish it without
        a version (its weights may be mixed; the update that follows overwrites every tensor,
        and a failure there rolls back or quarantines as usual)."""
        log.warning("vllm has a weight-update session open (%s); finishing it", e)
        try:
            await self.http.post("/finish_weight_update", {}, timeout_s=self.weight_timeout_s)
        except EngineError as e2:
            raise UpdateRefused(f"vllm: could not close a leftover update session: {e2}") from None

    async def _shutdown_group(self) -> None:
        """Destroy the server's trainer communicator before a new one (vLLM's init replaces
        its reference without destroying it: a leaked NCCL communicator and its GPU buffers
        per re-init). POST /shutdown_weight_transfer_engine runs PyNccl's `destroy()`
        (ncclCommAbort); with none it does nothing."""
        for attempt in range(2):
            try:
                await self.http.post("/shutdown_weight_transfer_engine", {}, timeout_s=60)
                return
            except InvalidRequest as e:  # 404: a vLLM without the route (< 0.32)
                log.warning("vllm shutdown_weight_transfer_engine unavailable (%s); the old "
                            "communicator stays allocated", e)
                return
            except EngineError as e:
                if attempt or SHUTDOWN_REFUSED not in str(e):
                    raise UpdateRefused(f"vllm shutdown_weight_transfer_engine failed: {e}") from None
                await self._close_leftover(e)

"""SGLang backend (rollout on GPUs): a client of a running SGLang server's native API.

Supported: SGLang 0.5.23 (the rollout image's pin); tests/test_upstream_contract_sglang.py
checks every route, request field and response field used here against that release's
source (`srt/entrypoints/http_server.py`, `srt/managers/io_struct.py`; docs/engines.md).

Sampling: one POST /generate per group, as a batch of n copies of the prompt rather than
`n=G` -- with `sampling_seed` set, `n` copies would all share one seed and be identical, so
each copy gets `seed + i`. Only keys SGLang's SamplingParams accepts are sent (0.5.23 answers
400 to unknown ones). SGLang ignores `sampling_seed` unless the server runs with
`--enable-deterministic-inference` (read from GET /server_info at start; a warning otherwise).

Log-probs (`logprobs_mode`): SGLang returns the sampled token's log-prob under the
temperature-scaled distribution, before top-p/top-k renormalisation ("processed" minus the
filtering); with SGLANG_RETURN_ORIGINAL_LOGPROB=1 on the server they are raw. Tokens are
`output_ids`, checked against the ids inside `output_token_logprobs`.

Weight updates (docs/engines.md): pause_generation(abort) -> flush_cache (retried while SGLang
answers 400 = still busy) -> update_weights_from_disk | [init_weights_update_group] +
begin_weight_update + update_weights_from_distributed per bucket + end_weight_update (0.5.23
refuses distributed updates outside such a session) -> continue_generation; `weight_version`
is set to our version on the update and read back from GET /model_info. Requests aborted by
the pause are regenerated after it, so a group never mixes weight versions.

A 400 from an update is not always a rollback: "Weights were updated, but the cache was not
flushed" means the new weights are in; we flush (retrying) and set the version ourselves.
NCCL updates need a server with dp_size 1 (SGLang asserts it in init_weights_update_group):
a data-parallel rollout runs one server per replica, each with its own service and group
(docs/deploy.md); a dp_size > 1 server is refused before anything is touched. So is
pp_size > 1: SGLang ranks a GPU in the update group as rank_offset + tp_rank
(model_runner_components/weight_updater.py), so two pipeline stages would claim one rank.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from protocol.messages import SamplingParams, WeightUpdate
from services.engines.base import (
    EngineError,
    GenOutput,
    InvalidRequest,
    LogprobsMode,
    UpstreamError,
    check_prompt,
    check_score_request,
)
from services.engines.http import EngineHTTP, as_logprob, parse_version
from services.engines.nccl_sync import ENGINE_NCCL_ENV, GroupKey, NcclSpec
from services.engines.remote import RETRIES, RemoteEngine, UpdateRefused

log = logging.getLogger("rlrt.engines.sglang")
_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}
# SGLang's message when an update loaded the weights but could not flush the radix cache
# (srt/managers/scheduler_components/weight_updater.py): the update is in, not rolled back.
NOT_FLUSHED = "Weights were updated, but the cache was not flushed"
# ... and when a distributed update arrives with a session already open (one we lost track
# of, e.g. after our own restart): close it and open ours.
SESSION_OPEN = "a weight-update session is already open"


class SGLangEngine(RemoteEngine):
    kind = "sglang"

    def __init__(self, http: EngineHTTP, *, flush_retries: int = 60, flush_interval_s: float = 1.0,
                 logprobs_mode: LogprobsMode = "processed", **kw: Any) -> None:
        super().__init__(http, **kw)
        self.flush_retries = flush_retries
        self.flush_interval_s = flush_interval_s
        self.logprobs_mode = logprobs_mode
        self.dp_size = 1
        self.pp_size = 1
        # "server" once /server_info gave tp_size: then the trainer must agree (docs/engines.md)
        self.world_size_from = "config"
        self.nccl_version: str | None = None  # the server's, when known (start())
        self.deterministic = True  # learnt from /server_info at start
        self._seed_warned = False

    async def start(self) -> None:
        await super().start()
        # The server's NCCL, for the trainer to compare before a group forms: SGLang does not
        # report it; rlrt-with-engine reads it from the engine's environment beside us.
        self.nccl_version = os.environ.get(ENGINE_NCCL_ENV) or None
        try:
            info = await self.http.get("/server_info", timeout_s=30)
        except EngineError as e:  # an older server or a proxy: assume the defaults
            log.warning("sglang /server_info unavailable (%s); assuming dp_size 1", e)
            return
        if isinstance(info, dict):
            self.dp_size = int(info.get("dp_size") or 1)
            self.deterministic = bool(info.get("enable_deterministic_inference", False))
            self.pp_size = int(info.get("pp_size") or 1)
            # the GPUs that join an NCCL update group, ranked rank_offset + tp_rank: the TP
            # size (pp_size > 1 is refused), as vLLM reports its own; the server's word wins
            if info.get("tp_size"):
                self.engine_world_size = int(info["tp_size"])
                self.world_size_from = "server"
        if self.dp_size > 1:
            log.warning("this SGLang server runs dp_size=%d: it takes disk weight pushes only "
                        "(NCCL updates need dp_size 1; docs/deploy.md)", self.dp_size)

    async def health(self) -> dict[str, Any]:
        return {**await super().health(), "dp_size": self.dp_size, "pp_size": self.pp_size,
                "engine_world_size_from": self.world_size_from,
                "nccl_version": self.nccl_version}

    # ------------------------------------------------------------------ inference
    def _sampling(self, params: SamplingParams, max_new: int, i: int) -> dict[str, Any]:
        sp: dict[str, Any] = {"max_new_tokens": max_new, "temperature": params.temperature,
                              "top_p": params.top_p, "top_k": params.top_k}
        if params.stop_token_ids:
            sp["stop_token_ids"] = list(params.stop_token_ids)
        if params.seed is not None:
            sp["sampling_seed"] = params.seed + i
            if not self.deterministic and not self._seed_warned:
                self._seed_warned = True
                log.warning("this SGLang server ignores sampling_seed (no "
                            "--enable-deterministic-inference): samples are not reproducible")
        return sp

    def _max_new(self, prompt_len: int, requested: int) -> int:
        if self.context_len is None:
            return requested
        room = self.context_len - prompt_len
        if room < 1:
            raise InvalidRequest(f"prompt has {prompt_len} tokens; the context window is "
                                 f"{self.context_len}, leaving no room for a response")
        return min(requested, room)

    async def generate(self, prompt_ids: Sequence[int], n: int,
                       params: SamplingParams) -> list[GenOutput]:
        ids = check_prompt(prompt_ids, n, self.vocab_size or 2**31 - 1,
                           self.context_len or 2**31 - 1)
        max_new = self._max_new(len(ids), params.max_new_tokens)
        body = {"input_ids": [ids] * n,
                "sampling_params": [self._sampling(params, max_new, i) for i in range(n)],
                "return_logprob": True}
        for attempt in range(self.abort_retries + 1):
            async with self._request_slot():
                raw = await self.http.post("/generate", body)
            outs = self._parse_batch(raw, n)
            versions = {o.weight_version for o in outs}
            if all(o.finish_reason != "abort" for o in outs) and len(versions) == 1:
                return outs
            # Aborted by a weight update's pause (or spanning two versions): the partial
            # responses are not samples of one policy. Redo the group after the update.
            RETRIES.labels(self.kind).inc()
            log.info("generation aborted or mixed versions %s (attempt %d); regenerating",
                     sorted(versions), attempt + 1)
        raise UpstreamError(f"sglang aborted this generation {self.abort_retries + 1} times "
                            "(weight updates in a row?)")

    def _parse_batch(self, raw: Any, n: int) -> list[GenOutput]:
        items = raw if isinstance(raw, list) else [raw]
        if len(items) != n:
            raise UpstreamError(f"malformed reply: {len(items)} results for {n} prompts")
        return [self._parse_one(r, i) for i, r in enumerate(items)]

    def _parse_one(self, r: Any, i: int) -> GenOutput:
        try:
            meta = r["meta_info"]
            triples = meta["output_token_logprobs"]
            ids = [int(t[1]) for t in triples]
            lps = [as_logprob(t[0], f"result {i} logprob") for t in triples]
            out_ids = r.get("output_ids", ids)
            finish = meta.get("finish_reason") or {}
            ftype = finish.get("type") if isinstance(finish, dict) else str(finish)
        except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
            raise UpstreamError(f"malformed sglang result {i}: {type(e).__name__}: {e}") from None
        if [int(t) for t in out_ids] != ids:
            raise UpstreamError(f"malformed sglang result {i}: output_ids disagree with "
                                "output_token_logprobs")
        if ftype not in _FINISH:
            raise UpstreamError(f"malformed sglang result {i}: finish_reason {finish!r}")
        # Every response carries the server's weight_version: check it is ours.
        v = (self._stamp(parse_version(meta["weight_version"])) if "weight_version" in meta
             else self._version)
        return GenOutput(token_ids=np.asarray(ids), logprobs=np.asarray(lps),
                         finish_reason=_FINISH[ftype],  # type: ignore[arg-type]
                         weight_version=v,
                         text=str(r.get("text") or ""),
                         meta={"prompt_tokens": meta.get("prompt_tokens"),
                               "cached_tokens": meta.get("cached_tokens")})

    async def score(self, sequences: Sequence[Sequence[int]],
                    response_offsets: Sequence[int]) -> list[np.ndarray]:
        """Prompt log-probs via max_new_tokens=0, logprob_start_len=0 (slime's teacher path)."""
        return await self._score(sequences, response_offsets, gated=True)

    async def _srv_score(self, sequences: list[list[int]], offsets: list[int]) -> list[np.ndarray]:
        return await self._score(sequences, offsets, gated=False)

    async def _score(self, sequences: Sequence[Sequence[int]], response_offsets: Sequence[int],
                     *, gated: bool) -> list[np.ndarray]:
        seqs = check_score_request(sequences, response_offsets, self.vocab_size or 2**31 - 1,
                                   self.context_len or 2**31 - 1)
        if not seqs:
            return []
        body = {"input_ids": seqs, "sampling_params": {"max_new_tokens": 0},
                "return_logprob": True, "logprob_start_len": 0}
        # ungated: the weight canary, scored inside an update while our gate is closed
        async with self._request_slot() if gated else contextlib.nullcontext():
            raw = await self.http.post("/generate", body)
        items = raw if isinstance(raw, list) else [raw]
        if len(items) != len(seqs):
            raise UpstreamError(f"malformed reply: {len(items)} results for {len(seqs)} sequences")
        out = []
        for i, (r, seq, off) in enumerate(zip(items, seqs, response_offsets, strict=True)):
            try:
                triples = r["meta_info"]["input_token_logprobs"]
                if len(triples) != len(seq) or [int(t[1]) for t in triples] != seq:
                    raise ValueError("input_token_logprobs do not match the sequence")
                vals = [as_logprob(t[0], f"sequence {i} position {j}")
                        for j, t in enumerate(triples) if j >= int(off)]
            except (KeyError, TypeError, IndexError, ValueError) as e:
                raise UpstreamError(f"malformed sglang score result {i}: {e}") from None
            out.append(np.asarray(vals, dtype=np.float32))
        return out

    # ------------------------------------------------------------------ weight hooks
    async def _srv_reported(self) -> tuple[bool, int | None]:
        data = await self.http.get("/model_info", timeout_s=30)
        return True, parse_version(data.get("weight_version") if isinstance(data, dict) else None)

    async def _srv_version(self) -> int | None:
        return (await self._srv_reported())[1]

    async def _srv_healthy(self) -> bool:
        # /model_info, not /health: SGLang's /health runs a one-token generation, which is
        # slow and answers 503 while a weight update holds generation paused. The version it
        # reports is checked against ours by health().
        await self.http.get("/model_info", timeout_s=10)
        return True

    async def _srv_pause(self) -> None:
        try:
            await self.http.post("/pause_generation", {"mode": "abort"}, timeout_s=60)
        except EngineError as e:
            raise UpdateRefused(f"sglang pause_generation failed: {e}") from None
        try:
            await self._flush()
        except EngineError as e:
            raise UpdateRefused(str(e)) from None

    async def _flush(self) -> None:
        """POST /flush_cache until it succeeds: 400 = requests still running/waiting (slime
        retries the same way). Raises UpstreamError when it stays busy."""
        for _ in range(self.flush_retries):
            try:
                await self.http.post("/flush_cache", timeout_s=60, expect_json=False)
                return
            except InvalidRequest:
                await asyncio.sleep(self.flush_interval_s)
            except EngineError as e:
                raise UpstreamError(f"sglang flush_cache failed: {e}") from None
        raise UpstreamError(f"sglang stayed busy: flush_cache refused {self.flush_retries} times")

    async def _finish_unflushed(self, version: int) -> None:
        """The weights went in but the cache was not flushed (SGLang's 400 NOT_FLUSHED): flush
        now and set the version SGLang did not record."""
        await self._flush()
        await self.http.post("/update_weight_version",
                             {"new_version": str(version), "abort_all_requests": False},
                             timeout_s=60)

    async def _srv_resume(self) -> None:
        await self.http.post("/continue_generation", {}, timeout_s=60)

    async def _srv_load_dir(self, path: str, version: int) -> None:
        body = {"model_path": path, "weight_version": str(version), "flush_cache": True,
                "abort_all_requests": False}
        try:
            res = await self.http.post("/update_weights_from_disk", body,
                                       timeout_s=self.weight_timeout_s)
        except InvalidRequest as e:
            if NOT_FLUSHED in str(e):
                await self._finish_unflushed(version)
                return
            # any other 400 {"success": false}: SGLang rolled back to the old weights itself
            raise UpdateRefused(f"sglang refused the weights: {e}") from None
        except UpstreamError:
            # Timed out or 5xx: did the load happen? Ask before declaring the weights unknown.
            if await self._version_is(version):
                return
            raise
        if not (isinstance(res, dict) and res.get("success") is True):
            raise UpdateRefused(f"sglang refused the weights: {res!r}")

    async def _version_is(self, version: int) -> bool:
        try:
            return await self._srv_version() == version
        except EngineError:
            return False

    async def update_weights(self, update: WeightUpdate) -> int:
        if update.format == "nccl":
            self.check_nccl()  # before the transaction pauses anything
        return await super().update_weights(update)

    def check_nccl(self) -> None:
        """Refuse an NCCL update this server cannot take."""
        if self.dp_size > 1:
            raise UpdateRefused(
                f"this SGLang server runs dp_size={self.dp_size}; SGLang 0.5.23 accepts "
                "NCCL weight updates only with dp_size 1 (init_weights_update_group asserts "
                "it). Run one server per replica, each with its own rollout service listed in "
                "trainer.push.services (docs/deploy.md), or use push.mode: disk")
        if self.pp_size > 1:
            raise UpdateRefused(
                f"this SGLang server runs pp_size={self.pp_size}; SGLang 0.5.23 ranks the GPUs of "
                "an NCCL weight-update group by tensor-parallel rank only, so pipeline stages "
                "would collide. Use push.mode: disk with pipeline parallelism")

    async def _srv_nccl(self, spec: NcclSpec, key: GroupKey, version: int) -> None:
        self.check_nccl()
        if spec.init_group or self._group != key:
            if not spec.init_group:
                raise UpdateRefused(f"no weight-update group {key} on this service "
                                    f"(current: {self._group}); resend with init_group=true")
            await self._init_group(spec, key)
        await self._begin_session()
        last = len(spec.buckets) - 1
        try:
            for i, b in enumerate(spec.buckets):
                body = {"names": b.names, "dtypes": b.dtypes, "shapes": b.shapes,
                        "group_name": key.group_name, "flush_cache": i == last,
                        "abort_all_requests": False}
                if i == last:  # the version flips only once every bucket has landed
                    body["weight_version"] = str(version)
                try:
                    res = await self.http.post("/update_weights_from_distributed", body,
                                               timeout_s=self.weight_timeout_s)
                except InvalidRequest as e:
                    if i == last and NOT_FLUSHED in str(e):
                        await self._end_session()
                        await self._finish_unflushed(version)
                        return
                    raise UpstreamError(f"sglang bucket {i}: {e}") from None
                if not (isinstance(res, dict) and res.get("success") is True):
                    raise UpstreamError(f"sglang bucket {i}: {res!r}")
        except EngineError:
            # Close the session so the next update can open one; the weights are mixed now,
            # which the caller handles (rollback or quarantine).
            try:
                await self._end_session()
            except EngineError as e2:
                log.warning("sglang end_weight_update after a failed bucket: %s", e2)
            raise
        await self._end_session()

    async def _begin_session(self) -> None:
        try:
            await self.http.post("/begin_weight_update", {}, timeout_s=self.weight_timeout_s)
        except InvalidRequest as e:
            if SESSION_OPEN not in str(e):
                raise UpdateRefused(f"sglang begin_weight_update failed: {e}") from None
            # a session left open (by an update we lost track of): close it, open ours
            await self._end_session()
            await self.http.post("/begin_weight_update", {}, timeout_s=self.weight_timeout_s)
        except EngineError as e:
            raise UpdateRefused(f"sglang begin_weight_update failed: {e}") from None

    async def _end_session(self) -> None:
        await self.http.post("/end_weight_update", {}, timeout_s=self.weight_timeout_s)

    async def _init_group(self, spec: NcclSpec, key: GroupKey) -> None:
        # A group of the same name left from an earlier run would make init fail: drop it.
        try:
            await self.http.post("/destroy_weights_update_group", {"group_name": key.group_name},
                                 timeout_s=60)
        except EngineError:
            pass  # none existed
        self._group = None
        body = {"master_address": key.master_address, "master_port": key.master_port,
                "rank_offset": spec.rank_offset, "world_size": key.world_size,
                "group_name": key.group_name, "backend": spec.backend}
        try:
            # Blocks until the trainer joins the rendezvous (it initialises concurrently).
            res = await self.http.post("/init_weights_update_group", body,
                                       timeout_s=self.weight_timeout_s)
        except EngineError as e:
            raise UpdateRefused(f"sglang init_weights_update_group failed: {e}") from None
        if not (isinstance(res, dict) and res.get("success") is True):
            raise UpdateRefused(f"sglang init_weights_update_group failed: {res!r}")
        self._group = key

"""The built-in CPU engine: any local HF causal LM, embedded in the rollout/teacher service.

One worker thread owns the model and does all torch work; async callers queue requests and
await futures. Between decode steps the worker admits queued generate requests into the
running batch (continuous batching, see cpu_batching.py), runs queued score requests, and
applies weight swaps.

Semantics:
- pause(): requests queued or arriving later wait until resume(); rows already decoding finish.
- update_weights(): verified and loaded off the worker (the engine keeps serving meanwhile),
  then swapped in when no row is mid-generation: admission stops until the running rows
  drain, so every response comes from exactly one weight version (reported per output),
  as SGLang's update_weights_from_disk does. A refused update changes nothing. An update
  carrying a weight canary (protocol/canary.py) is scored right after the swap, before any
  request runs on it; a mismatch swaps the old tensors back and refuses the version.
- Sampling: temperature / top-k / top-p per request, float32 math; log-probs per
  `logprobs_mode` (see cpu_sampler.py). `seed` makes a request's draws reproducible (up to
  float rounding differences from the batch it shares).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from protocol.canary import DEFAULT_TOLERANCE, Canary
from protocol.messages import SamplingParams, WeightUpdate
from services.engines.base import (
    Engine,
    EngineClosed,
    EngineError,
    GenOutput,
    InvalidRequest,
    LogprobsMode,
    UpstreamError,
    WeightUpdateError,
    check_prompt,
    check_score_request,
)
from services.engines.canary_check import check_canary_shape, judge_canary
from services.engines.cpu_batching import DecodeBatch, GenRequest
from services.engines.cpu_model import (
    ModelRunner,
    check_supported,
    context_length,
    eos_token_ids,
    load_model,
)
from services.engines.cpu_scoring import score_sequences
from services.engines.cpu_weights import Prepared, apply_update, prepare_update

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Half the CPUs this process may use: the rollout and teacher engines usually share one
    machine, and oversubscribed OpenMP threads spin-wait on each other -- measured here (2
    cores, other jobs running) 2 threads were ~10x slower than 1."""
    return max(1, available_cpus() // 2)


@dataclass(eq=False)
class _ScoreRequest:
    sequences: list[list[int]]
    offsets: list[int]
    future: concurrent.futures.Future


@dataclass(eq=False)
class _SwapRequest:
    prepared: Prepared
    version: int
    future: concurrent.futures.Future
    canary: Canary | None = None


class CpuEngine(Engine):
    """CPU engine over the model in `model_dir` (config.json + safetensors [+ tokenizer]).

    Knobs: `logprobs_mode` ("processed" | "raw"), `max_batch_rows` (concurrent sequences),
    `max_model_len` (context window; default the model's max_position_embeddings),
    `prefill_token_budget` / `score_token_budget` (padded tokens per forward), `num_threads`
    (torch intra-op threads, process-wide; default `default_threads()`), `seed` (for requests
    without their own seed), `dtype`, `detokenize` (fill GenOutput.text when a tokenizer exists),
    `canary_check` (score an update's weight canary after the swap; a mismatch is refused),
    `canary_tolerance` (dtype -> max |log-prob difference|; None = protocol.canary's defaults;
    the coarser of the pushed weights' dtype and this engine's `dtype` applies).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        logprobs_mode: LogprobsMode = "processed",
        max_batch_rows: int = 256,
        max_model_len: int | None = None,
        prefill_token_budget: int = 4096,
        score_token_budget: int = 8192,
        num_threads: int | None = None,
        seed: int = 0,
        dtype: str = "float32",
        detokenize: bool = True,
        version: int = 0,
        canary_check: bool = True,
        canary_tolerance: Mapping[str, float] | None = None,
    ) -> None:
        if logprobs_mode not in ("processed", "raw"):
            raise ValueError(f"logprobs_mode must be 'processed' or 'raw', got {logprobs_mode!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if max_batch_rows < 1:
            raise ValueError("max_batch_rows must be >= 1")
        torch.set_num_threads(num_threads or default_threads())
        self.model_dir = str(model_dir)
        self.dtype = dtype
        self.canary_check = canary_check
        self.canary_tolerance = dict(canary_tolerance or DEFAULT_TOLERANCE)
        self.model, self.tokenizer = load_model(model_dir, _DTYPES[dtype])
        self.runner = ModelRunner(self.model)
        check_supported(self.runner)
        self.vocab_size = self.runner.vocab_size
        self.max_model_len = int(max_model_len or context_length(self.model))
        self.eos_ids = frozenset(eos_token_ids(self.model, self.tokenizer))
        self.logprobs_mode: LogprobsMode = logprobs_mode
        self.max_batch_rows = max_batch_rows
        self.prefill_token_budget = prefill_token_budget
        self.score_token_budget = score_token_budget
        self._version = version
        detok = None
        if detokenize and self.tokenizer is not None:
            tok = self.tokenizer

            def detok(ids: list[int]) -> str:
                return tok.decode(ids, skip_special_tokens=True)

        self._batch = DecodeBatch(
            self.runner,
            max_rows=max_batch_rows,
            logprobs_mode=logprobs_mode,
            generator=torch.Generator().manual_seed(seed),
            detokenize=detok,
        )
        self._cv = threading.Condition()
        self._gen_queue: deque[GenRequest] = deque()
        self._score_queue: deque[_ScoreRequest] = deque()
        self._swaps: deque[_SwapRequest] = deque()
        self._paused = False
        self._closing = False
        self._error: str | None = None
        self._thread = threading.Thread(target=self._worker, name="cpu-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    @property
    def version(self) -> int:
        return self._version

    async def generate(
        self, prompt_ids: Sequence[int], n: int, params: SamplingParams
    ) -> list[GenOutput]:
        prompt = check_prompt(prompt_ids, n, self.vocab_size, self.max_model_len)
        if n > self.max_batch_rows:
            raise InvalidRequest(f"n={n} exceeds max_batch_rows={self.max_batch_rows}")
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad_stop:
            raise InvalidRequest(f"stop_token_ids outside the vocabulary: {bad_stop[:5]}")
        req = GenRequest(
            prompt=prompt,
            n=n,
            params=params,
            max_new=min(params.max_new_tokens, self.max_model_len - len(prompt)),
            stop_ids=self.eos_ids | frozenset(params.stop_token_ids),
            future=concurrent.futures.Future(),
            generator=None if params.seed is None else torch.Generator().manual_seed(params.seed),
        )
        self._submit(self._gen_queue, req)
        return await asyncio.wrap_future(req.future)

    async def score(
        self, sequences: Sequence[Sequence[int]], response_offsets: Sequence[int]
    ) -> list[np.ndarray]:
        seqs = check_score_request(sequences, response_offsets, self.vocab_size, self.max_model_len)
        if not seqs:
            return []
        req = _ScoreRequest(seqs, [int(o) for o in response_offsets], concurrent.futures.Future())
        self._submit(self._score_queue, req)
        return await asyncio.wrap_future(req.future)

    async def update_weights(self, update: WeightUpdate) -> int:
        if update.format != "safetensors_dir":
            raise WeightUpdateError(
                f"format {update.format!r} is not supported by the CPU engine (NCCL needs a GPU "
                "engine); send format='safetensors_dir'"
            )
        canary = update.canary if self.canary_check else None
        if canary is not None:
            check_canary_shape(canary, self.vocab_size, self.max_model_len)
        prepared = await asyncio.to_thread(prepare_update, self.model, update.location, update.sha256)
        req = _SwapRequest(prepared, update.version, concurrent.futures.Future(), canary)
        self._submit(self._swaps, req)
        await asyncio.wrap_future(req.future)
        return self._version

    async def pause(self) -> None:
        with self._cv:
            self._paused = True

    async def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    async def health(self) -> dict[str, Any]:
        with self._cv:
            return {
                "ok": self._thread.is_alive() and not self._closing and self._error is None,
                "engine": "cpu",
                "model": self.model_dir,
                "version": self._version,
                "paused": self._paused,
                "running_rows": len(self._batch.rows),
                "queued_generate": len(self._gen_queue),
                "queued_score": len(self._score_queue),
                "pending_weight_updates": len(self._swaps),
                "max_model_len": self.max_model_len,
                "vocab_size": self.vocab_size,
                "logprobs_mode": self.logprobs_mode,
                "last_error": self._error,
            }

    async def close(self) -> None:
        await asyncio.to_thread(self.shutdown)

    def shutdown(self) -> None:
        """Stop the worker (blocking); queued and running requests fail with EngineClosed."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    async def __aenter__(self) -> CpuEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ worker
    def _submit(self, queue: deque, req: Any) -> None:
        with self._cv:
            if self._closing:
                raise EngineClosed("the engine is closed")
            queue.append(req)
            self._cv.notify_all()

    def _runnable(self) -> bool:
        """Is there anything the worker can do now? (caller holds the lock)"""
        if self._closing or self._batch.rows:
            return True
        if self._swaps:
            return True  # nothing is running, so a swap can go ahead
        return not self._paused and bool(self._gen_queue or self._score_queue)

    def _take_work(self) -> tuple[_SwapRequest | None, list[_ScoreRequest], list[GenRequest]]:
        """Pop what to do this iteration (caller holds the lock)."""
        swap = None
        if self._swaps and not self._batch.rows:
            swap = self._swaps.popleft()
        if self._paused or self._swaps or swap is not None:
            # a pending swap blocks admission so the running rows drain
            return swap, [], []
        scores = list(self._score_queue)
        self._score_queue.clear()
        gens: list[GenRequest] = []
        free = self._batch.free_rows
        while self._gen_queue and self._gen_queue[0].n <= free:
            req = self._gen_queue.popleft()
            if req.cancelled:
                continue
            free -= req.n
            gens.append(req)
        return None, scores, gens

    def _worker(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._runnable():
                        self._cv.wait()
                    if self._closing:
                        break
                    swap, scores, gens = self._take_work()
                    for g in gens:
                        g.version = self._version
                try:
                    if swap is not None:
                        self._apply_swap(swap)
                    for s in scores:
                        self._run_score(s)
                    if gens:
                        self._batch.admit(gens, self.prefill_token_budget)
                    self._batch.drop_cancelled()
                    self._batch.step()
                except Exception as e:  # keep serving: fail what was in flight, log, go on
                    log.exception("CPU engine step failed")
                    self._error = f"{type(e).__name__}: {e}"
                    err = UpstreamError(f"CPU engine failed: {self._error}")
                    self._batch.fail_all(err)
                    for g in gens:
                        _fail(g.future, err)
        self._drain_on_close()

    def _apply_swap(self, swap: _SwapRequest) -> None:
        old = _live(swap.prepared) if swap.canary is not None else None
        try:
            apply_update(swap.prepared)
        except Exception as e:  # pragma: no cover -- reference assignments do not fail
            _fail(swap.future, WeightUpdateError(f"swap failed: {e}"))
            raise
        swap.prepared = []
        if swap.canary is not None and old is not None:
            # Nothing has run on the new weights yet (the worker thread is here): judge them,
            # and on a mismatch put the old tensors back as if the swap never happened.
            try:
                seqs = swap.canary.sequences
                served = score_sequences(self.runner, seqs, [1] * len(seqs),
                                         token_budget=self.score_token_budget)
                judge_canary("cpu", swap.canary, served, swap.version, self.canary_tolerance,
                             self.dtype)
            except Exception as e:  # noqa: BLE001 -- any failure refuses the version
                apply_update(old)
                _fail(swap.future, e if isinstance(e, WeightUpdateError)
                      else WeightUpdateError(f"weight canary could not be scored: {e}"))
                return
        self._version = swap.version
        _done(swap.future, swap.version)

    def _run_score(self, req: _ScoreRequest) -> None:
        if req.future.cancelled():
            return
        try:
            res = score_sequences(self.runner, req.sequences, req.offsets, token_budget=self.score_token_budget)
        except Exception as e:
            _fail(req.future, UpstreamError(f"scoring failed: {type(e).__name__}: {e}"))
            return
        _done(req.future, res)

    def _drain_on_close(self) -> None:
        err = EngineClosed("the engine was closed")
        with self._cv:
            self._batch.fail_all(err)
            for q in (self._gen_queue, self._score_queue, self._swaps):
                while q:
                    _fail(q.popleft().future, err)


def _live(prepared: Prepared) -> Prepared:
    """The tensors `prepared` would replace, in the same form: applying it undoes the swap."""
    return [(mod, attr, is_param, mod._parameters[attr].data if is_param else mod._buffers[attr])
            for mod, attr, is_param, _ in prepared]


def _done(fut: concurrent.futures.Future, value: Any) -> None:
    if not fut.done():
        try:
            fut.set_result(value)
        except concurrent.futures.InvalidStateError:
            pass


def _fail(fut: concurrent.futures.Future, exc: EngineError) -> None:
    if not fut.done():
        try:
            fut.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass

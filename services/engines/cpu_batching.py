"""The continuous-batching decode loop of the CPU engine (runs on the engine's worker thread).

RL rollouts are G samples of one prompt whose lengths spread widely (a few tokens to the cap).
`model.generate()` prefills the prompt G times, pads every prompt to the longest and keeps
computing finished rows until the longest one ends. Here instead:
- each request's prompt is prefilled once, unpadded (requests of similar length are prefilled
  together, sorted by length), and its K/V is broadcast into the G rows;
- a row that finishes leaves the batch at once (its slot is refilled by the last row);
- new requests join the running batch whenever slots are free (continuous batching).
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from protocol.messages import SamplingParams
from services.engines.base import GenOutput, LogprobsMode
from services.engines.cpu_kv import SlotCache, SlotStore
from services.engines.cpu_model import ModelRunner
from services.engines.cpu_sampler import BatchSampling, RowSampling, sample

log = logging.getLogger(__name__)

_MIN_HEADROOM = 64


@dataclass(eq=False)
class GenRequest:
    """One generate() call: n samples of one prompt."""

    prompt: list[int]
    n: int
    params: SamplingParams
    max_new: int  # max_new_tokens capped by the context window
    stop_ids: frozenset[int]
    future: concurrent.futures.Future
    generator: torch.Generator | None = None  # per-request seed
    version: int = 0
    outputs: list[GenOutput | None] = field(default_factory=list)
    remaining: int = 0

    def __post_init__(self) -> None:
        self.outputs = [None] * self.n
        self.remaining = self.n
        self.sampling = RowSampling(self.params.temperature, self.params.top_k, self.params.top_p)

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()


@dataclass(eq=False, slots=True)
class Row:
    req: GenRequest
    index: int  # which of the request's n samples
    seq_len: int  # tokens already in the KV cache
    next_token: int  # sampled, not yet fed to the model
    tokens: list[int]
    logprobs: list[float]


def _resolve(fut: concurrent.futures.Future, result=None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:  # cancelled by the caller meanwhile
        pass


class DecodeBatch:
    def __init__(
        self,
        runner: ModelRunner,
        *,
        max_rows: int,
        logprobs_mode: LogprobsMode,
        generator: torch.Generator,
        detokenize: Callable[[list[int]], str] | None = None,
    ) -> None:
        self.runner = runner
        self.max_rows = max_rows
        self.mode: LogprobsMode = logprobs_mode
        self.gen = generator
        self.detokenize = detokenize
        dtype = next(runner.model.parameters()).dtype
        self.store = SlotStore(dtype)
        self.cache = SlotCache(self.store, runner.num_layers)
        self.rows: list[Row] = []
        self._spec: BatchSampling | None = None  # rebuilt when the batch composition changes
        self._seeded: list[tuple[torch.Generator, torch.Tensor]] = []
        self._cols = torch.arange(0)

    # ------------------------------------------------------------------ state
    @property
    def free_rows(self) -> int:
        return self.max_rows - len(self.rows)

    def running_requests(self) -> set[GenRequest]:
        return {r.req for r in self.rows}

    def _changed(self) -> None:
        self._spec = None

    def _sampling_state(self) -> tuple[BatchSampling, list[tuple[torch.Generator, torch.Tensor]]]:
        if self._spec is None:
            self._spec = BatchSampling([r.req.sampling for r in self.rows], self.runner.vocab_size)
            by_req: dict[GenRequest, list[tuple[int, int]]] = {}
            for slot, r in enumerate(self.rows):
                if r.req.generator is not None:
                    by_req.setdefault(r.req, []).append((r.index, slot))
            # Seeded rows draw from their request's own generator, in sample-index order, so a
            # seeded request's draws do not depend on which other requests share the batch.
            self._seeded = [
                (req.generator, torch.tensor([s for _, s in sorted(pairs)], dtype=torch.long))
                for req, pairs in by_req.items()
            ]
        return self._spec, self._seeded

    def _noise(self, b: int, seeded: list[tuple[torch.Generator, torch.Tensor]]) -> torch.Tensor:
        v = self.runner.vocab_size
        noise = torch.empty(b, v).exponential_(generator=self.gen)
        for g, idx in seeded:
            noise[idx] = torch.empty(len(idx), v).exponential_(generator=g)
        return noise

    # ------------------------------------------------------------------ admission
    def admit(self, reqs: list[GenRequest], prefill_token_budget: int) -> None:
        """Prefill `reqs` (sorted by length, several per forward up to the token budget) and add
        their rows to the batch. Caller guarantees sum(n) <= free_rows."""
        if not reqs:
            return
        # Size the buffers once for the whole admission: every new row, the longest prompt, and
        # room for the longest response, so the decode loop rarely has to move the cache.
        self._make_room(
            sum(r.n for r in reqs),
            max(len(r.prompt) for r in reqs),
            max(r.max_new for r in reqs),
        )
        reqs = sorted(reqs, key=lambda r: len(r.prompt))
        i = 0
        while i < len(reqs):
            j = i + 1
            while j < len(reqs) and len(reqs[j].prompt) * (j + 1 - i) <= prefill_token_budget:
                j += 1
            self._prefill(reqs[i:j])
            i = j

    def _prefill(self, chunk: list[GenRequest]) -> None:
        pmax = max(len(r.prompt) for r in chunk)
        b = len(chunk)
        ids = torch.zeros(b, pmax, dtype=torch.long)
        mask = torch.zeros(b, pmax, dtype=torch.long)
        for k, r in enumerate(chunk):
            p = len(r.prompt)
            ids[k, pmax - p :] = torch.tensor(r.prompt, dtype=torch.long)
            mask[k, pmax - p :] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = self.runner.new_cache()
        logits = self.runner.forward(ids, mask, pos, cache, 1)[:, -1]
        for k, req in enumerate(chunk):
            p = len(req.prompt)
            kv = [(layer.keys[k : k + 1, :, pmax - p :], layer.values[k : k + 1, :, pmax - p :]) for layer in cache.layers]
            self._start_request(req, logits[k], kv)

    def _start_request(self, req: GenRequest, logits: torch.Tensor, kv) -> None:
        """Sample each of the n first tokens from the prompt's last logits, then place the rows
        that continue into slots sharing the prompt's K/V."""
        spec = BatchSampling([req.sampling] * req.n, self.runner.vocab_size)
        noise = None
        if not spec.all_greedy:
            noise = torch.empty(req.n, self.runner.vocab_size).exponential_(
                generator=req.generator if req.generator is not None else self.gen
            )
        tok, lp = sample(logits.unsqueeze(0).expand(req.n, -1), spec, noise, self.mode)
        p = len(req.prompt)
        live: list[Row] = []
        for idx, (t, logp) in enumerate(zip(tok.tolist(), lp.tolist(), strict=True)):
            row = Row(req, idx, p, t, [t], [logp])
            if not self._maybe_finish(row):
                live.append(row)
        if not live:
            return
        slot0 = self.store.rows
        self.store.write_rows(slot0, len(live), kv)
        self.store.rows += len(live)
        self.rows.extend(live)
        self.store.start = min(self.store.start, self.store.ptr - p)
        self._changed()

    def _make_room(self, extra_rows: int, prompt_len: int, max_new: int) -> None:
        """Ensure `extra_rows` free slots, ptr >= prompt_len (a new prompt's K/V ends at ptr), and
        write columns for the next `max_new` steps if a reallocation is needed anyway."""
        s = self.store
        if not self.rows:
            s.rows, s.start, s.ptr = 0, 0, 0
        need_rows = s.rows + extra_rows
        need_ptr = max(s.ptr, prompt_len)
        if need_rows > s.rows_cap or need_ptr >= s.cols_cap:
            rows_cap = max(s.rows_cap, min(max(need_rows, 2 * s.rows_cap), max(self.max_rows, need_rows)))
            headroom = max(_MIN_HEADROOM, max_new, s.span // 2)
            cols_cap = max(s.cols_cap, need_ptr + headroom + 1)
            s.reshape(self.runner.kv_shapes, rows_cap, cols_cap, need_ptr)
        elif need_ptr > s.ptr:
            s.shift(need_ptr)

    def _ensure_write_column(self) -> None:
        """Before a step: make sure column `ptr` exists, moving the live region back to the
        left edge (or growing the buffers) when the write pointer reaches the end."""
        s = self.store
        if s.ptr < s.cols_cap:
            return
        span = s.span
        headroom = max(_MIN_HEADROOM, span // 2)
        if span + headroom < s.cols_cap:
            s.shift(span)
        else:
            s.reshape(self.runner.kv_shapes, s.rows_cap, span + headroom + 1, span)

    # ------------------------------------------------------------------ decode
    def step(self) -> None:
        """One decode step for every live row, then retire the rows that finished."""
        if not self.rows:
            return
        self._ensure_write_column()
        s = self.store
        b, span = s.rows, s.span
        if self._cols.numel() < span + 1:
            self._cols = torch.arange(max(span + 1, 2 * self._cols.numel()))
        ids = torch.tensor([r.next_token for r in self.rows], dtype=torch.long).unsqueeze(1)
        lens = torch.tensor([r.seq_len for r in self.rows], dtype=torch.long)
        # row r's real columns (relative to `start`) are [span - len_r, span]; the rest is padding
        mask = self._cols[: span + 1].unsqueeze(0) >= (span - lens).unsqueeze(1)
        logits = self.runner.forward(ids, mask, lens.unsqueeze(1), self.cache, 1)[:, -1]
        s.ptr += 1
        spec, seeded = self._sampling_state()
        noise = None if spec.all_greedy else self._noise(b, seeded)
        tok, lp = sample(logits, spec, noise, self.mode)
        finished: list[int] = []
        for slot, (row, t, logp) in enumerate(zip(self.rows, tok.tolist(), lp.tolist(), strict=True)):
            row.seq_len += 1
            row.next_token = t
            row.tokens.append(t)
            row.logprobs.append(logp)
            if self._maybe_finish(row):
                finished.append(slot)
        if finished:
            self._remove(finished)

    def _maybe_finish(self, row: Row) -> bool:
        t = row.tokens[-1]
        if t in row.req.stop_ids:
            reason = "stop"
        elif len(row.tokens) >= row.req.max_new:
            reason = "length"
        else:
            return False
        req = row.req
        req.outputs[row.index] = GenOutput(
            token_ids=np.asarray(row.tokens, dtype=np.int32),
            logprobs=np.asarray(row.logprobs, dtype=np.float32),
            finish_reason=reason,
            weight_version=req.version,
            text=self.detokenize(row.tokens) if self.detokenize else "",
        )
        req.remaining -= 1
        if req.remaining == 0:
            _resolve(req.future, list(req.outputs))
        return True

    def _remove(self, slots: list[int]) -> None:
        """Drop rows at `slots`, keeping live rows dense by moving tail rows into the holes."""
        dead = set(slots)
        keep = len(self.rows) - len(dead)
        holes = [i for i in sorted(dead) if i < keep]
        movers = [i for i in range(keep, len(self.rows)) if i not in dead]
        self.store.move_rows(holes, movers)
        for h, m in zip(holes, movers, strict=True):
            self.rows[h] = self.rows[m]
        del self.rows[keep:]
        s = self.store
        s.rows = keep
        if self.rows:
            s.start = s.ptr - max(r.seq_len for r in self.rows)
        else:
            s.rows, s.start, s.ptr = 0, 0, 0
        self._changed()

    def drop_cancelled(self) -> int:
        """Stop computing rows whose caller went away; returns how many were dropped."""
        slots = [i for i, r in enumerate(self.rows) if r.req.cancelled]
        if slots:
            self._remove(slots)
        return len(slots)

    def fail_all(self, exc: BaseException) -> None:
        for req in self.running_requests():
            _resolve(req.future, exc=exc)
        self.rows.clear()
        s = self.store
        s.rows, s.start, s.ptr = 0, 0, 0
        self._changed()

"""The continuous-batching decode loop of the CPU engine (runs on the engine's worker thread).

RL rollouts are G samples of one prompt whose lengths spread widely (a few tokens to the cap).
`model.generate()` prefills the prompt G times, pads every prompt to the longest and keeps
computing finished rows until the longest one ends. Here instead:
- each request's prompt is prefilled once, unpadded (requests of similar length are prefilled
  together, sorted by length), and its K/V is stored once for its G rows (cpu_kv.py), which
  attend to it together (cpu_attention.py);
- a row that finishes leaves the batch at once (the last row takes its slot);
- new requests join the running batch whenever rows are free (continuous batching).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from protocol.messages import SamplingParams
from services.engines.base import GenOutput, LogprobsMode
from services.engines.cpu_attention import DecodeContext, decoding
from services.engines.cpu_kv import DecodeCache, KVStore
from services.engines.cpu_model import ModelRunner
from services.engines.cpu_sampler import BatchSampling, RowSampling, sample

_NEG_INF = float("-inf")


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
class Group:
    """A request's prompt in the KV store, shared by its live rows."""

    req: GenRequest
    slot: int
    prompt_len: int
    live: int


@dataclass(eq=False, slots=True)
class Row:
    group: Group
    index: int  # which of the request's n samples
    tokens: list[int]  # sampled so far; all but the last are in the KV store
    logprobs: list[float]

    @property
    def req(self) -> GenRequest:
        return self.group.req


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
        self.dtype = next(runner.model.parameters()).dtype
        self.store = KVStore(runner.kv_shapes, self.dtype)
        self.cache = DecodeCache(self.store)
        self.rows: list[Row] = []
        self.groups: list[Group] = []
        self._layout: tuple | None = None  # per-composition tensors, rebuilt after changes
        self._cols = torch.arange(0)

    # ------------------------------------------------------------------ state
    @property
    def free_rows(self) -> int:
        return self.max_rows - len(self.rows)

    def running_requests(self) -> set[GenRequest]:
        return {g.req for g in self.groups}

    def _changed(self) -> None:
        self._layout = None

    def _composition(self):
        """Tensors that only change when rows join or leave: sampling settings, seeded row
        sets, and the group <-> row maps and prompt mask of the cascade attention."""
        if self._layout is None:
            b, n_g = len(self.rows), len(self.groups)
            spec = BatchSampling([r.req.sampling for r in self.rows], self.runner.vocab_size)
            group = torch.tensor([r.group.slot for r in self.rows], dtype=torch.long)
            index = torch.tensor([r.index for r in self.rows], dtype=torch.long)
            # rows ordered by (group, sample index); each row's rank inside its group
            order = torch.argsort(group * (int(index.max()) + 1) + index)
            counts = torch.bincount(group, minlength=n_g)
            gmax = int(counts.max())
            starts = torch.cumsum(counts, 0) - counts
            g_sorted = group[order]
            flat = g_sorted * gmax + (torch.arange(b) - starts[g_sorted])
            q_index = torch.zeros(n_g * gmax, dtype=torch.long)  # empty slots: row 0
            q_index[flat] = order
            row_pos = torch.empty(b, dtype=torch.long)
            row_pos[order] = flat
            # A seeded request draws from its own generator, for its live rows in sample
            # order: its draws do not depend on which other requests share the batch.
            seeded = []
            for g in self.groups:
                if g.req.generator is not None:
                    slots = q_index[g.slot * gmax : g.slot * gmax + g.live]
                    seeded.append((g.req.generator, slots))
            plen = torch.tensor([g.prompt_len for g in self.groups])
            pmax = int(plen.max())
            pmask = torch.zeros(n_g, 1, 1, pmax, dtype=self.dtype)
            pmask.masked_fill_((torch.arange(pmax) >= plen[:, None]).view(n_g, 1, 1, pmax), _NEG_INF)
            self._layout = (spec, seeded, gmax, q_index, row_pos, pmax, pmask)
        return self._layout

    def _uniforms(self, b: int, seeded: list[tuple[torch.Generator, torch.Tensor]]) -> torch.Tensor:
        u = torch.rand(b, dtype=torch.float64, generator=self.gen)
        for g, idx in seeded:
            u[idx] = torch.rand(len(idx), dtype=torch.float64, generator=g)
        return u

    # ------------------------------------------------------------------ admission
    def admit(self, reqs: list[GenRequest], prefill_token_budget: int) -> None:
        """Prefill `reqs` (sorted by length, several per forward up to the token budget) and add
        their rows to the batch. Caller guarantees sum(n) <= free_rows."""
        if not reqs:
            return
        s = self.store
        live_resp = max((len(r.tokens) for r in self.rows), default=0)
        s.reserve_groups(len(self.groups) + len(reqs), max(len(r.prompt) for r in reqs),
                         len(self.groups), max((g.prompt_len for g in self.groups), default=0))
        s.reserve_rows(len(self.rows) + sum(r.n for r in reqs), max(r.max_new for r in reqs),
                       len(self.rows), live_resp, self.max_rows)
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
        """Sample each of the n first tokens from the prompt's last logits, then store the
        prompt K/V once for the rows that continue."""
        spec = BatchSampling([req.sampling] * req.n, self.runner.vocab_size)
        u = None
        if not spec.all_greedy:
            g = req.generator if req.generator is not None else self.gen
            u = torch.rand(req.n, dtype=torch.float64, generator=g)
        tok, lp = sample(logits.unsqueeze(0).expand(req.n, -1), spec, u, self.mode)
        group = Group(req, len(self.groups), len(req.prompt), 0)
        live = []
        for idx, (t, logp) in enumerate(zip(tok.tolist(), lp.tolist(), strict=True)):
            row = Row(group, idx, [t], [logp])
            if not self._maybe_finish(row):
                live.append(row)
        if not live:
            return
        group.live = len(live)
        self.store.write_prompt(group.slot, kv)
        self.groups.append(group)
        self.rows.extend(live)
        self._changed()

    # ------------------------------------------------------------------ decode
    def step(self) -> None:
        """One decode step for every live row, then retire the rows that finished."""
        if not self.rows:
            return
        b = len(self.rows)
        spec, seeded, gmax, q_index, row_pos, pmax, pmask = self._composition()
        # the token each row feeds now is its last sampled one; its K/V goes to column n-1
        written = torch.tensor([len(r.tokens) - 1 for r in self.rows], dtype=torch.long)
        rmax = int(written.max()) + 1
        if self._cols.numel() < rmax:
            self._cols = torch.arange(max(rmax, 2 * self._cols.numel()))
        rmask = torch.zeros(b, 1, 1, rmax, dtype=self.dtype)
        rmask.masked_fill_((self._cols[:rmax] > written[:, None]).view(b, 1, 1, rmax), _NEG_INF)
        self.cache.rows = torch.arange(b)
        self.cache.cols = written
        ctx = DecodeContext(self.store, len(self.groups), gmax, q_index, row_pos, pmax, pmask, rmax, rmask)
        ids = torch.tensor([r.tokens[-1] for r in self.rows], dtype=torch.long).unsqueeze(1)
        pos = torch.tensor([r.group.prompt_len for r in self.rows], dtype=torch.long) + written
        with decoding(ctx):
            logits = self.runner.forward(ids, None, pos.unsqueeze(1), self.cache, 1)[:, -1]
        u = None if spec.all_greedy else self._uniforms(b, seeded)
        tok, lp = sample(logits, spec, u, self.mode)
        finished: list[int] = []
        for slot, (row, t, logp) in enumerate(zip(self.rows, tok.tolist(), lp.tolist(), strict=True)):
            row.tokens.append(t)
            row.logprobs.append(logp)
            if self._maybe_finish(row):
                finished.append(slot)
        if finished:
            self._remove(finished)

    def _maybe_finish(self, row: Row) -> bool:
        t = row.tokens[-1]
        req = row.req
        if t in req.stop_ids:
            reason = "stop"
        elif len(row.tokens) >= req.max_new:
            reason = "length"
        else:
            return False
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
        """Drop rows at `slots` (and groups left without rows), keeping both dense by moving
        the last ones into the holes."""
        dead = set(slots)
        resp_cols = max(len(r.tokens) for r in self.rows)
        keep = len(self.rows) - len(dead)
        holes = [i for i in sorted(dead) if i < keep]
        movers = [i for i in range(keep, len(self.rows)) if i not in dead]
        for i in dead:
            self.rows[i].group.live -= 1
        self.store.move_rows(holes, movers, resp_cols)
        for h, m in zip(holes, movers, strict=True):
            self.rows[h] = self.rows[m]
        del self.rows[keep:]
        if any(g.live == 0 for g in self.groups):
            pcols = max(g.prompt_len for g in self.groups)
            kept = [g for g in self.groups if g.live > 0]
            for new_slot, g in enumerate(kept):
                if g.slot != new_slot:
                    self.store.move_group(new_slot, g.slot, pcols)
                    g.slot = new_slot
            self.groups = kept
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
        self.groups.clear()
        self._changed()

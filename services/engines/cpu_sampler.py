"""Batched sampling with per-row temperature / top-k / top-p and exact per-token log-probs.

Log-prob modes (what `logprobs` holds for each sampled token):
- "processed": log-prob under the distribution actually sampled from, i.e.
  log_softmax(filter_top_k_top_p(logits / T)). This is the behaviour policy mu of the sample,
  the right denominator for importance weights (vLLM's `processed_logprobs`).
- "raw": log_softmax(logits), the model's own distribution at temperature 1 and without
  filtering (vLLM's `raw_logprobs`), comparable to a teacher-forced forward pass.
At temperature 0 (greedy) the sampled-from distribution is a point mass (log-prob 0), which
carries no information, so both modes report the raw log-prob of the argmax token.

Sampling is by inverse CDF: one uniform u per row, token = first index whose float64
cumulative probability exceeds u * total. That draws exactly from p (up to float64 rounding)
and needs one random number per row; drawing one per vocabulary entry (the exponential race,
or torch.multinomial) was ~15x slower for a 49k vocabulary here. Logit math is float32
whatever the model dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.engines.base import LogprobsMode


@dataclass(frozen=True)
class RowSampling:
    """Sampling settings of one row (one response being generated)."""

    temperature: float
    top_k: int  # <= 0: off
    top_p: float  # 1.0: off


class BatchSampling:
    """Per-row settings stacked into tensors once per batch composition, with flags that let
    the common cases (all plain temperature sampling, all greedy) skip the sort."""

    def __init__(self, rows: Sequence[RowSampling], vocab_size: int) -> None:
        self.size = len(rows)
        temps = torch.tensor([r.temperature for r in rows], dtype=torch.float32)
        self.greedy = temps <= 0.0
        self.all_greedy = bool(self.greedy.all())
        self.any_greedy = bool(self.greedy.any())
        # Greedy rows still go through the sampling math (results then replaced by argmax).
        self.inv_temps = (1.0 / torch.where(self.greedy, torch.ones_like(temps), temps)).unsqueeze(1)
        ks = [r.top_k if 0 < r.top_k < vocab_size else 0 for r in rows]
        self.max_k = max(ks) if all(k > 0 for k in ks) else 0  # topk() only if every row has a k
        self.any_top_k = any(k > 0 for k in ks)
        self.top_k = torch.tensor([k if k > 0 else vocab_size for k in ks], dtype=torch.long)
        self.any_top_p = any(r.top_p < 1.0 for r in rows)
        self.top_p = torch.tensor([r.top_p for r in rows], dtype=torch.float32)


def filter_top_k_top_p(scaled: torch.Tensor, spec: BatchSampling) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p nucleus to -inf (top-k first, then top-p
    on the renormalised remainder, as HF and vLLM do). Always keeps each row's best token."""
    if spec.max_k and not spec.any_top_p:
        # Every row has a k: a partial topk is far cheaper than a full sort of the vocabulary.
        vals, idx = scaled.topk(spec.max_k, dim=-1)
    else:
        vals, idx = scaled.sort(dim=-1, descending=True)
    width = vals.shape[-1]
    if spec.any_top_k:
        ranks = torch.arange(width).unsqueeze(0)
        vals = vals.masked_fill(ranks >= spec.top_k.unsqueeze(1), float("-inf"))
    if spec.any_top_p:
        probs = vals.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
        # keep the smallest prefix whose mass reaches top_p; position 0 always has before == 0
        vals = vals.masked_fill(before >= spec.top_p.unsqueeze(1), float("-inf"))
    # Unlisted tokens (beyond a partial topk) stay at -inf.
    return torch.full_like(scaled, float("-inf")).scatter_(-1, idx, vals)


def sample(
    logits: torch.Tensor,
    spec: BatchSampling,
    uniforms: torch.Tensor | None,
    mode: LogprobsMode = "processed",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of `logits` [B, V]. `uniforms` are U[0, 1) float64 [B] (ignored
    when every row is greedy). Returns (token ids int64 [B], log-probs float32 [B])."""
    logits = logits.float()
    raw_lp = torch.log_softmax(logits, dim=-1) if (mode == "raw" or spec.any_greedy) else None
    if spec.all_greedy:
        tok = logits.argmax(dim=-1)
        return tok, raw_lp.gather(1, tok.unsqueeze(1)).squeeze(1)
    if uniforms is None:
        raise ValueError("uniforms are required unless every row is greedy")
    scaled = logits * spec.inv_temps
    if spec.any_top_k or spec.any_top_p:
        scaled = filter_top_k_top_p(scaled, spec)
    proc_lp = torch.log_softmax(scaled, dim=-1)
    probs = proc_lp.exp()
    cdf = probs.double().cumsum_(dim=-1)
    u = (uniforms.double() * cdf[:, -1]).unsqueeze(1)
    tok = torch.searchsorted(cdf, u, right=True).squeeze(1)
    # u * total can round up to total: clamp to the last token with non-zero probability
    positive = probs > 0
    last = probs.shape[-1] - 1 - positive.flip(-1).to(torch.uint8).argmax(dim=-1)
    tok = torch.minimum(tok, last)
    if spec.any_greedy:
        tok = torch.where(spec.greedy, logits.argmax(dim=-1), tok)
    lp_src = raw_lp if mode == "raw" else proc_lp
    lp = lp_src.gather(1, tok.unsqueeze(1)).squeeze(1)
    if spec.any_greedy and mode == "processed":
        lp = torch.where(spec.greedy, raw_lp.gather(1, tok.unsqueeze(1)).squeeze(1), lp)
    return tok, lp

"""Batched teacher-forced scoring: raw log-probs of given response tokens.

Sequences are sorted by length and packed into forwards of at most `token_budget` padded
tokens. Left padding puts every response at the end of its row, so the logits needed (the
last max(response length) + 1 positions) come from `logits_to_keep` and the [B, T, V] logits of
long prompts are never materialised; the float32 log_softmax is chunked by `logits_budget`.
"""

from __future__ import annotations

import numpy as np
import torch

from services.engines.cpu_model import ModelRunner


def score_sequences(
    runner: ModelRunner,
    sequences: list[list[int]],
    offsets: list[int],
    *,
    token_budget: int = 8192,
    logits_budget: int = 1 << 24,
) -> list[np.ndarray]:
    """Log-prob of seq[t] given seq[:t] for t >= offset, per sequence (float32 arrays)."""
    out: list[np.ndarray | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and len(sequences[order[j]]) * (j + 1 - i) <= token_budget:
            j += 1
        idx = order[i:j]
        for k, res in zip(idx, _score_chunk(runner, [sequences[k] for k in idx], [offsets[k] for k in idx], logits_budget), strict=True):
            out[k] = res
        i = j
    return [o if o is not None else np.zeros(0, np.float32) for o in out]


def _score_chunk(
    runner: ModelRunner, seqs: list[list[int]], offsets: list[int], logits_budget: int
) -> list[np.ndarray]:
    b = len(seqs)
    tmax = max(len(s) for s in seqs)
    resp = [len(s) - o for s, o in zip(seqs, offsets, strict=True)]
    keep = max(resp) + 1  # logits at positions t-1 predict token t
    ids = torch.zeros(b, tmax, dtype=torch.long)
    mask = torch.zeros(b, tmax, dtype=torch.long)
    for k, s in enumerate(seqs):
        ids[k, tmax - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[k, tmax - len(s) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    keep = min(keep, tmax)
    logits = runner.forward(ids, mask, pos, None, keep)  # [B, keep, V]
    # Position tmax-1-m (m = 1..keep-1 from the end) predicts the token at tmax-m.
    pred = logits[:, :-1]  # predicts tokens at columns tmax-keep+1 .. tmax-1
    targets = ids[:, tmax - keep + 1 :]
    lp = torch.empty(targets.shape, dtype=torch.float32)
    rows_per_chunk = max(1, logits_budget // max(1, pred.shape[1] * pred.shape[2]))
    for r0 in range(0, b, rows_per_chunk):
        sl = slice(r0, r0 + rows_per_chunk)
        lsm = torch.log_softmax(pred[sl].float(), dim=-1)
        lp[sl] = lsm.gather(-1, targets[sl].unsqueeze(-1)).squeeze(-1)
    width = targets.shape[1]
    return [lp[k, width - n :].numpy().copy() if n else np.zeros(0, np.float32) for k, n in enumerate(resp)]

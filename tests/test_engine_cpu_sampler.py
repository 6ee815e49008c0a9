"""The CPU engine's sampler: draws follow the (filtered) distribution, log-probs per mode."""

from __future__ import annotations

import pytest
import torch

from services.engines.cpu_sampler import BatchSampling, RowSampling, sample

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def _draw(spec_row: RowSampling, n: int = 20000, seed: int = 0):
    spec = BatchSampling([spec_row] * n, len(LOGITS))
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return sample(LOGITS.expand(n, -1), spec, u, "processed")


def _assert_frequencies(tok: torch.Tensor, p: torch.Tensor) -> None:
    n = len(tok)
    freq = torch.bincount(tok, minlength=len(p)).double() / n
    sigma = (p * (1 - p) / n).sqrt()
    assert torch.all((freq - p).abs() <= 4 * sigma + 1e-12), (freq, p)


def test_draws_follow_softmax_at_temperature():
    tok, lp = _draw(RowSampling(temperature=0.8, top_k=-1, top_p=1.0))
    p = torch.softmax(LOGITS.double() / 0.8, 0)
    _assert_frequencies(tok, p)
    torch.testing.assert_close(lp.double(), p.log()[tok], atol=1e-5, rtol=0)


def test_top_k_then_top_p_nucleus():
    # top-k 4 keeps tokens 0-3; their renormalised masses ~ .53 .20 .12 .07 ... top_p .8 keeps 0-2
    tok, lp = _draw(RowSampling(temperature=1.0, top_k=4, top_p=0.8))
    p4 = torch.softmax(LOGITS.double()[:4], 0)
    keep = int(((torch.cumsum(p4, 0) - p4) < 0.8).sum())
    p = torch.zeros(len(LOGITS), dtype=torch.float64)
    p[:keep] = torch.softmax(LOGITS.double()[:keep], 0)
    assert set(tok.tolist()) <= set(range(keep))
    _assert_frequencies(tok, p)
    torch.testing.assert_close(lp.double(), p.log()[tok], atol=1e-5, rtol=0)


def test_raw_mode_reports_unscaled_logprobs_and_greedy_rows_mix():
    rows = [RowSampling(0.5, 2, 1.0), RowSampling(0.0, -1, 1.0), RowSampling(1.0, -1, 1.0)]
    spec = BatchSampling(rows, len(LOGITS))
    u = torch.tensor([0.99, 0.5, 0.0], dtype=torch.float64)
    raw = torch.log_softmax(LOGITS, 0)
    tok, lp = sample(LOGITS.expand(3, -1), spec, u, "raw")
    assert tok.tolist() == [1, 0, 0]  # u=.99 lands on the 2nd of the top-2; greedy; u=0 -> first
    torch.testing.assert_close(lp, raw[tok])
    tok_p, lp_p = sample(LOGITS.expand(3, -1), spec, u, "processed")
    assert tok_p.tolist() == tok.tolist()
    top2 = torch.log_softmax(LOGITS[:2] / 0.5, 0)
    torch.testing.assert_close(lp_p, torch.stack([top2[1], raw[0], raw[0]]))  # greedy row: raw


def test_uniform_at_the_top_edge_never_picks_a_filtered_token():
    spec = BatchSampling([RowSampling(1.0, 3, 1.0)], len(LOGITS))
    tok, lp = sample(LOGITS.unsqueeze(0), spec, torch.tensor([1.0], dtype=torch.float64), "processed")
    assert tok.item() == 2 and torch.isfinite(lp).all()


def test_all_greedy_needs_no_randomness():
    spec = BatchSampling([RowSampling(0.0, -1, 1.0)] * 2, len(LOGITS))
    tok, _ = sample(LOGITS.expand(2, -1), spec, None)
    assert tok.tolist() == [0, 0]
    with pytest.raises(ValueError):
        sample(LOGITS.expand(2, -1), BatchSampling([RowSampling(1.0, -1, 1.0)] * 2, 6), None)

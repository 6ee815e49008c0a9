"""Cascade attention (shared prompt part + own response part, merged by log-sum-exp) equals
ordinary attention over each row's concatenated [prompt; response] keys."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import services.engines.cpu_attention as A
from services.engines.cpu_kv import KVStore

HKV, REP, D = 2, 3, 8


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt_lens = [5, 9]  # two groups
    members = [[0, 2, 3], [1, 4]]  # rows of each group (interleaved slots, as after compaction)
    resp_lens = [1, 4, 2, 7, 3]  # response tokens per row, incl. the one written this step
    store = KVStore([(HKV, D)], torch.float32)
    store.reserve_groups(2, max(prompt_lens), 0, 0)
    store.reserve_rows(5, max(resp_lens), 0, 0, 5)
    for buf in store.pk + store.pv + store.rk + store.rv:
        buf.copy_(torch.randn(buf.shape, generator=g))
    b, gmax = 5, 3
    q_index = torch.zeros(2 * gmax, dtype=torch.long)
    row_pos = torch.empty(b, dtype=torch.long)
    for gi, rows in enumerate(members):
        for i, r in enumerate(rows):
            q_index[gi * gmax + i] = r
            row_pos[r] = gi * gmax + i
    pmax, rmax = max(prompt_lens), max(resp_lens)
    pmask = torch.zeros(2, 1, 1, pmax)
    for gi, p in enumerate(prompt_lens):
        pmask[gi, ..., p:] = float("-inf")
    rmask = torch.zeros(b, 1, 1, rmax)
    for r, n in enumerate(resp_lens):
        rmask[r, ..., n:] = float("-inf")
    ctx = A.DecodeContext(store, 2, gmax, q_index, row_pos, pmax, pmask, rmax, rmask)
    query = torch.randn(b, HKV * REP, 1, D, generator=g)
    group_of = {r: gi for gi, rows in enumerate(members) for r in rows}
    return store, ctx, query, prompt_lens, resp_lens, group_of


@pytest.mark.parametrize("fused", [True, False])
def test_cascade_equals_plain_attention(monkeypatch, fused):
    if not fused:
        monkeypatch.setattr(A, "_flash", None)  # the matmul fallback
    store, ctx, query, plens, rlens, group_of = _setup()
    module = SimpleNamespace(layer_idx=0)
    with A.decoding(ctx):
        out, _ = A.cascade_attention(module, query, None, None, None, scaling=0.3)
    assert out.shape == (5, 1, HKV * REP, D)
    for r in range(5):
        g = group_of[r]
        k = torch.cat([store.pk[0][g, :, : plens[g]], store.rk[0][r, :, : rlens[r]]], dim=1)
        v = torch.cat([store.pv[0][g, :, : plens[g]], store.rv[0][r, :, : rlens[r]]], dim=1)
        k = k.repeat_interleave(REP, dim=0)  # query head j uses kv head j // REP
        v = v.repeat_interleave(REP, dim=0)
        ref = F.scaled_dot_product_attention(query[r], k, v, scale=0.3)  # [H, 1, D]
        torch.testing.assert_close(out[r, 0], ref[:, 0], atol=1e-5, rtol=1e-5)


def test_outside_a_decode_step_it_is_plain_sdpa():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 6, D, generator=g) for _ in range(3))
    module = SimpleNamespace(layer_idx=0, is_causal=True, num_key_value_groups=1)
    out, _ = A.cascade_attention(module, q, k, v, None, scaling=0.5)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5).transpose(1, 2)
    torch.testing.assert_close(out, ref)

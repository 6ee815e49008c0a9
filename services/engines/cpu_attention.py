"""Cascade attention for the decode step, registered as a transformers attention backend.

The model is loaded with `attn_implementation="rlrt_cascade"`. Outside a decode step (prefill,
scoring, anything else) the backend is plain SDPA with transformers' own masks. Inside one
(`decoding(ctx)` on the engine's worker thread) each row's single query attends to
  (1) its group's prompt K/V, shared by the group's rows: the queries of all rows of a group
      (times the GQA head ratio) form one query block against that prompt, so the prompt is
      read once per group instead of once per row, and
  (2) its own response K/V,
and the two partial softmaxes are merged exactly with their log-sum-exps. Neither part pads
one row to another's length beyond the longest prompt / response of the batch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from services.engines.cpu_kv import KVStore

IMPLEMENTATION = "rlrt_cascade"
_tls = threading.local()


@dataclass
class DecodeContext:
    store: KVStore
    n_groups: int
    gmax: int  # most live rows in one group
    q_index: torch.Tensor  # [n_groups * gmax]: row of each (group, i) slot (empty slots: row 0)
    row_pos: torch.Tensor  # [B]: (group, i) slot of each row
    prompt_len: int  # longest live prompt
    prompt_mask: torch.Tensor  # [n_groups, 1, 1, prompt_len] additive (0 / -inf)
    resp_len: int  # longest live response incl. this step's token
    resp_mask: torch.Tensor  # [B, 1, 1, resp_len] additive


@contextmanager
def decoding(ctx: DecodeContext) -> Iterator[None]:
    _tls.ctx = ctx
    try:
        yield
    finally:
        _tls.ctx = None


def _attend(q, k, v, mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v and its log-sum-exp ([B, H, L, D], [B, H, L])."""
    if _flash is not None:
        out, lse = _flash(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return out, lse
    s = torch.matmul(q, k.transpose(-1, -2)) * scale + mask
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v), lse


# torch's fused CPU kernel returns the log-sum-exp too; fall back to matmuls if it is missing
_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def cascade_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    ctx: DecodeContext | None = getattr(_tls, "ctx", None)
    if ctx is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise NotImplementedError("cascade attention supports plain full attention only")
    b, hq, _, d = query.shape
    layer = module.layer_idx
    s = ctx.store
    hkv = s.pk[layer].shape[1]
    rep = hq // hkv
    scale = scaling if scaling is not None else d**-0.5
    q = query.reshape(b, hkv, rep, d)  # query head j uses kv head j // rep, as repeat_kv does

    # (1) prompt part: one query block per group
    # empty (group, i) slots repeat row 0's query; their outputs are never read
    qg = q[ctx.q_index].view(ctx.n_groups, ctx.gmax, hkv, rep, d).transpose(1, 2)
    qg = qg.reshape(ctx.n_groups, hkv, ctx.gmax * rep, d)
    pk = s.pk[layer][: ctx.n_groups, :, : ctx.prompt_len]
    pv = s.pv[layer][: ctx.n_groups, :, : ctx.prompt_len]
    out_p, lse_p = _attend(qg, pk, pv, ctx.prompt_mask, scale)
    out_p = out_p.view(ctx.n_groups, hkv, ctx.gmax, rep, d).transpose(1, 2).reshape(-1, hkv, rep, d)[ctx.row_pos]
    lse_p = lse_p.view(ctx.n_groups, hkv, ctx.gmax, rep).transpose(1, 2).reshape(-1, hkv, rep)[ctx.row_pos]

    # (2) response part: each row against its own tokens
    rk = s.rk[layer][:b, :, : ctx.resp_len]
    rv = s.rv[layer][:b, :, : ctx.resp_len]
    out_r, lse_r = _attend(q, rk, rv, ctx.resp_mask, scale)

    # exact merge of the two partial softmaxes: the prompt part's share of the total mass is
    # e^lse_p / (e^lse_p + e^lse_r) = sigmoid(lse_p - lse_r)
    w = torch.sigmoid(lse_p - lse_r).unsqueeze(-1)
    out = torch.lerp(out_r, out_p.to(out_r.dtype), w.to(out_r.dtype))
    return out.to(query.dtype).reshape(b, 1, hq, d), None  # [B, q_len, heads, head_dim], as sdpa returns


AttentionInterface.register(IMPLEMENTATION, cascade_attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)

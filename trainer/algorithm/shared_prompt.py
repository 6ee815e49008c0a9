"""The decoder's hidden states for the response tokens, with each group's prompt run once.

GRPO trains on G responses per prompt; the plain forward runs the prompt's tokens G times. Here
the distinct prompts of a micro-batch run once (the prefix pass, which keeps each layer's keys
and values), those keys and values are repeated for the rows that share the prompt, and only the
response tokens run per row (the suffix pass attends to the prompt through them). Gradients flow
back through the repeated keys and values into the one prefix pass, so the update is the same
as the plain forward's, up to float rounding. The work saved is (G - 1) / G of the prompt
tokens: on the tiny config (22-token prompts, 32-token responses, G 8) about a third of the
update.

Layout (trainer/batch.py): one row per response, [prompt | response | pad], right-padded, the
response tokens exactly the trained (log-prob) ones. The prefix pass runs the distinct prompts
right-padded too ([prompt | pad], position ids 0..), so every padded query still sees a real
token; the suffix pass continues each row at its own prompt length (position ids), with the
attention mask hiding the prompt's padding. The first response token is predicted by the
prompt's last hidden state (from the prefix pass); each later one by the suffix pass.

`shared_prompt_hidden` returns None whenever the batch does not have that shape (nothing
shared, a mask that is not one contiguous response per row, a model whose cache is not the
plain per-layer key/value one): the caller then runs the plain forward.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


def prompt_groups(input_ids: Tensor, attention_mask: Tensor, want: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor] | None:
    """(distinct prompts [U, P] padded with -1, each row's prompt index [B], each row's prompt
    length [B]), or None when the rows are not [prompt | response | pad] with a shared prompt."""
    B, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device)
    lens = attention_mask.sum(-1)
    if not torch.equal(attention_mask.bool(), pos[None] < lens[:, None]):
        return None  # not right-padded
    has = want.any(-1)
    start = torch.where(has, want.to(torch.int8).argmax(-1), lens)
    if not torch.equal(want, (pos[None] >= start[:, None]) & (pos[None] < lens[:, None])):
        return None  # the trained tokens are not one response running to each row's end
    if bool((start < 1).any()):
        return None  # a row without a prompt token
    width = int(start.max())
    prompts = torch.where(pos[None, :width] < start[:, None], input_ids[:, :width], -1)
    if bool((prompts[pos[None, :width] < start[:, None]] < 0).any()):
        return None  # negative token ids would collide with the padding
    distinct, inverse = torch.unique(prompts, dim=0, return_inverse=True)
    if distinct.shape[0] == B:
        return None  # nothing shared
    return distinct, inverse, start


def shared_prompt_hidden(decoder: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                         want: Tensor) -> tuple[Tensor, Tensor] | None:
    """The hidden states that predict the wanted tokens, row-major ([N, H]), and those tokens
    ([N]) -- the same as `hidden[pred]`, `input_ids[want]` of the plain forward -- or None."""
    groups = prompt_groups(input_ids, attention_mask, want)
    if groups is None:
        return None
    distinct, inverse, start = groups
    device = input_ids.device
    plen = (distinct >= 0).sum(-1)  # [U]
    width = int(plen.max())
    prefix_mask = (distinct[:, :width] >= 0).long()
    prefix_ids = distinct[:, :width].clamp(min=0)  # pad with token 0, masked out
    prefix_pos = torch.arange(width, device=device)[None].expand_as(prefix_ids)
    out = decoder(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=prefix_pos,
                  use_cache=True)
    cache = getattr(out, "cache", None)  # transformers >= 5.25; past_key_values before
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    kv = _plain_key_values(cache)
    if kv is None:
        return None  # activation checkpointing (no cache), or a hybrid / sliding cache
    from transformers import DynamicCache

    expanded = DynamicCache(ddp_cache_data=[(k.index_select(0, inverse),
                                             v.index_select(0, inverse)) for k, v in kv])

    n = want.sum(-1)  # [B] response tokens per row
    width_s = max(int(n.max()), 1)
    cols = torch.arange(width_s, device=device)
    in_resp = cols[None] < n[:, None]  # [B, Ls]
    src = (start[:, None] + cols[None]).clamp(max=input_ids.shape[1] - 1)
    suffix_ids = torch.where(in_resp, input_ids.gather(1, src), 0)
    mask = torch.cat([prefix_mask.index_select(0, inverse), in_resp.long()], dim=1)
    suffix_pos = start[:, None] + cols[None]
    hidden_s = decoder(input_ids=suffix_ids, attention_mask=mask, position_ids=suffix_pos,
                       use_cache=False, **{_cache_arg(type(decoder)): expanded})
    hidden_s = hidden_s.last_hidden_state if hasattr(hidden_s, "last_hidden_state") \
        else hidden_s[0]
    hidden_p = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    last = hidden_p[torch.arange(hidden_p.shape[0], device=device), plen - 1]  # [U, H]
    # Response token j is predicted by the hidden state before it: the prompt's last (j = 0),
    # else the suffix pass's at j - 1.
    pred = torch.cat([last.index_select(0, inverse)[:, None], hidden_s[:, :-1]], dim=1)
    return pred[in_resp], suffix_ids[in_resp]


def _plain_key_values(cache: object) -> list[tuple[Tensor, Tensor]] | None:
    """Each layer's (keys, values) of a cache made only of plain full-attention layers."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # transformers < 4.56: no per-layer cache objects; the plain forward
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


@functools.cache
def _cache_arg(decoder_class: type) -> str:
    """The keyword a decoder class takes a cache by (transformers 5.25 renamed
    past_key_values); looked up once per class, not per micro-batch."""
    import inspect

    params = inspect.signature(decoder_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"

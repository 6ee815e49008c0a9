"""Per-token log-probs (and entropy) of the sampled tokens without a [B,T,V] log-softmax.

The naive `log_softmax(logits.float(), -1).gather(...)` holds B*T*V floats several times
over (logits, their float copy, the log-softmax, and as many again in the backward). With
Qwen's V = 151,936 and T = 4,096 that is 2.5 GB per copy for ONE sequence. Here the lm_head
is applied chunk by chunk of rows to the last hidden state, each chunk reduced at once to
(log-prob of the sampled token, entropy) with a logsumexp, and each chunk wrapped in
torch.utils.checkpoint, so the backward recomputes one chunk's logits at a time instead of
keeping all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from trainer.algorithm.shared_prompt import shared_prompt_hidden

# Rows per chunk. 256 rows x V = 151,936 is 156 MB of float32 logits; a chunk's backward holds
# a few such buffers at once (logits, softmax, their gradient), so the transient stays under
# ~1 GB whatever T is, while each chunk is still a large matmul for the GPU.
DEFAULT_CHUNK = 256


def _chunk_logprobs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    temperature: float,
    softcap: float | None,
    with_entropy: bool,
) -> tuple[Tensor, Tensor]:
    """One chunk: hidden [N,H] -> (log p(label) [N], entropy [N] or empty), in float32."""
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:  # Gemma-style final logit soft-capping
        logits = softcap * torch.tanh(logits / softcap)
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, labels[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return picked, picked.new_empty(0)
    # H = lse - sum_v p_v z_v, without materialising log p for the whole row.
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return picked, entropy


def logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    with_entropy: bool = False,
    use_checkpoint: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """log softmax(hidden @ weight.T + bias)[label] for each row, chunked over rows.
    hidden [N,H], weight [V,H], labels [N] -> (logprobs [N] float32, entropy [N] or None).
    Checkpointing is used only when a gradient is being recorded."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    outs, ents = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        y = labels[start : start + chunk_size]
        args = (h, weight, bias, y, temperature, softcap, with_entropy)
        if grad and use_checkpoint:
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        outs.append(lp)
        ents.append(ent)
    empty = hidden.new_zeros(0, dtype=torch.float32)
    logprobs = torch.cat(outs) if outs else empty
    if not with_entropy:
        return logprobs, None
    return logprobs, torch.cat(ents) if ents else empty


@dataclass
class TokenLogProbs:
    logprobs: (
        Tensor  # [B,T] float32: log p(input_ids[:, t] | input_ids[:, :t]); 0 where not computed
    )
    entropy: Tensor | None  # [B,T] float32 entropy of the distribution that predicted token t


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head if head is not None else getattr(model, "lm_head", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    decoder = decoder if decoder is not None else getattr(model, "model", None)
    if head is None or decoder is None:
        raise TypeError(f"{type(model).__name__}: cannot find the decoder and lm_head")
    return decoder, head


def token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    logprob_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    with_entropy: bool = False,
    use_checkpoint: bool = True,
    share_prompts: bool = False,
) -> TokenLogProbs:
    """Log-probs of the tokens of `input_ids` [B,T] under an HF causal LM, aligned with the
    input: out[:, t] = log p(input_ids[:, t] | input_ids[:, :t]); out[:, 0] = 0.

    logprob_mask [B,T] bool picks the tokens to score (default: attention_mask, or all);
    pass the response mask to skip the lm_head over prompt tokens. temperature divides the
    logits (match the rollout's sampling temperature). Gradients flow to the model when
    enabled. Models that scale logits in their forward (Cohere's logit_scale, ...) are not
    covered; Gemma's final_logit_softcapping is. share_prompts: rows that share a prompt run
    it once (trainer/algorithm/shared_prompt.py; the plain forward when the batch does not
    have that shape)."""
    decoder, head = _decoder_and_head(model)
    B, T = input_ids.shape
    want = logprob_mask if logprob_mask is not None else attention_mask
    want = torch.ones_like(input_ids, dtype=torch.bool) if want is None else want.bool()
    want = want.clone()
    want[:, 0] = False  # token 0 has no prediction
    shared = None
    if share_prompts and attention_mask is not None and position_ids is None:
        shared = shared_prompt_hidden(decoder, input_ids, attention_mask, want)
    if shared is not None:
        hidden_sel, labels = shared
    else:
        out = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        # Hidden state t predicts token t + 1: select the predicting rows of the wanted tokens.
        pred = torch.zeros_like(want)
        pred[:, :-1] = want[:, 1:]
        hidden_sel, labels = hidden[pred], input_ids[want]
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    lp, ent = logprobs_from_hidden(
        hidden_sel,
        head.weight,
        labels,
        bias=getattr(head, "bias", None),
        temperature=temperature,
        softcap=softcap,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
        use_checkpoint=use_checkpoint,
    )
    logprobs = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
    logprobs = logprobs.masked_scatter(want, lp)
    entropy = None
    if ent is not None:
        entropy = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
        entropy = entropy.masked_scatter(want, ent)
    return TokenLogProbs(logprobs=logprobs, entropy=entropy)

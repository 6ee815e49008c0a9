"""Chunked log-probs equal the naive log_softmax(logits).gather, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM

from trainer.algorithm import logprobs_from_hidden, token_logprobs


def naive(hidden, weight, bias, labels, temperature=1.0, softcap=None):
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits / temperature, -1)
    picked = logp.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return picked, entropy


@pytest.mark.parametrize(
    "chunk, temperature, softcap", [(1, 1.0, None), (3, 1.0, None), (5, 0.7, None), (100, 1.0, 5.0)]
)
def test_logprobs_from_hidden_equals_naive_with_grads(chunk, temperature, softcap):
    torch.manual_seed(0)
    N, H, V = 17, 8, 50
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,))
    lp, ent = logprobs_from_hidden(
        h,
        w,
        y,
        bias=b,
        temperature=temperature,
        softcap=softcap,
        chunk_size=chunk,
        with_entropy=True,
    )
    ref_lp, ref_ent = naive(h, w, b, y, temperature, softcap)
    torch.testing.assert_close(lp, ref_lp.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent.float(), atol=1e-5, rtol=1e-5)
    # a loss mixing both outputs: gradients to hidden, weight and bias must match.
    g = torch.randn(N, dtype=torch.float64)
    grads = torch.autograd.grad((lp.double() * g).sum() + ent.double().sum(), (h, w, b))
    ref = torch.autograd.grad((ref_lp * g).sum() + ref_ent.sum(), (h, w, b))
    for a, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)


def tiny_qwen3() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    return Qwen3ForCausalLM(cfg)


def test_token_logprobs_on_a_tiny_qwen3_matches_the_full_logits():
    model = tiny_qwen3()
    B, T = 3, 12
    ids = torch.randint(0, 64, (B, T))
    attn = torch.ones(B, T, dtype=torch.long)
    attn[2, 9:] = 0  # right padding
    want = torch.zeros(B, T, dtype=torch.bool)
    want[:, 5:] = True  # the "response": skip the prompt's lm_head
    want &= attn.bool()

    out = token_logprobs(model, ids, attn, logprob_mask=want, chunk_size=4, with_entropy=True)
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    ref = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    m = want[:, 1:]
    torch.testing.assert_close(out.logprobs[:, 1:][m], ref[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy[:, 1:][m], ref_ent[m], atol=1e-5, rtol=1e-5)
    assert (out.logprobs[~want] == 0).all() and (out.logprobs[:, 0] == 0).all()

    # gradients to the model's parameters agree with the naive path's.
    params = [p for p in model.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(out.logprobs[want].sum() + out.entropy[want].sum(), params)
    g2 = torch.autograd.grad(ref[m].sum() + ref_ent[m].sum(), params)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_no_grad_mode_returns_plain_tensors():
    model = tiny_qwen3()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        out = token_logprobs(model, ids, chunk_size=5)
    assert not out.logprobs.requires_grad and out.entropy is None
    assert out.logprobs.shape == (2, 6)
    assert torch.isfinite(out.logprobs).all() and (out.logprobs[:, 1:] < 0).all()

"""trainer.share_prompts (trainer/algorithm/shared_prompt.py): with each group's prompt run once,
the log-probs, entropies and gradients are those of the plain forward (float rounding apart), on
Qwen3 and Llama; batches that do not have the [prompt | response | pad] shape, or share nothing,
take the plain forward; and a shared forward that disagrees with the plain one on the first
shared micro-batch is turned off with a warning."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from support.tiny_model import POLICY, char_tokenizer, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.algorithm import shared_prompt
from trainer.algorithm.logprobs import token_logprobs
from trainer.algorithm.shared_prompt import prompt_groups
from trainer.model import PolicyModel


def batch(vocab: int, groups: list[tuple[int, list[int]]], seed: int = 0):  # noqa: ANN201
    """Right-padded [prompt | response | pad] rows: per group (prompt length, response lengths)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for plen, rlens in groups:
        prompt = torch.randint(1, vocab, (plen,), generator=g)
        rows += [(prompt, torch.randint(1, vocab, (n,), generator=g)) for n in rlens]
    T = max(len(p) + len(r) for p, r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    att = torch.zeros_like(ids)
    resp = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p)], ids[i, len(p):len(p) + len(r)] = p, r
        att[i, :len(p) + len(r)] = 1
        resp[i, len(p):len(p) + len(r)] = True
    return ids, att, resp


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=128))


@pytest.mark.parametrize("make", [lambda: tiny_model(char_tokenizer(), **POLICY), llama],
                         ids=["qwen3", "llama"])
def test_shared_prompts_give_the_plain_forwards_logprobs_and_gradients(make):
    model = make().train()
    # prompts of different lengths, G = 3, a response of length 0 and of length 1
    ids, att, resp = batch(model.config.vocab_size, [(5, [4, 7, 0]), (9, [3, 3, 6]),
                                                     (2, [8, 1, 5])])

    def run(share: bool):  # noqa: ANN202
        model.zero_grad()
        out = token_logprobs(model, ids, att, logprob_mask=resp, with_entropy=True,
                             share_prompts=share)
        (out.logprobs.sum() + 0.1 * out.entropy.sum()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, g_plain = run(False)
    shared, g_shared = run(True)
    assert bool((plain.logprobs[resp] != 0).all())  # every response token was scored
    torch.testing.assert_close(shared.logprobs, plain.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared.entropy, plain.entropy, rtol=0, atol=1e-5)
    for name, grad in g_plain.items():
        torch.testing.assert_close(g_shared[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_the_shared_forward_runs_each_prompt_once(monkeypatch):
    model = tiny_model(char_tokenizer(), **POLICY)
    ids, att, resp = batch(model.config.vocab_size, [(6, [3, 4, 5, 2]), (4, [2, 2, 6, 1])])
    rows_seen: list[int] = []
    decoder = model.get_decoder()
    original = decoder.forward

    @functools.wraps(original)  # keeps the signature the shared path reads
    def counting(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        rows_seen.append(int(kw["input_ids"].numel()))
        return original(*a, **kw)

    monkeypatch.setattr(decoder, "forward", counting)
    with torch.no_grad():
        token_logprobs(model, ids, att, logprob_mask=resp, share_prompts=True)
    # the prefix pass: 2 prompts x 6 columns; the suffix: 8 rows x the longest response (6)
    assert rows_seen == [2 * 6, 8 * 6]
    rows_seen.clear()
    with torch.no_grad():
        token_logprobs(model, ids, att, logprob_mask=resp)
    assert rows_seen == [ids.numel()]  # the plain forward: every row's prompt again


def test_batches_of_another_shape_take_the_plain_forward():
    ids, att, resp = batch(50, [(4, [3, 3]), (5, [2, 4])])
    assert prompt_groups(ids, att, resp) is not None
    assert prompt_groups(*batch(50, [(4, [3]), (5, [2])])) is None  # nothing shared
    holes = resp.clone()
    holes[0, 5] = False  # a trained token missing in the middle of a response
    assert prompt_groups(ids, att, holes) is None
    prompt_too = resp.clone()
    prompt_too[0, 1] = True  # a prompt token trained
    assert prompt_groups(ids, att, prompt_too) is None
    left = torch.flip(att, dims=[1])  # left padding
    assert prompt_groups(ids, left, resp) is None


def test_a_shared_forward_that_disagrees_is_turned_off(monkeypatch, caplog):
    model = tiny_model(char_tokenizer(), **POLICY)
    ids, att, resp = batch(model.config.vocab_size, [(5, [4, 4]), (3, [2, 5])])
    wrapper = PolicyModel(model, chunk_size=64, temperature=1.0, share_prompts=True)
    with torch.no_grad():
        plain = token_logprobs(model, ids, att, logprob_mask=resp).logprobs
    real = shared_prompt.shared_prompt_hidden

    def wrong(*a, **kw):  # noqa: ANN002, ANN003, ANN202 - a model the shared path does not fit
        hidden, labels = real(*a, **kw)
        return hidden.flip(0), labels

    monkeypatch.setattr("trainer.algorithm.logprobs.shared_prompt_hidden", wrong)
    with caplog.at_level(logging.WARNING, logger="rlrt.trainer.model"), torch.no_grad():
        lp, _ = wrapper(ids, att, resp)
    assert not wrapper.share_prompts and "differs from the plain one" in caplog.text
    torch.testing.assert_close(lp, plain, rtol=0, atol=0)

    good = PolicyModel(model, chunk_size=64, temperature=1.0, share_prompts=True)
    monkeypatch.setattr("trainer.algorithm.logprobs.shared_prompt_hidden", real)
    with torch.no_grad():
        lp, _ = good(ids, att, resp)
    assert good.share_prompts
    torch.testing.assert_close(lp, plain, rtol=0, atol=1e-5)


def test_only_one_trainer_process_shares_prompts(tmp_path):
    """Ranks decide per micro-batch; one rank on the shared forward and one on the plain one
    would ready gradients in different orders and pair different ZeRO buckets (a hang)."""
    from trainer.config import TrainerConfig
    from trainer.model import shares_prompts

    cfg = TrainerConfig(model_path=str(tmp_path))
    assert cfg.share_prompts and shares_prompts(cfg, 1)
    assert not shares_prompts(cfg, 2)
    assert not shares_prompts(cfg.model_copy(update={"gradient_checkpointing": True}), 1)
    assert not shares_prompts(cfg.model_copy(update={"share_prompts": False}), 1)

"""The built-in CPU engine against plain transformers on a tiny real Qwen3.

The model is built with a large init range so its next-token distributions are peaked: greedy
decoding then has no near-ties, and exact token equality with `model.generate` is meaningful
(float32 results of a batched and an unbatched forward differ by ~1e-6).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from support.engine_hold import HoldDecode
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

from protocol.messages import SamplingParams
from services.engines.base import (
    EngineClosed,
    InvalidRequest,
)
from services.engines.cpu import CpuEngine

VOCAB = 96
CONTEXT = 160
EOS = 1


def _config() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=CONTEXT, eos_token_id=EOS, pad_token_id=0, bos_token_id=2,
        tie_word_embeddings=True, initializer_range=0.25,
    )


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


@pytest.fixture(scope="module")
def word_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen3")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config()).save_pretrained(str(d))
    _tokenizer().save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def hf(word_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(word_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(word_model_dir):
    eng = CpuEngine(word_model_dir, logprobs_mode="raw", num_threads=1, max_batch_rows=32)
    yield eng
    eng.shutdown()


def _prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        out.append(torch.randint(3, VOCAB, (length,), generator=g).tolist())
    return out


@torch.no_grad()
def _teacher_forced(hf, seq: list[int]) -> torch.Tensor:
    """log_softmax over the whole sequence: row t is the distribution of token t+1."""
    return torch.log_softmax(hf(torch.tensor([seq])).logits[0].float(), dim=-1)


def _token_logprobs(hf, prompt: list[int], resp: list[int]) -> np.ndarray:
    lsm = _teacher_forced(hf, prompt + resp)
    idx = torch.arange(len(prompt) - 1, len(prompt) + len(resp) - 1)
    return lsm[idx, torch.tensor(resp)].numpy()


# ---------------------------------------------------------------------------- generation
async def test_greedy_matches_hf_generate_in_a_mixed_batch(engine, hf):
    prompts = _prompts(5, seed=1)
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    results = await asyncio.gather(*[engine.generate(p, 2, params) for p in prompts])
    for p, outs in zip(prompts, results, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24, pad_token_id=0,
                              eos_token_id=EOS)[0, len(p):].tolist()
        for o in outs:
            assert o.token_ids.tolist() == ref
            assert o.finish_reason == ("stop" if ref[-1] == EOS else "length")


async def test_raw_logprobs_equal_teacher_forced_forward(engine, hf):
    prompts = _prompts(4, seed=2)
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=7)
    results = await asyncio.gather(*[engine.generate(p, 3, params) for p in prompts])
    for p, outs in zip(prompts, results, strict=True):
        for o in outs:
            ref = _token_logprobs(hf, p, o.token_ids.tolist())
            np.testing.assert_allclose(o.logprobs, ref, atol=1e-4, rtol=0)


async def test_processed_logprobs_are_those_of_the_filtered_distribution(word_model_dir, hf):
    """Independent re-implementation of temperature -> top-k -> top-p in float64."""
    temp, top_k, top_p = 0.7, 20, 0.8
    eng = CpuEngine(word_model_dir, logprobs_mode="processed", num_threads=1)
    try:
        prompt = _prompts(1, seed=3)[0]
        params = SamplingParams(max_new_tokens=25, temperature=temp, top_k=top_k, top_p=top_p, seed=3)
        outs = await eng.generate(prompt, 4, params)
    finally:
        await eng.close()
    for o in outs:
        resp = o.token_ids.tolist()
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + resp])).logits[0].double()
        for t, tok in enumerate(resp):
            row = logits[len(prompt) - 1 + t] / temp
            order = torch.argsort(row, descending=True)
            kept = order[:top_k]
            p = torch.softmax(row[kept], dim=0)
            mass_before = torch.cumsum(p, 0) - p
            kept = kept[mass_before < top_p]
            assert tok in kept.tolist(), f"token {tok} at step {t} is outside the nucleus"
            expected = torch.log_softmax(row[kept], dim=0)[kept.tolist().index(tok)].item()
            assert o.logprobs[t] == pytest.approx(expected, abs=1e-4)


async def test_finish_reasons_stop_and_length(engine, hf):
    prompt = _prompts(1, seed=4)[0]
    free = await engine.generate(prompt, 1, SamplingParams(max_new_tokens=12, temperature=0.0))
    toks = free[0].token_ids.tolist()
    assert free[0].finish_reason == "length" and len(toks) == 12
    stop = toks[5]
    first = toks.index(stop)
    stopped = await engine.generate(
        prompt, 2, SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[stop])
    )
    for o in stopped:
        assert o.finish_reason == "stop"
        assert o.token_ids.tolist() == toks[: first + 1]  # the stop token is included
    assert EOS in engine.eos_ids


async def test_max_new_tokens_capped_by_context(engine):
    prompt = _prompts(1, seed=5, lo=CONTEXT - 4, hi=CONTEXT - 3)[0]
    outs = await engine.generate(prompt, 1, SamplingParams(max_new_tokens=50, temperature=0.0, stop_token_ids=[]))
    assert outs[0].finish_reason == "length" or outs[0].token_ids[-1] == EOS
    assert len(prompt) + len(outs[0].token_ids) <= CONTEXT


async def test_seeded_sampling_is_independent_of_batch_company(engine):
    prompt = _prompts(1, seed=6)[0]
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=123)
    alone = await engine.generate(prompt, 3, params)
    noisy = SamplingParams(max_new_tokens=40, temperature=1.0)
    crowd = await asyncio.gather(
        *[engine.generate(p, 2, noisy) for p in _prompts(3, seed=9)], engine.generate(prompt, 3, params)
    )
    for a, b in zip(alone, crowd[-1], strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


async def test_prompt_prefilled_once_and_finished_rows_leave_the_batch(word_model_dir):
    """The work the engine exists to save, counted at the embedding layer: a group's prompt
    goes through the model once (not n times), and decode steps only carry unfinished rows."""
    eng = CpuEngine(word_model_dir, num_threads=1)
    seen: list[tuple[int, int]] = []
    hook = eng.model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: seen.append(tuple(args[0].shape))
    )
    try:
        prompt = _prompts(1, seed=10, lo=20, hi=21)[0]
        outs = await eng.generate(prompt, 6, SamplingParams(max_new_tokens=40, temperature=1.5, seed=1))
    finally:
        hook.remove()
        await eng.close()
    prefill = [s for s in seen if s[1] > 1]
    decode = [s for s in seen if s[1] == 1]
    assert prefill == [(1, len(prompt))]
    lengths = [len(o.token_ids) for o in outs]
    # each response of length L needs L-1 decode rows (its first token comes from the prefill)
    assert sum(b for b, _ in decode) == sum(n - 1 for n in lengths)
    assert len(decode) == max(lengths) - 1


async def test_text_is_detokenized(engine):
    outs = await engine.generate([5, 6, 7], 1, SamplingParams(max_new_tokens=5, temperature=0.0))
    o = outs[0]
    assert o.text == engine.tokenizer.decode(o.token_ids.tolist(), skip_special_tokens=True)
    r = o.to_response()
    assert r.token_ids.tolist() == o.token_ids.tolist() and r.finish_reason == o.finish_reason


# ---------------------------------------------------------------------------- scoring
async def test_score_equals_teacher_forced_forward(engine, hf):
    seqs = _prompts(6, seed=11, lo=5, hi=60)
    offsets = [1, 3, len(seqs[2]) // 2, len(seqs[3]) - 1, len(seqs[4]), 2]
    got = await engine.score(seqs, offsets)
    for s, off, lp in zip(seqs, offsets, got, strict=True):
        assert lp.dtype == np.float32 and len(lp) == len(s) - off
        if len(lp):
            ref = _token_logprobs(hf, s[:off], s[off:])
            np.testing.assert_allclose(lp, ref, atol=1e-4, rtol=0)
    assert await engine.score([], []) == []


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "prompt, n, params",
    [
        ([], 1, SamplingParams()),
        ([5, VOCAB], 1, SamplingParams()),
        ([5, -1], 1, SamplingParams()),
        ([5] * CONTEXT, 1, SamplingParams()),
        ([5, 6], 0, SamplingParams()),
        ([5, 6], 1000, SamplingParams()),
        ([5, 6], 1, SamplingParams(stop_token_ids=[VOCAB + 3])),
        ([[5, 6]], 1, SamplingParams()),
    ],
)
async def test_invalid_generate_requests(engine, prompt, n, params):
    with pytest.raises(InvalidRequest):
        await engine.generate(prompt, n, params)


@pytest.mark.parametrize(
    "seqs, offsets",
    [([[5, 6, 7]], [0]), ([[5, 6, 7]], [4]), ([[5, 6, 7]], [1, 2]), ([[]], [1]), ([[5, VOCAB]], [1])],
)
async def test_invalid_score_requests(engine, seqs, offsets):
    with pytest.raises(InvalidRequest):
        await engine.score(seqs, offsets)


# ---------------------------------------------------------------------------- control
async def test_pause_holds_new_requests_until_resume(engine):
    await engine.pause()
    try:
        task = asyncio.create_task(engine.generate([5, 6, 7], 1, SamplingParams(max_new_tokens=3)))
        for _ in range(1000):
            h = await engine.health()
            if h["queued_generate"]:
                break
            await asyncio.sleep(0.005)
        assert h["paused"] and h["queued_generate"] == 1 and h["running_rows"] == 0
        assert not task.done()
    finally:
        await engine.resume()
    outs = await task
    assert len(outs[0].token_ids) == 3


async def test_cancelled_request_stops_computing(engine):
    hold = HoldDecode(engine)
    try:
        task = asyncio.create_task(engine.generate([5, 6, 7], 4, SamplingParams(max_new_tokens=100)))
        await hold.wait_entered()
        assert (await engine.health())["running_rows"] == 4
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        hold.done()
    # the worker drops the cancelled rows at its next step; then it is idle again
    for _ in range(5000):
        if (await engine.health())["running_rows"] == 0:
            break
        await asyncio.sleep(0.002)
    assert (await engine.health())["running_rows"] == 0
    assert len((await engine.generate([5], 1, SamplingParams(max_new_tokens=2)))[0].token_ids) == 2


async def test_closed_engine_refuses(word_model_dir):
    eng = CpuEngine(word_model_dir, num_threads=1)
    await eng.close()
    with pytest.raises(EngineClosed):
        await eng.generate([5, 6], 1, SamplingParams(max_new_tokens=2))
    assert (await eng.health())["ok"] is False

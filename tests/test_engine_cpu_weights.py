"""CPU engine weight updates: verified swaps, refusals that keep the old weights serving, and
responses that never mix two weight versions."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest
import torch
from support.engine_hold import HoldDecode
from transformers import AutoModelForCausalLM, Qwen3Config

from protocol.messages import SamplingParams, WeightUpdate
from protocol.weights import save_weights_dir
from services.engines.base import WeightUpdateError
from services.engines.cpu import CpuEngine

VOCAB = 80  # no EOS in the config: generations run to max_new_tokens unless given stop ids


def _config() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=300,
        eos_token_id=None, pad_token_id=0, tie_word_embeddings=True, initializer_range=0.25,
    )


def _model(seed: int):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_config()).eval()


@pytest.fixture(scope="module")
def word_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("w_model")
    _model(0).save_pretrained(str(d))
    return d


@pytest.fixture
async def engine(word_model_dir):
    eng = CpuEngine(word_model_dir, num_threads=1)
    yield eng
    await eng.close()


SEQS = [[3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 13], [20, 21, 22, 23, 24, 25]]
OFFS = [2, 1, 3]


@torch.no_grad()
def _ref_scores(model) -> list[np.ndarray]:
    out = []
    for s, o in zip(SEQS, OFFS, strict=True):
        lsm = torch.log_softmax(model(torch.tensor([s])).logits[0].float(), -1)
        out.append(lsm[torch.arange(o - 1, len(s) - 1), torch.tensor(s[o:])].numpy())
    return out


def _close(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.allclose(x, y, atol=1e-4) for x, y in zip(a, b, strict=True))


def _save(tmp_path, name: str, model, version: int) -> tuple[str, str]:
    d = tmp_path / name
    return str(d), save_weights_dir(model.state_dict(), d, version=version)


async def test_update_swaps_weights_and_version(engine, tmp_path):
    old, new = _model(0), _model(1)
    assert _close(await engine.score(SEQS, OFFS), _ref_scores(old))
    loc, digest = _save(tmp_path, "v5", new, 5)
    assert await engine.update_weights(WeightUpdate(run_id="r", version=5, location=loc, sha256=digest)) == 5
    assert engine.version == 5 and (await engine.health())["version"] == 5
    got = await engine.score(SEQS, OFFS)
    assert _close(got, _ref_scores(new)) and not _close(got, _ref_scores(old))
    outs = await engine.generate([3, 4], 2, SamplingParams(max_new_tokens=3))
    assert all(o.weight_version == 5 for o in outs)


def _bad_update(kind: str, tmp_path) -> WeightUpdate:
    new = _model(2)
    if kind == "wrong_hash":
        loc, _ = _save(tmp_path, "w", new, 1)
        return WeightUpdate(run_id="r", version=1, location=loc, sha256="ab" * 32)
    if kind == "missing_file":
        loc, digest = _save(tmp_path, "w", new, 1)
        (tmp_path / "w" / "model.safetensors").unlink()
        return WeightUpdate(run_id="r", version=1, location=loc, sha256=digest)
    if kind == "missing_dir":
        return WeightUpdate(run_id="r", version=1, location=str(tmp_path / "nowhere"))
    sd = {k: v.clone() for k, v in new.state_dict().items()}
    if kind == "wrong_shape":
        sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(65, 32)
    elif kind == "unknown_name":
        sd["model.layers.7.extra.weight"] = torch.zeros(2)
    elif kind == "missing_tensor":
        del sd["model.layers.0.self_attn.q_proj.weight"]
    elif kind == "not_a_weight_dir":
        shutil.copytree(_save(tmp_path, "src", new, 1)[0], tmp_path / "w")
        (tmp_path / "w" / "manifest.json").unlink()
        return WeightUpdate(run_id="r", version=1, location=str(tmp_path / "w"))
    loc, digest = str(tmp_path / "w"), save_weights_dir(sd, tmp_path / "w", version=1)
    return WeightUpdate(run_id="r", version=1, location=loc, sha256=digest)


@pytest.mark.parametrize(
    "kind",
    ["wrong_hash", "missing_file", "missing_dir", "wrong_shape", "unknown_name", "missing_tensor",
     "not_a_weight_dir"],
)
async def test_refused_update_keeps_old_weights(engine, tmp_path, kind):
    before = await engine.score(SEQS, OFFS)
    with pytest.raises(WeightUpdateError):
        await engine.update_weights(_bad_update(kind, tmp_path))
    assert engine.version == 0
    assert _close(await engine.score(SEQS, OFFS), before)
    assert _close(before, _ref_scores(_model(0)))


async def test_nccl_refused_on_cpu(engine):
    with pytest.raises(WeightUpdateError, match="nccl"):
        await engine.update_weights(WeightUpdate(run_id="r", version=1, format="nccl", location="h:1"))
    assert engine.version == 0


async def test_tied_alias_only_checkpoint_loads(engine, tmp_path):
    """A checkpoint that stores a tied weight under one name only (as save_pretrained does)."""
    new = _model(3)
    sd = {k: v for k, v in new.state_dict().items() if k != "lm_head.weight"}
    digest = save_weights_dir(sd, tmp_path / "w", version=2)
    await engine.update_weights(WeightUpdate(run_id="r", version=2, location=str(tmp_path / "w"), sha256=digest))
    assert _close(await engine.score(SEQS, OFFS), _ref_scores(new))


async def test_in_flight_responses_finish_on_the_old_version(engine, tmp_path):
    """A swap waits for running rows to drain: the long response is entirely version 0, the
    request made after the update entirely version 1."""
    old = _model(0)
    loc, digest = _save(tmp_path, "v1", _model(4), 1)
    hold = HoldDecode(engine)
    try:
        long = asyncio.create_task(engine.generate([3, 4, 5], 2, SamplingParams(max_new_tokens=250)))
        await hold.wait_entered()
        update = asyncio.create_task(
            engine.update_weights(WeightUpdate(run_id="r", version=1, location=loc, sha256=digest))
        )
        # the verified update is queued behind the running rows instead of swapping under them
        for _ in range(5000):
            h = await engine.health()
            if h["pending_weight_updates"] or update.done():
                break
            await asyncio.sleep(0.002)
        assert h["pending_weight_updates"] == 1 and h["running_rows"] == 2 and engine.version == 0
    finally:
        hold.done()
    outs = await long
    assert await update == 1
    for o in outs:
        assert o.weight_version == 0
        # log-probs of the whole response are those of the old model (raw mode not needed:
        # temperature 1 without filtering makes processed == raw)
        with torch.no_grad():
            seq = [3, 4, 5] + o.token_ids.tolist()
            lsm = torch.log_softmax(old(torch.tensor([seq])).logits[0].float(), -1)
        ref = lsm[torch.arange(2, len(seq) - 1), torch.tensor(seq[3:])].numpy()
        np.testing.assert_allclose(o.logprobs, ref, atol=1e-4)
    after = await engine.generate([3, 4, 5], 1, SamplingParams(max_new_tokens=4))
    assert after[0].weight_version == 1

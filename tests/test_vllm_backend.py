"""VLLMEngine against the fake vLLM server (real uvicorn, real tiny model)."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
from support.fake_engines import Fake
from support.reference_logprobs import reference_model, token_logprobs
from support.tiny_model import CONTEXT_LEN

from protocol.messages import SamplingParams, WeightUpdate
from protocol.weights import plan_buckets
from services.engines.base import InvalidRequest, UpstreamError, WeightUpdateError
from services.engines.config import EngineConfig
from services.engines.factory import make_engine
from services.engines.vllm import VLLMEngine

SEQS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]
OFFSETS = [3, 1, 4]


async def engine_for(fake: Fake, model_dir, **kw) -> VLLMEngine:  # noqa: ANN001
    return await make_engine(EngineConfig(kind="vllm", url=fake.url, model_path=str(model_dir), **kw))  # type: ignore[return-value]


def disk_update(w) -> WeightUpdate:  # noqa: ANN001
    return WeightUpdate(run_id="t", version=w.version, location=w.path, sha256=w.sha256)


def nccl_update(version: int, model_dir) -> WeightUpdate:  # noqa: ANN001
    params = [(n, "bfloat16", list(p.shape)) for n, p in reference_model(str(model_dir)).state_dict().items()]
    buckets = plan_buckets(params, 8_000)
    return WeightUpdate(run_id="t", version=version, format="nccl", location="10.0.0.5:29600",
                        meta={"nccl": {"world_size": 2, "buckets": [b.model_dump() for b in buckets]}})


def check_scores(out: list[np.ndarray], model_path: str) -> None:
    for seq, off, got in zip(SEQS, OFFSETS, out, strict=True):
        assert got.dtype == np.float32 and len(got) == len(seq) - off
        np.testing.assert_allclose(got, token_logprobs(model_path, seq)[off - 1:], atol=1e-4)


async def test_score_given_continuations(fake_vllm: Fake, model_dir) -> None:
    eng = await engine_for(fake_vllm, model_dir)
    try:
        check_scores(await eng.score(SEQS, OFFSETS), str(model_dir))
    finally:
        await eng.close()
    (call,) = fake_vllm.calls("/v1/completions")
    body = call["body"]
    assert body["prompt"] == SEQS and body["max_tokens"] == 1 and body["prompt_logprobs"] == 0
    assert body["model"] == "fake-vllm"  # learnt from /v1/models


async def test_token_budget_splits_batches(fake_vllm: Fake, model_dir) -> None:
    eng = await engine_for(fake_vllm, model_dir, max_tokens_per_request=8)
    try:
        check_scores(await eng.score(SEQS, OFFSETS), str(model_dir))
    finally:
        await eng.close()
    sent = [c["body"]["prompt"] for c in fake_vllm.calls("/v1/completions")]
    assert sent == [[SEQS[0]], [SEQS[1], SEQS[2]]]


async def test_nan_becomes_minus_inf(fake_vllm: Fake, model_dir) -> None:
    eng = await engine_for(fake_vllm, model_dir)
    try:
        fake_vllm.config(nan_positions=[4])
        (got,) = await eng.score([SEQS[0]], [3])
    finally:
        await eng.close()
    assert got[1] == -math.inf  # position 4 = index 1 after offset 3
    assert np.isfinite(np.delete(got, 1)).all()


def test_fake_follows_vllm_limits(fake_vllm: Fake) -> None:
    url = f"{fake_vllm.url}/v1/completions"
    r = httpx.post(url, json={"prompt": SEQS[0], "max_tokens": 1, "prompt_logprobs": 21})
    assert r.status_code == 400 and "max allowed" in r.json()["error"]["message"]
    r = httpx.post(url, json={"prompt": SEQS[0], "max_tokens": 1, "prompt_logprobs": 1, "stream": True})
    assert r.status_code == 400
    r = httpx.post(url, json={"prompt": SEQS[0], "max_tokens": 1, "prompt_logprobs": 2})
    first, second = r.json()["choices"][0]["prompt_logprobs"][:2]
    assert first is None and str(SEQS[0][1]) in second and len(second) >= 2


async def test_bad_sequences(fake_vllm: Fake, model_dir) -> None:
    eng = await engine_for(fake_vllm, model_dir)
    try:
        assert eng.context_len == CONTEXT_LEN  # from /v1/models (and config.json)
        with pytest.raises(InvalidRequest, match="context window"):  # max_tokens=1 needs a slot
            await eng.score([[5] * CONTEXT_LEN], [1])
        with pytest.raises(InvalidRequest, match="outside the vocabulary"):
            await eng.score([[5, 99_999]], [1])
        with pytest.raises(InvalidRequest, match="empty"):
            await eng.score([[]], [1])
        with pytest.raises(InvalidRequest, match="response_offsets"):
            await eng.score([[5, 6]], [0])
        assert await eng.score([], []) == []
    finally:
        await eng.close()
    assert not fake_vllm.calls("/v1/completions")


async def test_server_side_errors(fake_vllm: Fake) -> None:
    # a wrong context_len setting: the server's own check answers (400 -> InvalidRequest)
    eng = await make_engine(EngineConfig(kind="vllm", url=fake_vllm.url, request_timeout_s=1.0,
                                         context_len=4096))
    try:
        with pytest.raises(InvalidRequest, match="maximum context length"):
            await eng.score([[5] * (CONTEXT_LEN + 1)], [1])
        for mode, match in [("refuse", "503"), ("malformed", "malformed JSON"), ("hang", "no answer")]:
            fake_vllm.config(mode=mode)
            with pytest.raises(UpstreamError, match=match):
                await eng.score(SEQS, OFFSETS)
        fake_vllm.config(mode="ok")
        assert len(await eng.score(SEQS, OFFSETS)) == 3
    finally:
        fake_vllm.config(mode="ok")
        await eng.close()


async def test_generate(fake_vllm: Fake, model_dir) -> None:
    eng = await engine_for(fake_vllm, model_dir)
    try:
        outs = await eng.generate([5, 6, 7], 3, SamplingParams(max_new_tokens=5, seed=11))
    finally:
        await eng.close()
    assert len(outs) == 3
    for o in outs:
        ref = token_logprobs(str(model_dir), [5, 6, 7] + o.token_ids.tolist())[2:]
        np.testing.assert_allclose(o.logprobs, ref, atol=1e-4)


async def test_disk_update_cycle(fake_vllm: Fake, model_dir, weights_v1) -> None:
    eng = await engine_for(fake_vllm, model_dir)
    try:
        assert await eng.update_weights(disk_update(weights_v1)) == 1
        check_scores(await eng.score(SEQS, OFFSETS), weights_v1.path)
    finally:
        await eng.close()
    paths = [c["path"] for c in fake_vllm.calls() if c["path"] not in ("/v1/completions",)]
    i = paths.index("/pause")
    assert paths[i:i + 5] == ["/pause", "/collective_rpc", "/update_weight_version",
                              "/reset_prefix_cache", "/resume"]
    assert fake_vllm.calls("/pause")[0]["query"] == {"mode": "wait"}
    assert fake_vllm.calls("/collective_rpc")[0]["body"]["kwargs"] == {"weights_path": weights_v1.path}
    assert fake_vllm.server.weight_version == "1"


async def test_partial_reload_rolls_back(fake_vllm: Fake, model_dir, weights_v1, weights_v2) -> None:
    eng = await engine_for(fake_vllm, model_dir)
    try:
        await eng.update_weights(disk_update(weights_v1))
        fake_vllm.config(fail_weight_load=1)  # reload dies half-way through v2 (only that one)
        with pytest.raises(WeightUpdateError, match="rolled back to version 1"):
            await eng.update_weights(disk_update(weights_v2))
        assert eng.version == 1 and eng.consistent
        check_scores(await eng.score(SEQS, OFFSETS), weights_v1.path)  # exactly v1 again
    finally:
        await eng.close()


async def test_partial_reload_without_rollback_quarantines(fake_vllm: Fake, model_dir,
                                                           weights_v1) -> None:
    eng = await engine_for(fake_vllm, model_dir, quarantine_wait_s=0.2)
    try:
        fake_vllm.config(fail_weight_load=True)
        with pytest.raises(WeightUpdateError, match="refuses requests"):
            await eng.update_weights(disk_update(weights_v1))
        with pytest.raises(UpstreamError, match="inconsistent"):
            await eng.score(SEQS, OFFSETS)
        assert (await eng.health())["ok"] is False
        fake_vllm.config(fail_weight_load=False)
        await eng.update_weights(disk_update(weights_v1))
        check_scores(await eng.score(SEQS, OFFSETS), weights_v1.path)
    finally:
        await eng.close()


async def test_nccl_update_http_sequence(fake_vllm: Fake, model_dir) -> None:
    eng = await engine_for(fake_vllm, model_dir)
    upd = nccl_update(4, model_dir)
    n = len(upd.meta["nccl"]["buckets"])
    try:
        assert await eng.update_weights(upd) == 4
        fake_vllm.config(fail_bucket_at=n + 1)  # second bucket of the next update
        with pytest.raises(WeightUpdateError):
            await eng.update_weights(nccl_update(5, model_dir))
        fake_vllm.config(fail_bucket_at=None)
        # the failed update was closed (finish without version): vLLM accepts a new start
        assert await eng.update_weights(nccl_update(6, model_dir)) == 6
    finally:
        await eng.close()
    paths = [c["path"] for c in fake_vllm.calls()]
    i = paths.index("/pause")
    assert paths[i:i + n + 7] == (["/pause", "/shutdown_weight_transfer_engine",
                                   "/init_weight_transfer_engine", "/start_weight_update"]
                                      + ["/update_weights"] * n
                                      + ["/finish_weight_update", "/reset_prefix_cache", "/resume"])
    init = fake_vllm.calls("/init_weight_transfer_engine")[0]["body"]
    # `packed` travels in init_info (a group parameter in vLLM), never in update_info
    assert init == {"init_info": {"master_address": "10.0.0.5", "master_port": 29600,
                                  "rank_offset": 1, "world_size": 2, "packed": False}}
    first = fake_vllm.calls("/update_weights")[0]["body"]["update_info"]
    assert first == {k2: upd.meta["nccl"]["buckets"][0][k1]
                     for k1, k2 in [("names", "names"), ("dtypes", "dtype_names"), ("shapes", "shapes")]}
    finishes = [c["body"] for c in fake_vllm.calls("/finish_weight_update")]
    assert finishes == [{"weight_version": "4"}, {}, {"weight_version": "6"}]
    assert fake_vllm.server.weight_version == "6"


async def test_server_restart_is_detected_by_health(fake_vllm: Fake, model_dir, weights_v1) -> None:
    eng = await engine_for(fake_vllm, model_dir, quarantine_wait_s=0.2)
    try:
        await eng.update_weights(disk_update(weights_v1))
        assert (await eng.health())["ok"]
        httpx.post(f"{fake_vllm.url}/update_weight_version", json={"new_version": "0"})
        health = await eng.health()
        assert not health["ok"] and "restarted" in health["last_error"]
        with pytest.raises(UpstreamError, match="inconsistent"):
            await eng.score(SEQS, OFFSETS)
    finally:
        await eng.close()

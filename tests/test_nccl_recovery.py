"""The recovery paths of NCCL weight updates that a cluster exercises (issue 20): a leftover
vLLM update session cleared, every re-initialisation destroying the previous communicator on
both sides, the server's world size authoritative over the config, pipeline parallelism on
SGLang refused, and PyNccl's broadcast bounded by a watchdog that aborts the communicator.
Service side against the fake servers (tests/support/fake_vllm.py reproduces vLLM 0.32's
session refusals); trainer side against stand-ins of the service and of PyNccl."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest
import torch
from fastapi import FastAPI
from support.fake_engines import Fake
from support.reference_logprobs import reference_model
from support.trainer_standin import serve

from protocol.messages import WeightUpdate
from protocol.weights import plan_buckets
from services.engines.config import EngineConfig
from services.engines.factory import make_engine
from services.engines.remote import UpdateRefused
from trainer.config import NcclPush, ServiceEndpoint
from trainer.dist import free_port
from trainer.transports.base import PushResult
from trainer.transports.nccl import Peer, destroy_group, push_buckets, run_with_watchdog


def nccl_update(version: int, model_dir, *, port: int = 29600, init: bool = True) -> WeightUpdate:  # noqa: ANN001
    params = [(n, "bfloat16", list(p.shape))
              for n, p in reference_model(str(model_dir)).state_dict().items()]
    buckets = plan_buckets(params, 8_000)
    return WeightUpdate(run_id="t", version=version, format="nccl", location=f"10.0.0.5:{port}",
                        meta={"nccl": {"world_size": 2, "init_group": init,
                                       "buckets": [b.model_dump() for b in buckets]}})


async def _engine(fake: Fake, model_dir, kind: str):  # noqa: ANN001, ANN202
    return await make_engine(EngineConfig(kind=kind, url=fake.url, model_path=str(model_dir)))


# ---------------------------------------------------------------------- service side: vLLM
def test_fake_refuses_a_second_start_as_vllm_does(fake_vllm: Fake) -> None:
    """vLLM 0.32's worker: RuntimeError, answered 500 by the API server with its text."""
    httpx.post(f"{fake_vllm.url}/init_weight_transfer_engine", json={"init_info": {
        "master_address": "h", "master_port": 1, "rank_offset": 1, "world_size": 2}})
    assert httpx.post(f"{fake_vllm.url}/start_weight_update", json={}).status_code == 200
    r = httpx.post(f"{fake_vllm.url}/start_weight_update", json={})
    assert r.status_code == 500
    assert r.json()["error"]["message"] == (
        "Call to collective_rpc method failed: start_weight_update called while a weight "
        "update is already active. Call finish_weight_update first.")
    r = httpx.post(f"{fake_vllm.url}/shutdown_weight_transfer_engine", json={})
    assert r.status_code == 500 and "during a weight update" in r.json()["error"]["message"]


async def test_a_leftover_vllm_session_is_finished_and_the_update_goes_through(
        fake_vllm: Fake, model_dir) -> None:
    eng = await _engine(fake_vllm, model_dir, "vllm")
    try:
        assert await eng.update_weights(nccl_update(1, model_dir)) == 1
        # the service dies between start and finish; its successor knows no group or session
        httpx.post(f"{fake_vllm.url}/start_weight_update", json={}).raise_for_status()
    finally:
        await eng.close()
    eng = await _engine(fake_vllm, model_dir, "vllm")
    try:
        n0 = len(fake_vllm.calls())
        assert await eng.update_weights(nccl_update(2, model_dir, port=29601)) == 2
        # ... and the same once the group is kept: start refused, finished, started again
        httpx.post(f"{fake_vllm.url}/start_weight_update", json={}).raise_for_status()
        n1 = len(fake_vllm.calls())
        assert await eng.update_weights(nccl_update(3, model_dir, port=29601, init=False)) == 3
    finally:
        await eng.close()
    assert not fake_vllm.server.updating and fake_vllm.server.weight_version == "3"
    paths = [c["path"] for c in fake_vllm.calls()]
    first, second = paths[n0:], paths[n1 + 1:]  # +1: the test's own start
    i = first.index("/shutdown_weight_transfer_engine")
    assert first[i:i + 5] == ["/shutdown_weight_transfer_engine",  # refused: session open
                              "/finish_weight_update", "/shutdown_weight_transfer_engine",
                              "/init_weight_transfer_engine", "/start_weight_update"]
    i = second.index("/start_weight_update")
    assert second[i:i + 4] == ["/start_weight_update", "/finish_weight_update",
                               "/start_weight_update", "/update_weights"]
    assert "/init_weight_transfer_engine" not in second
    # the leftover sessions were closed without a version (only ours set one)
    finishes = [c["body"] for c in fake_vllm.calls("/finish_weight_update")]
    assert finishes == [{"weight_version": "1"}, {}, {"weight_version": "2"}, {},
                        {"weight_version": "3"}]


async def test_every_vllm_reinit_destroys_the_previous_communicator(fake_vllm: Fake,
                                                                     model_dir) -> None:
    eng = await _engine(fake_vllm, model_dir, "vllm")
    try:
        for v, port in ((1, 29600), (2, 29601), (3, 29602)):  # a new group each time
            assert await eng.update_weights(nccl_update(v, model_dir, port=port)) == v
        n = len(nccl_update(1, model_dir).meta["nccl"]["buckets"])
        fake_vllm.config(fail_bucket_at=3 * n)  # a failed bucket drops the group: re-init
        with pytest.raises(Exception, match="injected"):
            await eng.update_weights(nccl_update(4, model_dir, port=29602, init=False))
        fake_vllm.config(fail_bucket_at=None)
        assert await eng.update_weights(nccl_update(5, model_dir, port=29603)) == 5
    finally:
        await eng.close()
    paths = [c["path"] for c in fake_vllm.calls()]
    inits = [i for i, p in enumerate(paths) if p == "/init_weight_transfer_engine"]
    assert len(inits) == 4
    assert all(paths[i - 1] == "/shutdown_weight_transfer_engine" for i in inits)
    assert fake_vllm.server.leaked_groups == 0


# ---------------------------------------------------------------------- service side: SGLang
async def test_sglang_reinit_destroys_the_group_first(fake_sglang: Fake, model_dir) -> None:
    eng = await _engine(fake_sglang, model_dir, "sglang")
    try:
        for v, port in ((1, 29600), (2, 29601)):
            assert await eng.update_weights(nccl_update(v, model_dir, port=port)) == v
    finally:
        await eng.close()
    paths = [c["path"] for c in fake_sglang.calls()]
    inits = [i for i, p in enumerate(paths) if p == "/init_weights_update_group"]
    assert len(inits) == 2
    assert all(paths[i - 1] == "/destroy_weights_update_group" for i in inits)
    assert len(fake_sglang.server.groups) == 1


async def test_sglang_pipeline_parallel_is_refused_before_anything(fake_sglang: Fake,
                                                                   model_dir) -> None:
    fake_sglang.server.tp_size, fake_sglang.server.pp_size = 2, 2
    eng = await _engine(fake_sglang, model_dir, "sglang")
    try:
        health = await eng.health()
        # SGLang ranks the group's GPUs rank_offset + tp_rank: the TP size, not TP x PP
        assert (health["engine_world_size"], health["pp_size"]) == (2, 2)
        assert health["engine_world_size_from"] == "server"
        n = len(fake_sglang.calls())
        with pytest.raises(UpdateRefused, match="pp_size=2"):
            await eng.update_weights(nccl_update(1, model_dir))
    finally:
        await eng.close()
    assert not [c for c in fake_sglang.calls()[n:] if c["path"] != "/model_info"]


async def test_vllm_reports_its_world_size_as_the_servers(fake_vllm: Fake, model_dir) -> None:
    fake_vllm.server.world_size = 4
    eng = await _engine(fake_vllm, model_dir, "vllm")
    try:
        health = await eng.health()
        assert (health["engine_world_size"], health["engine_world_size_from"]) == (4, "server")
    finally:
        await eng.close()


# ---------------------------------------------------------------------- trainer side
def _service(engine: dict) -> FastAPI:
    """A service's GET /v1/version reporting `engine`; POST /v1/weights must not be reached."""
    app = FastAPI()
    app.state.posts = 0

    @app.get("/v1/version")
    def version() -> dict:
        return {"version": 0, "engine": engine}

    @app.post("/v1/weights")
    def weights() -> dict:
        app.state.posts += 1
        return {"version": 1}

    return app


def test_a_configured_world_size_that_disagrees_with_the_server_is_a_config_error() -> None:
    app = _service({"engine_world_size": 2, "engine_world_size_from": "server"})
    with serve(app) as url:
        svc = ServiceEndpoint(name="teacher", url=url, engine="vllm", engine_world_size=3)
        push = NcclPush(nccl_backend="gloo", nccl_timeout_s=60, services=[svc])
        peer = Peer(svc, push, free_port())
        with pytest.raises(ValueError, match=r"config error.*engine_world_size is 3.*has 2 GPU"):
            peer.prepare()
        # within a push: reported at once, no update sent, no rendezvous waited for
        res = PushResult(version=1)
        t0 = time.monotonic()
        push_buckets([peer], 1, [], iter([]), res, run_id="t", timeout_s=60)
        assert "config error" in res.failed["teacher"] and time.monotonic() - t0 < 10
        assert app.state.posts == 0
        # the server's word is used when nothing is configured, or when it agrees
        for configured in (None, 2):
            p = Peer(svc.model_copy(update={"engine_world_size": configured}), push, free_port())
            p.prepare()
            assert p.world_size == 3
    # a service that only has the config's value: the trainer's configured value stands
    with serve(_service({"engine_world_size": 1, "engine_world_size_from": "config"})) as url:
        p = Peer(svc.model_copy(update={"url": url}), push, free_port())
        p.prepare()
        assert p.world_size == 4


def test_sglang_pipeline_parallel_is_refused_by_the_trainer() -> None:
    app = _service({"engine_world_size": 2, "engine_world_size_from": "server", "pp_size": 2})
    with serve(app) as url:
        svc = ServiceEndpoint(name="rollout", url=url, engine="sglang")
        with pytest.raises(RuntimeError, match="pp_size=2.*push.mode: disk"):
            Peer(svc, NcclPush(services=[svc]), free_port()).prepare()


class _StuckPyNccl:
    """Stands in for vLLM's PyNcclCommunicator whose peer is gone: `broadcast` blocks until
    `destroy()` (ncclCommAbort) ends it with an error, as NCCL does to pending operations."""

    def __init__(self) -> None:
        self.aborted = threading.Event()
        self.destroys = 0
        self.sent = 0

    def broadcast(self, t: torch.Tensor, src: int, stream: object = None) -> None:
        if self.sent >= 1:  # the first tensor goes through, then the peer is gone
            if not self.aborted.wait(30):
                raise AssertionError("never aborted")
            raise RuntimeError("NCCL error: remote process exited or there was a network error")
        self.sent += 1

    def destroy(self) -> None:
        self.destroys += 1
        self.aborted.set()


def test_a_stuck_pynccl_broadcast_is_aborted_by_the_watchdog() -> None:
    svc = ServiceEndpoint(name="teacher", url="http://127.0.0.1:9", engine="vllm")
    peer = Peer(svc, NcclPush(nccl_timeout_s=0.5, services=[svc]), free_port())
    peer.group = comm = _StuckPyNccl()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="PyNccl broadcast: aborted after"):
        peer.send([("a", torch.zeros(3)), ("b", torch.zeros(3))])
    assert 0.4 < time.monotonic() - t0 < 10 and comm.destroys == 1
    peer.reset()  # the failed group is dropped and destroyed (a second destroy is harmless)
    assert peer.group is None and comm.destroys == 2


def test_watchdog_leaves_work_that_finishes_in_time_alone() -> None:
    aborts: list[int] = []
    run_with_watchdog(lambda: None, lambda: aborts.append(1), 5, "quick")
    with pytest.raises(KeyError):  # the work's own error, not a timeout
        run_with_watchdog(lambda: {}["x"], lambda: aborts.append(1), 5, "failing")
    assert aborts == []


def test_dropping_a_pynccl_group_destroys_it() -> None:
    comm = _StuckPyNccl()
    destroy_group(comm)
    assert comm.destroys == 1
    svc = ServiceEndpoint(name="teacher", url="http://x", engine="vllm")
    peer = Peer(svc, NcclPush(services=[svc]), free_port())
    peer.group = comm
    peer.reset()
    assert comm.destroys == 2 and peer.group is None
    # a re-initialisation (the service reports another group, e.g. it restarted) destroys
    # the old communicator before the new rendezvous
    with serve(_service({"engine_world_size": 1, "engine_world_size_from": "server",
                         "nccl_group": "another"})) as url:
        peer = Peer(svc.model_copy(update={"url": url}), NcclPush(services=[svc]), free_port())
        peer.group = comm = _StuckPyNccl()
        assert peer.prepare() is True
        assert comm.destroys == 1 and peer.group is None



# ---------------------------------------------------------------------- contract (released vLLM)
def test_recovery_relies_on_vllms_own_routes_and_refusal_texts() -> None:
    """The routes the vLLM client posts (all of them, the recovery ones included) are POST
    routes of the released vLLM's RL router; the refusal texts it matches, and the fake
    answers, are the released worker's (`v1/worker/gpu_worker.py`)."""
    import ast
    from pathlib import Path

    from support import fake_vllm, upstream

    from services.engines import vllm as client

    table = upstream.routes(upstream.source("vllm", "entrypoints/rl/online/api_router.py"))
    tree = upstream.parse(Path(client.__file__))
    posted = {n.args[0].value for n in ast.walk(tree)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and n.func.attr == "post" and n.args and isinstance(n.args[0], ast.Constant)}
    rl = {r for r in posted if r in table or "weight" in r}
    assert {"/shutdown_weight_transfer_engine", "/start_weight_update",
            "/finish_weight_update"} <= rl
    for route in rl:
        assert "POST" in table.get(route, set()), f"vllm {upstream.version('vllm')}: no POST {route}"
    worker = upstream.source("vllm", "v1/worker/gpu_worker.py").read_text()
    joined = " ".join(worker.split())  # the texts are split over string literals
    for text in (client.SESSION_ACTIVE, client.SHUTDOWN_REFUSED,
                 "finish_weight_update called without a matching start_weight_update."):
        flat = text.replace('"', "")
        assert flat in joined.replace('" "', ""), f"vllm's worker no longer says {text!r}"
    fake = Path(fake_vllm.__file__).read_text()
    assert client.SESSION_ACTIVE.split(" already")[0] in fake and client.SHUTDOWN_REFUSED in fake


# ---------------------------------------------------------------------- one NCCL per group
async def test_the_vllm_service_reports_its_servers_nccl(fake_vllm: Fake, model_dir) -> None:
    eng = await _engine(fake_vllm, model_dir, "vllm")
    try:
        assert (await eng.health())["nccl_version"] == "2.29.7"  # torch's nvidia-nccl wheel
    finally:
        await eng.close()
    # PyNccl pointed at another library: the package list no longer says which NCCL runs
    fake_vllm.server.vllm_env = {"VLLM_NCCL_SO_PATH": "/opt/nccl/libnccl.so.2"}
    eng = await _engine(fake_vllm, model_dir, "vllm")
    try:
        assert (await eng.health())["nccl_version"] is None
    finally:
        await eng.close()


async def test_the_sglang_service_reports_the_nccl_its_supervisor_read(fake_sglang, model_dir,
                                                                        monkeypatch) -> None:
    """SGLang's server does not say which NCCL it runs; rlrt-with-engine reads it from the
    engine's environment and the service reports it, so the mismatch check below applies to
    the SGLang group too (deploy/docker/with_engine.py)."""
    from services.engines.nccl_sync import ENGINE_NCCL_ENV

    monkeypatch.setenv(ENGINE_NCCL_ENV, "2.30.7")
    eng = await _engine(fake_sglang, model_dir, "sglang")
    try:
        assert (await eng.health())["nccl_version"] == "2.30.7"
    finally:
        await eng.close()
    monkeypatch.delenv(ENGINE_NCCL_ENV)
    eng = await _engine(fake_sglang, model_dir, "sglang")
    try:
        assert (await eng.health())["nccl_version"] is None  # unknown: only the contract test
    finally:
        await eng.close()


def test_an_nccl_version_mismatch_is_one_clear_error_before_the_rendezvous(monkeypatch) -> None:
    from trainer.transports import nccl

    app = _service({"engine_world_size": 1, "engine_world_size_from": "server",
                    "nccl_version": "2.30.7"})
    with serve(app) as url:
        svc = ServiceEndpoint(name="teacher", url=url, engine="vllm")
        push = NcclPush(nccl_backend="nccl", nccl_timeout_s=60, services=[svc])
        monkeypatch.setattr(nccl, "local_nccl_version", lambda engine: "2.29.7")
        peer = Peer(svc, push, free_port())
        with pytest.raises(RuntimeError, match=r"trainer runs NCCL 2\.29\.7, the teacher engine "
                                               r"NCCL 2\.30\.7.*VLLM_NCCL_SO_PATH.*push.mode: disk"):
            peer.prepare()
        res = PushResult(version=1)
        push_buckets([peer], 1, [], iter([]), res, run_id="t", timeout_s=60)
        assert "NCCL version mismatch" in res.failed["teacher"] and app.state.posts == 0
        # the same version, or a side that does not know its own: the group may form
        monkeypatch.setattr(nccl, "local_nccl_version", lambda engine: "2.30.7")
        assert Peer(svc, push, free_port()).prepare() is True
        monkeypatch.setattr(nccl, "local_nccl_version", lambda engine: None)
        assert Peer(svc, push, free_port()).prepare() is True


def test_vllms_server_info_lists_its_packages_as_the_client_reads_them() -> None:
    from support import upstream

    router = upstream.source("vllm", "entrypoints/serve/dev/server_info/api_router.py")
    assert "GET" in upstream.routes(router).get("/server_info", set())
    text = router.read_text()
    assert '"vllm_env"' in text and '"system_env"' in text and "_asdict()" in text
    env = upstream.source("vllm", "collect_env.py").read_text()
    # SystemEnv has pip_packages, filled from `pip list --format=freeze` lines matching "nccl"
    assert '"pip_packages"' in env and '"--format=freeze"' in env
    assert re.search(r'DEFAULT_PIP_PATTERNS = \{[^}]*"nccl"', env)


def test_sglang_ranks_update_group_gpus_by_tp_rank_only() -> None:
    """Why pp_size > 1 is refused and the world size is TP: SGLang 0.5.23's own rank rule."""
    from support import upstream

    src = upstream.source(
        "sglang", "srt/model_executor/model_runner_components/weight_updater.py").read_text()
    assert "rank = rank_offset + self.tp_rank" in src

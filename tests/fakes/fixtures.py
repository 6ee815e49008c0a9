"""Pytest fixtures for engine tests; import the ones a test module uses (pytest finds
fixtures imported into the module)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .fake_sglang import FakeSGLang
from .fake_vllm import FakeVLLM
from .models import make_model_dir, make_weights_dir
from .serve import serve_app


@dataclass
class Weights:
    path: str
    sha256: str
    version: int


@dataclass
class Fake:
    """A running fake server: its URL, its object (for the model) and a client for /_fake."""

    url: str
    server: FakeSGLang | FakeVLLM

    def config(self, **knobs: object) -> None:
        httpx.post(f"{self.url}/_fake/config", json=knobs, timeout=10).raise_for_status()

    def calls(self, prefix: str = "/") -> list[dict]:
        out = httpx.get(f"{self.url}/_fake/calls", timeout=10).json()
        return [c for c in out if c["path"].startswith(prefix)]

    def paths(self) -> list[str]:
        return [c["path"] for c in self.calls() if c["path"] not in ("/health",)]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def weights_v1(tmp_path_factory: pytest.TempPathFactory) -> Weights:
    p = tmp_path_factory.mktemp("w") / "v1"
    return Weights(str(p), make_weights_dir(p, version=1, seed=1), 1)


@pytest.fixture(scope="session")
def weights_v2(tmp_path_factory: pytest.TempPathFactory) -> Weights:
    p = tmp_path_factory.mktemp("w") / "v2"
    return Weights(str(p), make_weights_dir(p, version=2, seed=2), 2)


@pytest.fixture
def fake_sglang(model_dir: Path) -> Iterator[Fake]:
    server = FakeSGLang(model_dir)
    with serve_app(server.app) as url:
        yield Fake(url, server)


@pytest.fixture
def fake_vllm(model_dir: Path) -> Iterator[Fake]:
    server = FakeVLLM(model_dir)
    with serve_app(server.app) as url:
        yield Fake(url, server)

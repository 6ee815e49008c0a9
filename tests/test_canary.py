"""The weight canary (protocol/canary.py) on the CPU: the comparison itself; the trainer's
canary (real DeepSpeed policy, ZeRO 0 and 3) is accepted by the real CPU engine and a wrong
one is refused with the old weights still serving; the service answers 409 with the verdict
and the trainer's push result reports it; the remote-engine transaction (fake vLLM/SGLang
servers backed by a real tiny model) accepts a right canary and rolls back on a wrong one.
The real vLLM server (tied embeddings) is tests/test_canary_vllm.py."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from support.canary_ref import reference_logprobs, shifted
from support.fake_engines import Fake, Weights
from support.serve import serve_app_here
from support.tiny_model import save_tiny_policy
from support.update_case import case_config
from transformers import AutoModelForCausalLM

from protocol.canary import Canary, canary_sequences, compare, tolerance_for
from protocol.messages import WeightUpdate
from protocol.weights import load_weights_dir, save_weights_dir
from services.engines.base import UpstreamError, WeightUpdateError
from services.engines.canary_check import CanaryMismatch
from services.engines.config import EngineConfig
from services.engines.control_api import EngineSlot
from services.engines.cpu import CpuEngine
from services.engines.factory import make_engine
from services.engines.service import build_service_app
from trainer import dist
from trainer.canary import canary_logprobs, fixed_sequences
from trainer.config import DiskPush, ServiceEndpoint
from trainer.model import build_policy, full_state_dict
from trainer.transports.disk import WeightPusher

TOKEN = "s3cret"


# ----------------------------------------------------------------------------- the comparison
def test_compare_finds_the_worst_token_and_judges_by_tolerance() -> None:
    c = Canary(sequences=[[1, 2, 3], [4, 5, 6, 7]], logprobs=[[-1.0, -2.0], [-0.5, -0.25, -3.0]])
    same = compare(c, c.logprobs, 1e-3)
    assert same.ok and same.max_diff == 0.0
    r = compare(c, [[-1.0, -2.0], [-0.5, -0.2, -3.0]], 1e-3)
    assert not r.ok and r.max_diff == pytest.approx(0.05) and (r.sequence, r.position) == (1, 1)
    assert "MISMATCH" in r.describe() and "0.05" in r.describe()
    assert compare(c, [[-1.0, -2.0005], [-0.5, -0.25, -3.0]], 1e-3).ok


def test_compare_treats_non_finite_values_strictly() -> None:
    c = Canary(sequences=[[1, 2, 3]], logprobs=[[-math.inf, -1.0]])
    assert compare(c, [[-math.inf, -1.0]], 1e-3).ok  # both -inf: the same
    assert compare(c, [[-5.0, -1.0]], 1e-3).max_diff == math.inf
    assert compare(c, [[-math.inf, math.nan]], 1e-3).max_diff == math.inf
    with pytest.raises(ValueError, match="2 served log-probs for 1|1 served log-probs for 2"):
        compare(c, [[-1.0]], 1e-3)


def test_tolerance_follows_the_coarsest_dtype() -> None:
    assert tolerance_for(["float32"]) == 1e-3
    assert tolerance_for(["float32", "bfloat16"]) == 1.0
    assert tolerance_for([None, None]) == 1e-3
    assert tolerance_for(["float16"], {"float16": 0.2}) == 0.2
    with pytest.raises(ValueError, match="no canary tolerance for dtype 'fp8'"):
        tolerance_for(["fp8"])


def test_a_malformed_canary_is_rejected_on_the_wire() -> None:
    with pytest.raises(ValidationError, match="want one fewer"):
        Canary(sequences=[[1, 2, 3]], logprobs=[[-1.0, -1.0, -1.0]])
    with pytest.raises(ValidationError, match="has 1 tokens"):
        Canary(sequences=[[1]], logprobs=[[]])
    with pytest.raises(ValidationError, match="2 log-prob rows for 1"):
        Canary(sequences=[[1, 2]], logprobs=[[-1.0], [-1.0]])
    u = WeightUpdate(run_id="r", version=1, location="/x",
                     canary=Canary(sequences=[[1, 2]], logprobs=[[-0.5]]))
    assert WeightUpdate.model_validate_json(u.model_dump_json()).canary == u.canary


def test_sequences_are_fixed_and_inside_the_vocabulary() -> None:
    a = canary_sequences(50, count=3, length=7)
    assert a == canary_sequences(50, count=3, length=7) and len(a) == 3
    assert all(len(s) == 7 and all(0 <= t < 50 for t in s) for s in a)


# ----------------------------------------------------------------------------- trainer + CPU engine
@pytest.fixture(scope="module")
def served_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)  # 2 shared cores: oversubscribed OpenMP is 10-50x slower
    return save_tiny_policy(tmp_path_factory.mktemp("served"), seed=0, tie=True)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    """Same architecture, other weights: what the trainer pushes as version 1."""
    return save_tiny_policy(tmp_path_factory.mktemp("trained"), seed=1, tie=True)


def trainer_push(trained_dir: Path, out: Path, stage: int) -> tuple[Canary, str]:
    """The trainer's half, as trainer/main.py does it: policy (DeepSpeed, a logprob temperature
    that is not 1), canary from its forward, weights gathered and written."""
    from transformers import AutoTokenizer

    rank, world = dist.setup("cpu", 120)
    cfg = case_config(trained_dir, zero_stage=stage, logprob_temperature=0.7)
    policy = build_policy(cfg, rank=rank, world_size=world, device="cpu")
    seqs = fixed_sequences(policy.hf_model, AutoTokenizer.from_pretrained(trained_dir), 3, 16)
    canary = Canary(sequences=seqs, logprobs=canary_logprobs(policy, seqs), dtype="float32")
    assert policy.engine.module.temperature == 0.7  # restored after the canary's forward
    sha = save_weights_dir(full_state_dict(policy), out, version=1)
    return canary, sha


@pytest.mark.parametrize("stage", [0, 3])
async def test_the_trainers_canary_is_accepted_and_a_wrong_one_refused(
        served_dir, trained_dir, tmp_path, stage) -> None:
    canary, sha = trainer_push(trained_dir, tmp_path / "v1", stage)
    # The trainer's numbers are plain transformers' at temperature 1 (not 0.7).
    ref = reference_logprobs(trained_dir, canary.sequences)
    np.testing.assert_allclose(np.concatenate(canary.logprobs), np.concatenate(ref), atol=1e-5)
    engine = CpuEngine(served_dir, num_threads=1)
    try:
        before = await engine.score(canary.sequences, [1] * len(canary.sequences))
        update = WeightUpdate(run_id="t", version=1, location=str(tmp_path / "v1"), sha256=sha)
        with pytest.raises(CanaryMismatch, match=r"max \|delta log-prob\| 0\.01.*tolerance 0\.001"):
            await engine.update_weights(update.model_copy(update={"canary": shifted(canary, 0.01)}))
        assert engine.version == 0  # swapped back: the old weights serve, bit for bit
        after = await engine.score(canary.sequences, [1] * len(canary.sequences))
        for a, b in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b)
        assert await engine.update_weights(update.model_copy(update={"canary": canary})) == 1
        now = await engine.score(canary.sequences, [1] * len(canary.sequences))
        np.testing.assert_allclose(np.concatenate(now), np.concatenate(canary.logprobs), atol=1e-5)
    finally:
        await engine.close()


async def test_a_canary_the_engine_cannot_score_is_refused_before_loading(served_dir, tmp_path):
    engine = CpuEngine(served_dir, num_threads=1)
    try:
        model = AutoModelForCausalLM.from_pretrained(served_dir)
        sha = save_weights_dir(model.state_dict(), tmp_path / "w", version=1)
        bad = Canary(sequences=[[1, engine.vocab_size]], logprobs=[[-1.0]])
        with pytest.raises(WeightUpdateError, match="outside the vocabulary"):
            await engine.update_weights(WeightUpdate(run_id="t", version=1, sha256=sha,
                                                     location=str(tmp_path / "w"), canary=bad))
        assert engine.version == 0
        # Without the check the same update goes through.
        engine.canary_check = False
        await engine.update_weights(WeightUpdate(run_id="t", version=1, sha256=sha,
                                                 location=str(tmp_path / "w"), canary=bad))
        assert engine.version == 1
    finally:
        await engine.close()


async def test_the_service_answers_409_and_the_push_result_reports_the_canary(
        served_dir, trained_dir, tmp_path) -> None:
    slot = EngineSlot()
    slot.set(await make_engine(EngineConfig(kind="cpu", model_path=str(served_dir),
                                            cpu={"num_threads": 1})))
    app = build_service_app("rollout", slot, None, token=TOKEN, max_body_bytes=1 << 20)
    model = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=torch.float32)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    seqs = canary_sequences(model.config.vocab_size, count=2, length=12)
    good = Canary(sequences=seqs, logprobs=reference_logprobs(trained_dir, seqs))
    try:
        async with serve_app_here(app) as url:
            cfg = DiskPush(services=[ServiceEndpoint(name="rollout", url=url)],
                             control_token=TOKEN, retry_backoff_s=0.05)
            pusher = WeightPusher(cfg, tmp_path / "weights", "run")
            res = await pusher.push(sd, 1, canary=shifted(good, -0.3, at=(0, 0)))
            assert res.ok == [] and list(res.failed) == ["rollout"]
            assert res.attempts["rollout"] == 1  # a refusal is not retried
            verdict = res.canary_refused["rollout"]
            assert verdict["max_diff"] == pytest.approx(0.3, abs=1e-4)
            assert verdict["tolerance"] == 1e-3 and verdict["consistent"] is True
            assert verdict["version"] == 0 and "weight canary MISMATCH" in res.failed["rollout"]
            async with httpx.AsyncClient(base_url=url) as c:
                metrics = (await c.get("/metrics")).text
                assert 'rlrt_engine_canary_checks_total{engine="cpu",result="mismatch"}' in metrics
                v = await c.get("/v1/version", headers={"Authorization": f"Bearer {TOKEN}"})
                assert v.json()["version"] == 0
            res = await pusher.push(sd, 2, canary=good)
            assert res.ok == ["rollout"] and not res.failed and not res.canary_refused
            assert slot.engine.version == 2  # type: ignore[union-attr]
    finally:
        await slot.engine.close()  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- remote engines
@pytest.mark.parametrize("kind", ["vllm", "sglang"])
async def test_remote_engine_checks_the_canary_and_rolls_back_on_a_mismatch(
        request, kind, model_dir, weights_v1: Weights, weights_v2: Weights) -> None:
    fake: Fake = request.getfixturevalue(f"fake_{kind}")
    engine = await make_engine(EngineConfig(kind=kind, url=fake.url, model_path=str(model_dir),
                                            flush_interval_s=0.01))
    seqs = canary_sequences(engine.vocab_size, count=2, length=10)  # type: ignore[attr-defined]

    def canary_of(w: Weights) -> Canary:
        return Canary(sequences=seqs, logprobs=reference_logprobs(
            model_dir, seqs, load_weights_dir(w.path, w.sha256)))

    def update(w: Weights, c: Canary) -> WeightUpdate:
        return WeightUpdate(run_id="t", version=w.version, location=w.path, sha256=w.sha256,
                            canary=c)

    try:
        assert await engine.update_weights(update(weights_v1, canary_of(weights_v1))) == 1
        # v2 loads fine but its canary says other weights: the server is put back on v1
        # (and v1's canary confirms it), the old version keeps serving.
        with pytest.raises(WeightUpdateError, match="weight canary MISMATCH.*rolled back to "
                           "version 1"):
            await engine.update_weights(update(weights_v2, canary_of(weights_v1)))
        assert engine.version == 1 and engine.consistent  # type: ignore[attr-defined]
        got = await engine.score(seqs, [1, 1])
        np.testing.assert_allclose(np.concatenate(got),
                                   np.concatenate(canary_of(weights_v1).logprobs), atol=1e-5)
        assert await engine.update_weights(update(weights_v2, canary_of(weights_v2))) == 2
    finally:
        await engine.close()


async def test_a_mismatch_with_nothing_to_roll_back_to_quarantines(
        fake_vllm: Fake, model_dir, weights_v1: Weights) -> None:
    engine = await make_engine(EngineConfig(kind="vllm", url=fake_vllm.url,
                                            model_path=str(model_dir), quarantine_wait_s=0.5))
    seqs = canary_sequences(engine.vocab_size, count=2, length=10)  # type: ignore[attr-defined]
    good = Canary(sequences=seqs, logprobs=reference_logprobs(
        model_dir, seqs, load_weights_dir(weights_v1.path, weights_v1.sha256)))
    update = WeightUpdate(run_id="t", version=1, location=weights_v1.path,
                          sha256=weights_v1.sha256)
    try:
        # The first update has no earlier directory: the server holds weights nobody vouches
        # for, so the engine serves nothing until an update passes its canary.
        with pytest.raises(WeightUpdateError, match="no known-good weight directory"):
            await engine.update_weights(update.model_copy(update={"canary": shifted(good, 0.2)}))
        assert engine.version == 0 and not engine.consistent  # type: ignore[attr-defined]
        assert (await engine.health())["ok"] is False
        with pytest.raises(UpstreamError, match="inconsistent"):
            await engine.score(seqs, [1, 1])
        assert await engine.update_weights(update.model_copy(update={"canary": good})) == 1
        assert engine.consistent  # type: ignore[attr-defined]
    finally:
        await engine.close()

"""Issue 23, fidelity to the paper around the formula: D with the paper's sign, the lone
correct rollout as a knob, D from one engine (`student_logprobs: engine`) and the
`engine_mismatch` metric, and the synchronous paper configs."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from support.groups import verified_group
from support.reference_logprobs import token_logprobs
from transformers import AutoTokenizer

from protocol.messages import ScoredGroup
from rlrt.config import load_section
from services.teacher.worker import score_group
from trainer.algorithm import AlgorithmConfig, token_advantages
from trainer.batch import build_batch

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"

# --------------------------------------------------------------------------- D's sign


def _one_group(s: list[float], q: list[float], e: list[float] | None = None):
    """Two rows of one group (rewards 1, 0), three tokens each, both teacher-scored."""
    S = torch.tensor([s, s])
    Q = torch.tensor([q, q])
    return dict(rewards=torch.tensor([1.0, 0.0]), group_ids=torch.zeros(2, dtype=torch.long),
                mask=torch.ones(2, 3, dtype=torch.bool), student_logprobs=S, teacher_logprobs=Q,
                engine_student_logprobs=None if e is None else torch.tensor([e, e]))


def test_metrics_report_d_with_the_papers_sign():
    # q - s = [+ln 2, -ln 2, 0]: the second token is self-driven (student more sure, s > q).
    s, q = [-2.0, -1.0, -1.0], [-2.0 + math.log(2), -1.0 - math.log(2), -1.0]
    out = token_advantages(AlgorithmConfig.from_preset("rlrt"), **_one_group(s, q))
    assert out.metrics["mean_D"] == pytest.approx(0.0, abs=1e-7)
    assert out.metrics["mean_D_correct"] == pytest.approx(0.0, abs=1e-7)
    assert out.metrics["self_driven_share"] == pytest.approx(1 / 3)
    # RLRT up-weights the self-driven token of the correct row: w = P_S / P_T = 2, clipped to 2
    assert out.weights[0].tolist() == pytest.approx([0.5, 2.0, 1.0])
    one_sided = token_advantages(AlgorithmConfig.from_preset("rlrt"),
                                 **_one_group(s, [-2.0 + math.log(2)] * 3))
    assert one_sided.metrics["mean_D"] > 0  # the teacher more sure everywhere: D = q - s > 0


# --------------------------------------------------------------------------- lone correct


@pytest.mark.parametrize("mode", ["grpo", "skip"])
def test_lone_correct_rollout(mode):
    """A 1-of-8 group in sibling mode with no reference solution: the lone correct rollout has
    no demonstration, so no teacher score. grpo (default): plain A_k, about +2.47, the largest
    advantage of the batch; skip: 0 on its tokens; the incorrect rows are the same either way."""
    rewards = torch.tensor([1.0] + [0.0] * 7)
    mask = torch.ones(8, 4, dtype=torch.bool)
    cfg = AlgorithmConfig.from_preset("rlrt", lone_correct=mode)
    zeros = torch.zeros(8, 4)
    out = token_advantages(cfg, rewards=rewards, group_ids=torch.zeros(8, dtype=torch.long),
                           mask=mask, student_logprobs=zeros, teacher_logprobs=zeros,
                           has_teacher=torch.zeros(8, dtype=torch.bool))
    a_k = (7 / 8) / math.sqrt(((7 / 8) ** 2 + 7 * (1 / 8) ** 2) / 7)
    assert a_k == pytest.approx(2.4749, abs=1e-4)
    expect_row0 = a_k if mode == "grpo" else 0.0
    assert out.advantages[0].tolist() == pytest.approx([expect_row0] * 4, abs=1e-5)
    assert out.advantages[1:].flatten().tolist() == pytest.approx([-a_k / 7] * 28, abs=1e-5)
    assert out.metrics["unscored_rows"] == 1.0
    assert AlgorithmConfig.from_preset("rlrt").lone_correct == "grpo"  # today's behaviour


# --------------------------------------------------------------------------- D from one engine


def test_engine_mode_takes_s_from_the_engine_and_reports_the_gap():
    s = [-1.0, -1.0, -1.0]
    e = [-1.0 + math.log(2), -1.0, -1.25]  # the engine's own score of the student context
    q = [-1.0 + math.log(2), -1.0 - math.log(2), -1.0]
    trainer = token_advantages(AlgorithmConfig.from_preset("rlrt"), **_one_group(s, q, e))
    engine = token_advantages(AlgorithmConfig.from_preset("rlrt", student_logprobs="engine"),
                              **_one_group(s, q, e))
    # trainer: D = q - s; engine: D = q - e; both report the same engine_mismatch
    assert trainer.metrics["mean_D"] == pytest.approx(0.0, abs=1e-7)
    d_engine = [0.0, -math.log(2), 0.25]
    assert engine.metrics["mean_D"] == pytest.approx(sum(d_engine) / 3, abs=1e-6)
    gap = (math.log(2) + 0 + 0.25) / 3
    assert trainer.metrics["engine_mismatch"] == pytest.approx(gap, abs=1e-6)
    assert engine.metrics["engine_mismatch"] == pytest.approx(gap, abs=1e-6)
    assert engine.metrics["engine_mismatch_tokens"] == 6
    # the weights of the correct row follow the engine's D: w = exp(-D)
    assert engine.weights[0].tolist() == pytest.approx([math.exp(-d) for d in d_engine], abs=1e-6)
    # D moved by at most the mismatch, token by token
    assert (engine.weights[0].log() - trainer.weights[0].log()).abs().max() <= math.log(2) + 1e-6
    assert engine.metrics["student_engine_missing_rows"] == 0


def test_engine_mode_without_engine_scores_falls_back_and_counts():
    s, q = [-1.0] * 3, [-0.5] * 3
    cfg = AlgorithmConfig.from_preset("rlrt", student_logprobs="engine")
    g = _one_group(s, q, [-3.0] * 3)
    out = token_advantages(cfg, **g, has_engine_student=torch.tensor([False, True]))
    assert out.metrics["student_engine_missing_rows"] == 1
    # the correct row (no engine score) keeps the trainer's s: D = 0.5 -> w = exp(-0.5)
    assert out.weights[0].tolist() == pytest.approx([math.exp(-0.5)] * 3, abs=1e-6)


def test_engine_mode_asks_the_teacher_for_student_scores():
    assert AlgorithmConfig.from_preset("rlrt", student_logprobs="engine").teacher_request().score_student
    assert not AlgorithmConfig.from_preset("rlrt").teacher_request().score_student
    # no teacher, nothing to ask for
    assert not AlgorithmConfig.from_preset("grpo", student_logprobs="engine").teacher_request().score_student


class _ForwardEngine:
    """The two things score_group reads of an engine, over a real forward of the tiny model:
    `version` and `score`, recording each call (to see what rides in one batch)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = str(model_dir)
        self.version = 0
        self.calls: list[list[list[int]]] = []

    async def score(self, seqs, offs):  # noqa: ANN001, ANN201
        self.calls.append([list(s) for s in seqs])
        return [np.asarray(token_logprobs(self.model_dir, list(s))[o - 1:], dtype=np.float32)
                for s, o in zip(seqs, offs, strict=True)]


def test_teacher_scores_the_student_context_in_the_same_batch(model_dir):
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    texts = ["The answer is 5", "I think 5", "It is 7", "no idea"]
    group = verified_group(model_dir, texts, [True, True, False, False], score_student=True)
    engine = _ForwardEngine(model_dir)
    sg = asyncio.run(score_group(engine, tok, group))  # type: ignore[arg-type]
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 4  # 2 teacher + 2 student contexts
    prompt = [int(t) for t in group.task.prompt_ids]
    extra = 0
    for i in (0, 1):
        ids = [int(t) for t in group.responses[i].token_ids]
        want = token_logprobs(str(model_dir), prompt + ids)[len(prompt) - 1:]
        t = sg.teacher[i]
        assert t is not None and t.student_logprobs is not None
        np.testing.assert_allclose(t.student_logprobs, want, atol=1e-5)
        assert not np.allclose(t.student_logprobs, t.logprobs)  # a different context
        extra += len(prompt) + len(ids)
    assert sg.teacher[2] is None and sg.teacher[3] is None
    assert sg.student_context_tokens == extra
    # the round trip keeps them, and the batch puts them at the response positions
    sg = ScoredGroup.model_validate_json(sg.model_dump_json())
    batch = build_batch([sg], version=0, pad_id=0)
    assert batch.has_student_engine.tolist() == [True, True, False, False]
    n0 = len(group.responses[0].token_ids)
    got = batch.student_engine_logprobs[0, len(prompt):len(prompt) + n0]
    np.testing.assert_allclose(got.numpy(), sg.teacher[0].student_logprobs, atol=0)

    plain = verified_group(model_dir, texts, [True, True, False, False], group_id="g2")
    engine.calls.clear()
    sg2 = asyncio.run(score_group(engine, tok, plain))  # type: ignore[arg-type]
    assert len(engine.calls[0]) == 2 and sg2.student_context_tokens == 0
    assert all(t is None or t.student_logprobs is None for t in sg2.teacher)


# --------------------------------------------------------------------------- the paper configs


@pytest.mark.parametrize("run", ["rlrt", "grpo", "rlsd"])
def test_paper_configs_are_synchronous(run, monkeypatch):
    import os

    for var in list(os.environ):
        if var.startswith("RLRT_") or var == "REDIS_URL":
            monkeypatch.delenv(var)
    t = load_section("trainer", str(PAPER / f"{run}.yaml"))
    assert t.max_staleness == 0 and t.algorithm.tis_cap is None
    # the one-step-off-policy variant, as the configs' comment spells it
    off = load_section("trainer", str(PAPER / f"{run}.yaml"),
                       ["trainer.max_staleness=1", "trainer.algorithm.tis_cap=2.0"])
    assert off.max_staleness == 1 and off.algorithm.tis_cap == 2.0
    assert off.algorithm.preset == run


def test_synchronous_run_trains_on_the_sampling_policy(tmp_path, redis_url, prefix):
    """max_staleness 0 (the paper configs): every sample is trained at the version that sampled
    it, nothing is sent back for rescoring, pi_old is the sampling policy (the engine/trainer
    gap on the scored tokens is float noise: the stand-in samples with the same fp32 weights),
    and with one update per step the PPO ratio is exactly 1."""
    from support.tiny_model import save_tiny_policy
    from support.trainer_standin import StandinPipeline, standin_config

    from protocol.config import BusSettings
    from trainer.main import run_trainer

    torch.set_num_threads(1)
    model = save_tiny_policy(tmp_path / "policy")
    bus = BusSettings(redis_url=redis_url, prefix=prefix)
    standin = StandinPipeline(model, bus, token="tok")
    with standin.running() as url:
        cfg = standin_config(
            model, tmp_path / "out", url, warmup_steps=0, max_staleness=0,
            algorithm={"preset": "rlrt", "tis_cap": None, "teacher_scope": "all"},
            checkpoint={"every": 0})
        summary = run_trainer(cfg, bus)
    assert summary["completed"]
    records = [json.loads(line) for line in
               (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert r["staleness_max"] == 0 and r.get("teacher_rescored", 0) == 0
        assert r["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        assert r["mismatch_kl"] < 1e-6
        assert r["engine_mismatch_tokens"] > 0 and r["engine_mismatch"] < 1e-4
    assert standin.rescored == 0

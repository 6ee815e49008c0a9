"""Issue 23, "Done when": with `student_logprobs: engine` one step reports both D's on the same
scored tokens -- `mean_D` (q - s_engine) and `mean_D_trainer` (q - s_trainer) -- and they differ
by exactly the signed engine mismatch, mean(s_engine - s_trainer) (`engine_mismatch_signed`),
whose absolute counterpart is `engine_mismatch`."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.algorithm import AlgorithmConfig, token_advantages


def _batch(seed: int, *, missing: bool) -> dict:
    """Three groups of four rows with ragged masks, rows without a teacher score, and an engine
    s_t = the trainer's + a bias + noise (a bf16-like gap); `missing`: one scored row lacks its
    engine score (an older teacher)."""
    g = torch.Generator().manual_seed(seed)
    B, T = 12, 9
    lens = torch.randint(3, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lens[:, None]
    s = -torch.rand(B, T, generator=g) * 3
    q = s + torch.randn(B, T, generator=g) * 0.7
    e = s + 0.01 + torch.randn(B, T, generator=g) * 0.05
    rewards = torch.tensor([1.0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 1, 1])
    has_teacher = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    has_engine = has_teacher.clone()
    if missing:
        has_engine[4] = False
    return dict(rewards=rewards, group_ids=torch.arange(B) // 4, mask=mask,
                student_logprobs=s, teacher_logprobs=q, has_teacher=has_teacher,
                engine_student_logprobs=e, has_engine_student=has_engine)


def _mean(x: torch.Tensor, m: torch.Tensor) -> float:
    return float(x[m].double().mean())


@pytest.mark.parametrize("preset", ["rlrt", "rlsd", "opsd"])
def test_both_ds_on_the_same_tokens_differ_by_the_signed_mismatch(preset):
    b = _batch(0, missing=False)
    cfg = AlgorithmConfig.from_preset(preset, student_logprobs="engine")
    m = token_advantages(cfg, **b).metrics
    scored = b["mask"] & b["has_teacher"][:, None]
    s, q, e = b["student_logprobs"], b["teacher_logprobs"], b["engine_student_logprobs"]
    # the same tokens: every scored token, D with the paper's sign q - s
    assert m["mean_D"] == pytest.approx(_mean(q - e, scored), abs=1e-6)
    assert m["mean_D_trainer"] == pytest.approx(_mean(q - s, scored), abs=1e-6)
    assert m["engine_mismatch_tokens"] == int(scored.sum())
    assert m["engine_mismatch_signed"] == pytest.approx(_mean(e - s, scored), abs=1e-6)
    assert m["engine_mismatch"] == pytest.approx(_mean((e - s).abs(), scored), abs=1e-6)
    # D_trainer - D_engine = s_engine - s_trainer, token by token, hence on the means
    assert m["mean_D_trainer"] - m["mean_D"] == pytest.approx(m["engine_mismatch_signed"],
                                                               abs=1e-6)
    assert abs(m["mean_D_trainer"] - m["mean_D"]) <= m["engine_mismatch"] + 1e-6
    # trainer mode's mean_D is the engine run's mean_D_trainer (and reports no second D)
    t = token_advantages(AlgorithmConfig.from_preset(preset), **b).metrics
    assert t["mean_D"] == pytest.approx(m["mean_D_trainer"], abs=1e-7)
    assert "mean_D_trainer" not in t
    assert t["engine_mismatch_signed"] == pytest.approx(m["engine_mismatch_signed"], abs=1e-7)


def test_rows_without_engine_scores_count_in_both_ds_and_differ_by_zero():
    b = _batch(1, missing=True)
    m = token_advantages(AlgorithmConfig.from_preset("rlrt", student_logprobs="engine"),
                         **b).metrics
    assert m["student_engine_missing_rows"] == 1
    scored = b["mask"] & b["has_teacher"][:, None]
    with_engine = scored & b["has_engine_student"][:, None]
    assert m["engine_mismatch_tokens"] == int(with_engine.sum()) < int(scored.sum())
    share = int(with_engine.sum()) / int(scored.sum())
    assert m["mean_D_trainer"] - m["mean_D"] == pytest.approx(
        m["engine_mismatch_signed"] * share, abs=1e-6)


def test_a_pure_bias_moves_d_by_exactly_the_bias():
    """An engine whose every s_t is the trainer's + 0.03 (a systematic kernel bias): the
    engine-based D is the trainer-based D - 0.03, and the mismatch is 0.03 both ways."""
    b = _batch(2, missing=False)
    b["engine_student_logprobs"] = b["student_logprobs"] + 0.03
    m = token_advantages(AlgorithmConfig.from_preset("rlrt", student_logprobs="engine"),
                         **b).metrics
    assert m["engine_mismatch"] == pytest.approx(0.03, abs=1e-6)
    assert m["engine_mismatch_signed"] == pytest.approx(0.03, abs=1e-6)
    assert m["mean_D_trainer"] - m["mean_D"] == pytest.approx(0.03, abs=1e-6)
    assert not math.isclose(m["mean_D"], m["mean_D_trainer"])

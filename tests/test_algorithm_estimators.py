"""The advantage-estimator registry: one declaration of each estimator's facts
(protocol/estimators.py) that the teacher contract and the trainer's formula both follow."""

from __future__ import annotations

import torch

from protocol.estimators import ADV_ESTIMATORS, ZERO_ADV_TOL, get_adv_est
from tasks.teacher import teacher_needed
from trainer.algorithm import PRESETS, AlgorithmConfig, token_advantages
from trainer.algorithm.advantages import ADV_FORMULAS


def test_every_declared_estimator_has_a_formula_and_back():
    assert set(ADV_ESTIMATORS) == set(ADV_FORMULAS) == {"grpo", "self_distill"}
    for name in PRESETS:  # every preset names a registered estimator
        assert AlgorithmConfig.from_preset(name).advantage in ADV_ESTIMATORS


def test_presets_scope_comes_from_the_registry():
    want = {"grpo": "none", "dr_grpo": "none", "grpo_entropy": "none",
            "rlrt": "correct_mixed", "teacher_upweight": "correct_mixed",
            "rlrt_all": "nonzero_adv", "rlsd": "nonzero_adv", "opsd": "all"}
    for name, scope in want.items():
        cfg = AlgorithmConfig.from_preset(name)
        assert cfg.required_scope == scope
        assert cfg.teacher_request().estimator == cfg.advantage


def test_trainer_and_teacher_agree_on_zero_advantage_with_float_rewards():
    """Rewards 0.1/0.2/0.3 (partial credit): 0.2 is the group mean up to float noise. The
    teacher says it needs no score; the trainer must then give it A = 0 exactly (before the
    registry it got A ~ 1e-16 / (std + eps), asked for a score and counted it unscored)."""
    rewards = [0.1, 0.2, 0.3]
    mean = sum(rewards) / 3
    assert rewards[1] - mean != 0.0 and abs(rewards[1] - mean) <= ZERO_ADV_TOL
    correct = [True, True, True]  # e.g. a `correct` threshold of 0.1
    needed = teacher_needed(correct, rewards, "nonzero_adv", has_solution=True)
    assert needed == [True, False, True]
    cfg = AlgorithmConfig.from_preset("rlrt_all")
    mask = torch.ones(3, 4, dtype=torch.bool)
    out = token_advantages(cfg, rewards=torch.tensor(rewards, dtype=torch.float64),
                           group_ids=torch.zeros(3, dtype=torch.long), mask=mask,
                           student_logprobs=-torch.ones(3, 4), teacher_logprobs=-torch.ones(3, 4),
                           has_teacher=torch.tensor(needed), correct=torch.tensor(correct))
    assert (out.advantages[1] == 0).all()
    assert out.metrics["unscored_rows"] == 0  # the trainer wanted exactly what was scored
    assert out.group.zero_advantage.tolist() == [False, True, False]


def test_self_distill_never_has_zero_advantage():
    est = get_adv_est("self_distill")
    assert est.zero_advantage([1.0, 1.0]) == [False, False]
    assert not est.carries_no_signal([0.0, 0.0])
    assert get_adv_est("grpo").carries_no_signal([0.0, 0.0])
    assert teacher_needed([False, False], [0.0, 0.0], "all", "reference_solution",
                          has_solution=True, estimator="self_distill") == [True, True]

"""Every preset of the spec's table on one hand-worked group (docs/algorithm.md, "Presets").

The group: 4 rollouts of one prompt, rewards [1, 1, 0, 0].
  mean = 0.5, sample std = sqrt(4 * 0.25 / 3) = 1/sqrt(3), so
  A = +-0.5 * sqrt(3) = +-sqrt(3)/2 (eps = 1e-6 moves it by ~1.5e-6, inside the tolerance).
Log-prob gaps D_t = s_t - q_t are logs of round numbers, so every weight is exact on paper:
  row 0 (correct):   D = [ln 1.5, ln 0.5, ln 3, 0]
  row 1 (correct):   D = [ln 4, ln 0.25, 0, <pad>]
  row 2 (incorrect): D = [ln 2, ln 0.25, 0, ln 1.5]
  row 3 (incorrect): D = [ln 3, ln 1/3, <pad>, <pad>]
Padded positions hold -inf in both s and q, as an engine's filler would.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from trainer.algorithm import PRESETS, AlgorithmConfig, token_advantages

A = math.sqrt(3) / 2
ln = math.log
D = [
    [ln(1.5), ln(0.5), ln(3), 0.0],
    [ln(4), ln(0.25), 0.0, None],
    [ln(2), ln(0.25), 0.0, ln(1.5)],
    [ln(3), ln(1 / 3), None, None],
]
MASK = torch.tensor([[d is not None for d in row] for row in D])
REWARDS = torch.tensor([1.0, 1.0, 0.0, 0.0])
GROUPS = torch.zeros(4, dtype=torch.long)
# s = -1 on real tokens, q = s - D; both -inf on padding.
S = torch.tensor([[-1.0 if d is not None else -math.inf for d in row] for row in D])
Q = torch.tensor([[-1.0 - d if d is not None else -math.inf for d in row] for row in D])


def run(preset: str, step: int = 0, has_teacher: list[bool] | None = None, **over):
    cfg = AlgorithmConfig.from_preset(preset, **over)
    ht = torch.tensor(has_teacher) if has_teacher is not None else None
    return token_advantages(
        cfg,
        rewards=REWARDS,
        group_ids=GROUPS,
        mask=MASK,
        student_logprobs=S,
        teacher_logprobs=Q,
        has_teacher=ht,
        step=step,
    )


def expect(rows: list[list[float]]) -> torch.Tensor:
    """Rows of A_kt with 0 on padding."""
    return torch.tensor([r + [0.0] * (4 - len(r)) for r in rows])


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_grpo_is_the_group_advantage_on_every_token():
    out = run("grpo")
    close(out.advantages, expect([[A] * 4, [A] * 3, [-A] * 4, [-A] * 2]))
    assert out.metrics["reweighted_rows"] == 0


def test_dr_grpo_drops_the_std():
    # A = r - mean = +-0.5; aggregation seq-mean-token-sum-norm.
    out = run("dr_grpo")
    close(out.advantages, expect([[0.5] * 4, [0.5] * 3, [-0.5] * 4, [-0.5] * 2]))
    assert AlgorithmConfig.from_preset("dr_grpo").loss_agg == "seq-mean-token-sum-norm"


def test_rlrt_reweights_correct_rows_only():
    # lam 0.5, eps_w 1: factor = 0.5 + 0.5 clip(exp(+D), 0, 2).
    # row 0: w = [1.5, 0.5, 3->2, 1]  -> [1.25, 0.75, 1.5, 1]
    # row 1: w = [4->2, 0.25, 1]      -> [1.5, 0.625, 1]
    out = run("rlrt")
    close(
        out.advantages,
        expect([[A * 1.25, A * 0.75, A * 1.5, A], [A * 1.5, A * 0.625, A], [-A] * 4, [-A] * 2]),
    )
    m = out.metrics
    # self-driven (D > 0) on correct rows: row 0 {ln1.5, ln3}, row 1 {ln4} -> 3 of 7 tokens.
    assert m["self_driven_share"] == pytest.approx(3 / 7)
    # weights used: 1.5 + 0.5 + 2 + 1 + 2 + 0.25 + 1 = 8.25 over 7 tokens.
    assert m["weight_mean"] == pytest.approx(8.25 / 7)
    # at the upper bound 2: ln3 and ln4 -> 2/7; the lower bound 0 is unreachable.
    assert m["clip_high_share"] == pytest.approx(2 / 7)
    assert m["clip_low_share"] == 0.0
    assert m["reweighted_rows"] == 2 and m["unscored_rows"] == 0
    # mean D over every scored token (13 of them, all four rows carry teacher scores).
    total = (ln(1.5) + ln(0.5) + ln(3) + 0) + (ln(4) + ln(0.25) + 0)
    total += (ln(2) + ln(0.25) + 0 + ln(1.5)) + (ln(3) + ln(1 / 3))
    # metrics report D with the paper's sign, q - s (issue 23): the negated sum.
    assert m["mean_D"] == pytest.approx(-total / 13, abs=1e-6)
    # histogram of the 7 weights on 10 bins of [0, 2]: 0.25 -> bin 1, 0.5 -> 2, 1, 1 -> 5,
    # 1.5 -> 7, 2, 2 -> 9 (the top edge belongs to the last bin).
    assert out.weight_hist.tolist() == [0, 1, 1, 0, 0, 2, 0, 1, 0, 2]


def test_rlrt_all_also_reweights_incorrect_rows():
    # sign(A) = -1 on incorrect rows: w = exp(-D), factor = 0.5 + 0.5 clip(w, 0, 2).
    # row 2: w = [0.5, 4->2, 1, 2/3] -> [0.75, 1.5, 1, 5/6]
    # row 3: w = [1/3, 3->2]        -> [2/3, 1.5]
    out = run("rlrt_all")
    close(
        out.advantages,
        expect(
            [
                [A * 1.25, A * 0.75, A * 1.5, A],
                [A * 1.5, A * 0.625, A],
                [-A * 0.75, -A * 1.5, -A, -A * 5 / 6],
                [-A * 2 / 3, -A * 1.5],
            ]
        ),
    )
    assert out.metrics["reweighted_rows"] == 4


def test_teacher_upweight_is_the_rlsd_direction_on_correct_rows():
    # w = exp(sign(A) (q - s)) = exp(-D) on correct rows.
    # row 0: w = [2/3, 2, 1/3, 1] -> [5/6, 1.5, 2/3, 1]
    # row 1: w = [0.25, 4->2, 1]  -> [0.625, 1.5, 1]
    out = run("teacher_upweight")
    close(
        out.advantages,
        expect([[A * 5 / 6, A * 1.5, A * 2 / 3, A], [A * 0.625, A * 1.5, A], [-A] * 4, [-A] * 2]),
    )


def test_rlsd_decays_lambda_and_clips_at_eps_w():
    # step 10: lam = 0.5 (1 - 10/50) = 0.4; eps_w 0.2: w in [0.8, 1.2]; factor = 0.6 + 0.4 w.
    # correct rows, w = exp(-D):   row 0 [2/3->.8, 2->1.2, 1/3->.8, 1] -> [.92, 1.08, .92, 1]
    #                              row 1 [.25->.8, 4->1.2, 1]          -> [.92, 1.08, 1]
    # incorrect rows, w = exp(+D): row 2 [2->1.2, .25->.8, 1, 1.5->1.2] -> [1.08, .92, 1, 1.08]
    #                              row 3 [3->1.2, 1/3->.8]             -> [1.08, .92]
    out = run("rlsd", step=10)
    close(
        out.advantages,
        expect(
            [
                [A * 0.92, A * 1.08, A * 0.92, A],
                [A * 0.92, A * 1.08, A],
                [-A * 1.08, -A * 0.92, -A, -A * 1.08],
                [-A * 1.08, -A * 0.92],
            ]
        ),
    )
    m = out.metrics
    assert m["lam"] == pytest.approx(0.4)
    # 13 tokens, 5 at 0.8 and 5 at 1.2 (counted above).
    assert m["clip_low_share"] == pytest.approx(5 / 13)
    assert m["clip_high_share"] == pytest.approx(5 / 13)
    assert AlgorithmConfig.from_preset("rlsd").context_mode == "reference_answer"
    # step 50 and later: lam = 0, plain GRPO.
    for step in (50, 80):
        close(run("rlsd", step=step).advantages, run("grpo").advantages)


def test_opsd_uses_q_minus_s_and_no_reward():
    # A_t = q_t - s_t = -D_t; row 3 unscored -> 0 and counted.
    out = run("opsd", has_teacher=[True, True, True, False])
    close(
        out.advantages,
        expect(
            [
                [-ln(1.5), -ln(0.5), -ln(3), 0.0],
                [-ln(4), -ln(0.25), 0.0],
                [-ln(2), -ln(0.25), 0.0, -ln(1.5)],
                [0.0, 0.0],
            ]
        ),
    )
    assert out.metrics["unscored_rows"] == 1
    # no reward: flipping every reward changes nothing.
    cfg = AlgorithmConfig.from_preset("opsd")
    flipped = token_advantages(
        cfg,
        rewards=1 - REWARDS,
        group_ids=GROUPS,
        mask=MASK,
        student_logprobs=S,
        teacher_logprobs=Q,
    )
    close(flipped.advantages, run("opsd").advantages)


def test_grpo_entropy_is_grpo_advantage_with_an_entropy_bonus():
    cfg = AlgorithmConfig.from_preset("grpo_entropy")
    assert cfg.entropy_coef > 0 and not cfg.uses_teacher
    close(run("grpo_entropy").advantages, run("grpo").advantages)


def test_unscored_rows_fall_back_to_grpo_and_are_counted():
    out = run("rlrt", has_teacher=[True, False, True, True])
    close(out.advantages[1], torch.tensor([A, A, A, 0.0]))
    close(out.advantages[0], torch.tensor([A * 1.25, A * 0.75, A * 1.5, A]))
    assert out.metrics["unscored_rows"] == 1
    assert out.unscored.tolist() == [False, True, False, False]


def test_every_preset_of_the_spec_table_exists():
    table = {"grpo", "dr_grpo", "rlrt", "rlrt_all", "teacher_upweight", "rlsd", "opsd"}
    assert table | {"grpo_entropy"} == set(PRESETS)


def test_overrides_beat_the_preset_and_unknown_keys_fail():
    assert AlgorithmConfig.from_preset("rlrt", lam=0.3).lam == 0.3
    cfg = AlgorithmConfig.model_validate({"preset": "rlrt", "eps_w": 0.5})
    assert (cfg.eps_w, cfg.teacher_weight, cfg.weight_gate) == (0.5, "reversed", "correct")
    # an override of the preset's own knob: rlsd's schedule turned off.
    assert AlgorithmConfig.from_preset("rlsd", lam_schedule="constant").lam_at(49) == 0.5
    with pytest.raises(ValidationError):
        AlgorithmConfig.model_validate({"preset": "rlrt", "eps_weight": 0.5})
    with pytest.raises(ValidationError):
        AlgorithmConfig.from_preset("no_such_preset")
    with pytest.raises(ValidationError):
        AlgorithmConfig.from_preset("rlrt", eps_w=1.5)


def test_teacher_scope_follows_the_knobs_and_cannot_be_too_narrow():
    scopes = {p: AlgorithmConfig.from_preset(p).scope for p in PRESETS}
    assert scopes == {
        "grpo": "none",
        "dr_grpo": "none",
        "grpo_entropy": "none",
        "rlrt": "correct_mixed",
        "teacher_upweight": "correct_mixed",
        "rlrt_all": "nonzero_adv",
        "rlsd": "nonzero_adv",
        "opsd": "all",
    }
    assert AlgorithmConfig.from_preset("rlrt", teacher_scope="all").scope == "all"
    with pytest.raises(ValidationError):
        AlgorithmConfig.from_preset("rlrt_all", teacher_scope="correct_mixed")
    req = AlgorithmConfig.from_preset("rlsd").teacher_request()
    assert (req.scope, req.context_mode) == ("nonzero_adv", "reference_answer")


def test_every_knob_is_documented():
    for name, f in AlgorithmConfig.model_fields.items():
        assert f.description, f"{name} has no description"

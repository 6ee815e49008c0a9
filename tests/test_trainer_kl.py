"""KL to a frozen reference policy in the real DeepSpeed update (CPU, gloo, 1 process): a
step with kl_coef > 0 runs, the KL is exactly 0 while the policy equals the reference and
positive once it has moved, on ZeRO 0 and ZeRO-3 (the reference partitioned too)."""

from __future__ import annotations

import pytest
from support.update_case import case_batch, case_config

from trainer import dist
from trainer.model import build_policy
from trainer.reference import build_reference
from trainer.update import train_step, update_step


@pytest.mark.parametrize("stage", [0, 3])
def test_kl_step_runs_is_zero_at_the_reference_then_positive(policy_dir, stage):
    cfg = case_config(policy_dir, zero_stage=stage, lr=2e-2, ppo_mini_batch_size=1,
                      algorithm={"preset": "rlrt", "kl_coef": 0.1, "kl_type": "low_var_kl"})
    rank, world = dist.setup("cpu", 120)
    policy = build_policy(cfg, rank=rank, world_size=world, device="cpu")
    ref = build_reference(cfg, rank=rank, world_size=world, device="cpu")
    assert ref is not None
    batch = case_batch()
    m0 = train_step(cfg, policy, batch, 0, ref)
    # 3 updates (one group each): the 1st sees policy == reference, the later ones do not,
    # so the step's mean KL is > 0 but the next step's first update is the larger one.
    assert m0["optimizer_steps"] == 3 and m0["kl"] > 0
    m1 = train_step(cfg, policy, batch, 1, ref)
    assert m1["kl"] > m0["kl"]
    # the reference never moved: a fresh policy from the same weights has KL exactly 0
    fresh = build_policy(cfg, rank=rank, world_size=world, device="cpu")
    one = update_step(fresh, batch, cfg.algorithm, step=0, micro_batch_size=3, reference=ref)
    assert one["kl"] == 0.0


def test_kl_without_reference_is_an_error_not_a_silent_zero(policy_dir):
    cfg = case_config(policy_dir, algorithm={"preset": "grpo", "kl_coef": 0.1})
    rank, world = dist.setup("cpu", 120)
    policy = build_policy(cfg, rank=rank, world_size=world, device="cpu")
    with pytest.raises(ValueError, match="reference"):
        update_step(policy, case_batch(), cfg.algorithm, step=0, micro_batch_size=3)
    assert build_reference(case_config(policy_dir), rank=rank, world_size=world,
                           device="cpu") is None  # kl_coef 0: nothing loaded

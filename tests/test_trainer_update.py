"""The DeepSpeed update (real engine on CPU, gloo) against the same update in plain PyTorch:
identical losses and weights, whatever the micro-batch size and ZeRO stage (1 process)."""

from __future__ import annotations

import pytest
import torch
from support.reference_update import reference_optimizer, reference_update
from support.update_case import STEPS, case_batch, case_config
from transformers import AutoModelForCausalLM

from trainer import dist
from trainer.algorithm import token_logprobs
from trainer.model import build_policy, full_state_dict
from trainer.update import update_step


@pytest.fixture(scope="module")
def batch():
    return case_batch()


def ds_run(policy_dir, batch, mode="reuse", **kw) -> tuple[list[dict], dict[str, torch.Tensor]]:
    cfg = case_config(policy_dir, **kw)
    rank, world = dist.setup("cpu", 120)
    policy = build_policy(cfg, rank=rank, world_size=world, device="cpu")
    ms = [update_step(policy, batch, cfg.algorithm, step=s, micro_batch_size=cfg.micro_batch_size,
                      old_logprobs_mode=mode) for s in range(STEPS)]
    return ms, full_state_dict(policy)


@pytest.fixture(scope="module")
def reference(policy_dir, batch):
    cfg = case_config(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    opt, sched = reference_optimizer(model, cfg)
    ms = [reference_update(model, opt, sched, batch, cfg.algorithm, step=s, micro_batch_size=2,
                           max_grad_norm=cfg.max_grad_norm) for s in range(STEPS)]
    return ms, {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(run, ref) -> None:
    ms, weights = run
    ref_ms, ref_w = ref
    for m, r in zip(ms, ref_ms, strict=True):
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-4, abs=1e-6)
        assert m["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4)
    assert weights.keys() == ref_w.keys()
    # Adam divides by sqrt(v): an element whose gradient is ~0 amplifies summation-order
    # noise to ~1e-6; a wrong update would be off by ~lr = 5e-3.
    for n, t in weights.items():
        torch.testing.assert_close(t, ref_w[n], rtol=1e-4, atol=2e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_policy_logprobs_are_the_models(policy_dir, batch):
    rank, world = dist.setup("cpu", 120)
    policy = build_policy(case_config(policy_dir), rank=rank, world_size=world, device="cpu")
    lp, ent = policy.forward(batch.input_ids, batch.attention_mask, batch.response_mask,
                             with_entropy=True)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    naive = torch.log_softmax(logits.float(), -1)[:, :-1].gather(
        -1, batch.input_ids[:, 1:, None]).squeeze(-1)
    m = batch.response_mask[:, 1:]
    torch.testing.assert_close(lp[:, 1:][m], naive[m], rtol=1e-5, atol=1e-5)
    ref = token_logprobs(model, batch.input_ids, batch.attention_mask,
                         logprob_mask=batch.response_mask, with_entropy=True)
    torch.testing.assert_close(ent[batch.response_mask], ref.entropy[batch.response_mask])


@pytest.mark.parametrize("mode", ["recompute", "reuse"])
def test_zero0_update_matches_plain_pytorch(policy_dir, batch, reference, mode):
    run = ds_run(policy_dir, batch, mode, micro_batch_size=3)
    assert_same(run, reference)
    m = run[0][0]
    for key in ("pg_loss", "clipfrac_low", "clipfrac_high", "mismatch_kl", "entropy",
                "self_driven_share", "weight_mean", "reweighted_rows", "lr", "tokens_per_s",
                "time_old_logprobs_s", "time_fwd_bwd_s", "time_optimizer_s"):
        assert key in m, key
    assert m["reweighted_rows"] == 3  # the correct, teacher-scored rows of the mixed groups
    assert m["zero_var_groups"] == 1


def test_micro_batch_size_does_not_change_the_update(policy_dir, batch, reference):
    assert_same(ds_run(policy_dir, batch, micro_batch_size=1), reference)
    assert_same(ds_run(policy_dir, batch, micro_batch_size=64), reference)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_match_plain_pytorch(policy_dir, batch, reference, stage):
    assert_same(ds_run(policy_dir, batch, zero_stage=stage, micro_batch_size=4), reference)


def test_ppo_mini_batches_match_plain_pytorch_and_clip(policy_dir, batch):
    """verl semantics: s_t once with the weights that begin the step, one optimizer update per
    mini-batch of prompts (3 groups, 2 per mini-batch -> 2 updates), the second one's ratio
    against pi_old: the clip binds. The lr advances once per RL step."""
    cfg = case_config(policy_dir, ppo_mini_batch_size=2, old_logprobs="reuse")
    rank, world = dist.setup("cpu", 120)
    policy = build_policy(cfg, rank=rank, world_size=world, device="cpu")
    kw = dict(micro_batch_size=cfg.micro_batch_size, old_logprobs_mode=cfg.old_logprobs,
              ppo_mini_batch_size=2)
    ms = [update_step(policy, batch, cfg.algorithm, step=s, **kw) for s in range(STEPS)]
    weights = full_state_dict(policy)

    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    opt, sched = reference_optimizer(model, cfg)
    gids = batch.group_ids.tolist()
    minis = [[i for i, g in enumerate(gids) if g in (0, 1)], [i for i, g in enumerate(gids) if g == 2]]
    ref_ms = [reference_update(model, opt, sched, batch, cfg.algorithm, step=s,
                               micro_batch_size=3, max_grad_norm=cfg.max_grad_norm, minis=minis)
              for s in range(STEPS)]
    ref_w = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert_same((ms, weights), (ref_ms, ref_w))
    for m, r in zip(ms, ref_ms, strict=True):
        assert m["optimizer_steps"] == 2
        assert m["clipfrac_low"] + m["clipfrac_high"] == pytest.approx(r["clipfrac"], abs=1e-6)
    # mini-batches of one group: the updates after the first are clipped against pi_old
    # (a tiny model moves little per update: lr 2e-2 makes some ratios leave [0.8, 1.28]).
    policy = build_policy(case_config(policy_dir, lr=2e-2), rank=rank, world_size=world,
                          device="cpu")
    one = update_step(policy, batch, cfg.algorithm, step=0, micro_batch_size=3,
                      ppo_mini_batch_size=1)
    assert one["optimizer_steps"] == 3
    assert one["clipfrac_low"] + one["clipfrac_high"] > 0
    assert one["approx_kl"] > 0 and one["ratio_mean"] != 1.0
    single = update_step(build_policy(case_config(policy_dir), rank=rank, world_size=world,
                                      device="cpu"), batch, cfg.algorithm, step=0,
                         micro_batch_size=3)
    assert single["clipfrac_low"] + single["clipfrac_high"] == 0  # one update: ratio == 1
    # lr: no warm-up -> the peak from RL step 0 on, however many updates a step makes
    assert [m["lr"] for m in ms] == pytest.approx([cfg.lr, cfg.lr])

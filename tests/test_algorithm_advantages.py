"""Group advantages by hand, and the invariants of the RLRT token advantage as properties."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.algorithm import AlgorithmConfig, group_advantages, policy_loss, token_advantages

# Two groups, [1, 0] and [1, 1, 1, 0], interleaved to check group ids are honoured.
REWARDS = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
GROUPS = torch.tensor([7, 3, 7, 3, 3, 3])


def test_group_level_std():
    # group 7 = [1, 0]: mean 0.5, sample std sqrt(0.5) -> A = +-0.5/sqrt(0.5) = +-1/sqrt(2).
    # group 3 = [1, 1, 1, 0]: mean 0.75, sample var (3 * 0.0625 + 0.5625) / 3 = 0.25, std 0.5
    #   -> A = [0.5, 0.5, 0.5, -1.5].
    g = group_advantages(REWARDS, GROUPS)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(
        g.advantages, torch.tensor([s, 0.5, -s, 0.5, 0.5, -1.5]), atol=1e-5, rtol=0
    )
    assert (g.num_groups, g.zero_variance_groups) == (2, 0)


def test_batch_level_std_keeps_the_group_mean():
    # std of all six rewards: mean 2/3, sum of squares 4 (1/3)^2 + 2 (2/3)^2 = 4/3,
    # sample var 4/15 -> std = sqrt(4/15); A = (r - group mean) / std.
    g = group_advantages(REWARDS, GROUPS, level="batch")
    std = math.sqrt(4 / 15)
    want = torch.tensor([0.5, 0.25, -0.5, 0.25, 0.25, -0.75]) / std
    torch.testing.assert_close(g.advantages, want, atol=1e-5, rtol=0)


def test_no_std_is_dr_grpo():
    g = group_advantages(REWARDS, GROUPS, std_norm=False)
    torch.testing.assert_close(g.advantages, torch.tensor([0.5, 0.25, -0.5, 0.25, 0.25, -0.75]))


def test_zero_variance_groups_are_exactly_zero_and_counted():
    # all-correct, all-wrong, a constant 0.1 group (whose float mean is not exactly 0.1) and a
    # single rollout: four zero-variance groups; one mixed group [1, 0].
    r = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.1, 0.1, 0.1, 1.0, 1.0, 0.0])
    gid = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 4, 4])
    for level in ("group", "batch"):
        g = group_advantages(r, gid, level=level)
        assert g.zero_variance_groups == 4 and g.num_groups == 5
        assert (g.advantages[:8] == 0).all()
        assert g.zero_variance.tolist() == [True] * 8 + [False] * 2
        assert (g.advantages[8:] != 0).all()


# --------------------------------------------------------------------------- properties


@st.composite
def batches(draw):
    """A random batch: groups of random size, binary or graded rewards, random masks, and
    log-probs that include -1e4 fillers and -inf on masked positions."""
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    B = sum(sizes)
    T = draw(st.integers(1, 7))
    group_ids = torch.tensor([g for g, n in enumerate(sizes) for _ in range(n)])
    graded = draw(st.booleans())
    vals = [0.0, 0.5, 1.0] if graded else [0.0, 1.0]
    rewards = torch.tensor(draw(st.lists(st.sampled_from(vals), min_size=B, max_size=B)))
    mask = torch.tensor(
        draw(st.lists(st.lists(st.booleans(), min_size=T, max_size=T), min_size=B, max_size=B))
    )
    lp = st.one_of(st.floats(-20.0, 0.0), st.just(-1e4), st.just(0.0))
    s = torch.tensor(draw(st.lists(st.lists(lp, min_size=T, max_size=T), min_size=B, max_size=B)))
    q = torch.tensor(draw(st.lists(st.lists(lp, min_size=T, max_size=T), min_size=B, max_size=B)))
    s = s.masked_fill(~mask, -math.inf)
    q = q.masked_fill(~mask, -math.inf)
    has_teacher = torch.tensor(draw(st.lists(st.booleans(), min_size=B, max_size=B)))
    return dict(
        rewards=rewards,
        group_ids=group_ids,
        mask=mask,
        student_logprobs=s,
        teacher_logprobs=q,
        has_teacher=has_teacher,
    )


def adv(preset: str, batch: dict, **over) -> torch.Tensor:
    return token_advantages(AlgorithmConfig.from_preset(preset, **over), **batch, step=3).advantages


PRESET_NAMES = [
    "grpo",
    "dr_grpo",
    "rlrt",
    "rlrt_all",
    "teacher_upweight",
    "rlsd",
    "opsd",
    "grpo_entropy",
]


@settings(max_examples=30, deadline=None)
@given(batches())
def test_every_preset_and_its_loss_are_finite_and_zero_off_the_mask(batch):
    for name in PRESET_NAMES:
        out = token_advantages(AlgorithmConfig.from_preset(name), **batch, step=7)
        assert torch.isfinite(out.advantages).all(), name
        assert (out.advantages[~batch["mask"]] == 0).all(), name
        assert not out.advantages.requires_grad
        assert all(math.isfinite(v) for v in out.metrics.values()), (name, out.metrics)
        # ... and so is the loss built on them, with its gradient: the current policy is the
        # teacher's log-probs (-1e4 fillers, -inf off the mask), the engine's likewise.
        c = AlgorithmConfig.from_preset(name, dual_clip_c=3.0, kl_coef=0.01)
        logp = batch["teacher_logprobs"].clone().requires_grad_(True)
        ent = torch.rand_like(logp).requires_grad_(True)
        res = policy_loss(
            logp,
            batch["student_logprobs"],
            out.advantages,
            batch["mask"],
            c,
            engine_logprobs=batch["teacher_logprobs"],
            ref_logprobs=batch["student_logprobs"],
            entropy=ent,
            norm_len=batch["mask"].shape[-1],  # Dr.GRPO's constant (the trainer: max_new_tokens)
        )
        res.loss.backward()
        assert torch.isfinite(res.loss) and torch.isfinite(logp.grad).all(), name
        assert all(torch.isfinite(v) for v in res.metrics.values()), name


@settings(max_examples=50, deadline=None)
@given(batches(), st.sampled_from([0.2, 0.5, 1.0]), st.sampled_from([0.0, 0.3, 0.5, 1.0]))
def test_rlrt_invariants(batch, eps_w, lam):
    grpo = adv("grpo", batch)
    out = token_advantages(AlgorithmConfig.from_preset("rlrt", eps_w=eps_w, lam=lam), **batch)
    a = out.advantages
    correct = batch["rewards"] == 1
    g = out.group.advantages
    # incorrect rows, and every row of a zero-variance group, are exactly GRPO.
    plain = ~correct | out.group.zero_variance
    assert torch.equal(a[plain], grpo[plain])
    # correct rows: A_t in A [1 - lam eps_w, 1 + lam eps_w] (A > 0 there).
    m = batch["mask"] & correct[:, None]
    lo = (g[:, None] * (1 - lam * eps_w)).expand_as(a)
    hi = (g[:, None] * (1 + lam * eps_w)).expand_as(a)
    tol = 1e-5 * g.abs().max().clamp(min=1)
    assert (a[m] >= lo[m] - tol).all() and (a[m] <= hi[m] + tol).all()
    # rows without a teacher score are GRPO as well.
    no_t = ~batch["has_teacher"]
    assert torch.equal(a[no_t], grpo[no_t])


@settings(max_examples=50, deadline=None)
@given(batches())
def test_ablations_differ_from_rlrt_only_where_the_spec_says(batch):
    rlrt, rlrt_all, up = adv("rlrt", batch), adv("rlrt_all", batch), adv("teacher_upweight", batch)
    correct = batch["rewards"] == 1
    # rlrt_all = rlrt on correct rows; the gate only adds incorrect rows.
    assert torch.equal(rlrt_all[correct], rlrt[correct])
    # teacher_upweight = rlrt on incorrect rows, and on correct rows it is rlrt with the
    # direction reversed, i.e. with s and q swapped.
    assert torch.equal(up[~correct], rlrt[~correct])
    swapped = dict(
        batch,
        student_logprobs=batch["teacher_logprobs"],
        teacher_logprobs=batch["student_logprobs"],
    )
    assert torch.equal(up, adv("rlrt", swapped))


def test_ablations_really_differ_on_a_mixed_group():
    # guard for the equality properties above: on a mixed group with D != 0 the variants move.
    batch = dict(
        rewards=torch.tensor([1.0, 1.0, 0.0]),
        group_ids=torch.zeros(3, dtype=torch.long),
        mask=torch.ones(3, 2, dtype=torch.bool),
        student_logprobs=torch.full((3, 2), -1.0),
        teacher_logprobs=torch.full((3, 2), -2.0),
    )
    rlrt, rlrt_all, up = adv("rlrt", batch), adv("rlrt_all", batch), adv("teacher_upweight", batch)
    assert not torch.equal(rlrt_all[2], rlrt[2])
    assert not torch.equal(up[0], rlrt[0])
    # D = 1 > 0 (self-driven): RLRT raises the credit, the teacher direction lowers it.
    assert (rlrt[0] > up[0]).all()


def test_correct_in_all_correct_group_needs_no_teacher():
    batch = dict(
        rewards=torch.tensor([1.0, 1.0]),
        group_ids=torch.zeros(2, dtype=torch.long),
        mask=torch.ones(2, 3, dtype=torch.bool),
        student_logprobs=torch.full((2, 3), -1.0),
    )
    out = token_advantages(AlgorithmConfig.from_preset("rlrt"), **batch)
    assert (out.advantages == 0).all()
    assert out.metrics["unscored_rows"] == 0 and out.metrics["zero_var_groups"] == 1

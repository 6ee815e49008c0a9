"""The policy loss by hand: PPO clip-higher, dual clip, the four aggregations, TIS, KL, entropy.

The hand case (eps_low 0.2, eps_high 0.28, so the ratio clip is [0.8, 1.28]):
    row 0: A = [ 1,   1,   -1 ]  ratio = [1.5, 0.9, 0.5]
    row 1: A = [-1,   2,  pad ]  ratio = [1.3, 1.1, pad]
    L_t = max(-A r, -A clip(r)):
    r0: max(-1.5, -1.28) = -1.28 (clipped high) | max(-0.9, -0.9) = -0.9 | max(0.5, 0.8) = 0.8 (clipped low)
    r1: max(1.3, 1.28) = 1.3 (pessimistic, unclipped) | max(-2.2, -2.2) = -2.2
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.algorithm import AlgorithmConfig, aggregate, policy_loss, token_advantages

ADV = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 2.0, 0.0]])
RATIO = torch.tensor([[1.5, 0.9, 0.5], [1.3, 1.1, 1.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -math.inf]])
L = torch.tensor([[-1.28, -0.9, 0.8], [1.3, -2.2, 0.0]])


def logp_param() -> torch.Tensor:
    lp = (OLD + RATIO.log()).masked_fill(~MASK, -math.inf)
    return lp.clone().requires_grad_(True)


def cfg(**over) -> AlgorithmConfig:
    return AlgorithmConfig.from_preset("grpo", **over)


@pytest.mark.parametrize(
    "mode, norm_len, want",
    [
        ("token-mean", None, -2.28 / 5),  # sum of L = -2.28 over 5 tokens
        ("seq-mean-token-mean", None, (-1.38 / 3 + -0.9 / 2) / 2),  # -0.46 and -0.45
        ("seq-mean-token-sum", None, (-1.38 + -0.9) / 2),
        ("seq-mean-token-sum-norm", 3, -2.28 / (2 * 3)),
        ("seq-mean-token-sum-norm", 4, -2.28 / (2 * 4)),
    ],
)
def test_aggregation_modes_by_hand(mode, norm_len, want):
    out = policy_loss(logp_param(), OLD, ADV, MASK, cfg(loss_agg=mode, loss_norm_len=norm_len))
    assert out.loss.item() == pytest.approx(want, abs=1e-6)
    assert aggregate(L, MASK, mode, norm_len=norm_len).item() == pytest.approx(want, abs=1e-6)


def test_clip_fractions_and_gradient():
    lp = logp_param()
    out = policy_loss(lp, OLD, ADV, MASK, cfg())
    out.loss.backward()
    # d(-A r)/d logp = -A r on unclipped tokens, 0 on clipped ones; token-mean divides by 5.
    want = torch.tensor([[0.0, -0.9, 0.0], [1.3, -2.2, 0.0]]) / 5
    torch.testing.assert_close(lp.grad, want)
    m = out.metrics
    assert m["clipfrac_high"].item() == pytest.approx(1 / 5)  # row 0 token 0
    assert m["clipfrac_low"].item() == pytest.approx(1 / 5)  # row 0 token 2
    assert m["dual_clip_frac"].item() == 0
    # approx KL(old || theta), k3: mean of (r - 1 - ln r) over the 5 tokens.
    k3 = sum(r - 1 - math.log(r) for r in (1.5, 0.9, 0.5, 1.3, 1.1)) / 5
    assert m["approx_kl"].item() == pytest.approx(k3, rel=1e-5)


def test_dual_clip_caps_negative_advantages():
    # A = -1, ratio 4: plain PPO loss max(4, 0.8) = 4; dual clip c = 3 caps it at 3, with
    # no gradient. A = -1, ratio 2: 2 < 3, untouched. A = +1, ratio 4: -1.28, dual clip n/a.
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    old = torch.zeros(1, 3)
    lp = torch.tensor([[4.0, 2.0, 4.0]]).log().requires_grad_(True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    plain = policy_loss(lp, old, adv, mask, cfg(loss_agg="seq-mean-token-sum")).loss
    assert plain.item() == pytest.approx(4 + 2 - 1.28, abs=1e-6)
    out = policy_loss(lp, old, adv, mask, cfg(loss_agg="seq-mean-token-sum", dual_clip_c=3.0))
    assert out.loss.item() == pytest.approx(3 + 2 - 1.28, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 2.0, 0.0]]))
    assert out.metrics["dual_clip_frac"].item() == pytest.approx(1 / 3)


def test_truncated_importance_weight_and_mismatch_kl():
    # s - e = ln 3 -> weight min(3, 2) = 2; s - e = ln 0.5 -> 0.5. ratio 1, A = 1: L = -w.
    old = torch.tensor([[-1.0, -1.0]])
    eng = old - torch.tensor([[math.log(3), math.log(0.5)]])
    lp = old.clone().requires_grad_(True)
    adv = torch.ones(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    c = cfg(loss_agg="seq-mean-token-sum")
    out = policy_loss(lp, old, adv, mask, c, engine_logprobs=eng)
    assert out.loss.item() == pytest.approx(-(2 + 0.5), abs=1e-6)
    # KL(engine || trainer), k3 with x = s - e: (3 - 1 - ln 3) and (0.5 - 1 - ln 0.5).
    kl = ((3 - 1 - math.log(3)) + (0.5 - 1 - math.log(0.5))) / 2
    assert out.metrics["mismatch_kl"].item() == pytest.approx(kl, rel=1e-5)
    assert out.metrics["tis_capped_frac"].item() == pytest.approx(0.5)
    off = policy_loss(
        lp, old, adv, mask, cfg(loss_agg="seq-mean-token-sum", tis_cap=None), engine_logprobs=eng
    )
    assert off.loss.item() == pytest.approx(-2.0, abs=1e-6)


@pytest.mark.parametrize("kind, per_token", [
    ("k1", -math.log(2)), ("k2", 0.5 * math.log(2) ** 2), ("k3", 2 - 1 - math.log(2)),
    ("low_var_kl", 2 - 1 - math.log(2))])
def test_kl_term(kind, per_token):
    # ref - logp = ln 2 on both tokens; A = 0, so the loss is kl_coef * KL.
    lp = torch.full((1, 2), -2.0, requires_grad=True)
    ref = lp.detach() + math.log(2)
    c = cfg(kl_coef=0.1, kl_type=kind)
    out = policy_loss(
        lp, lp.detach(), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), c, ref_logprobs=ref
    )
    assert out.loss.item() == pytest.approx(0.1 * per_token, rel=1e-5)
    with pytest.raises(ValueError):
        policy_loss(lp, lp.detach(), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), c)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_is_zero_at_the_reference_and_pulls_toward_it(kind):
    """KL term = 0 when policy == reference; its gradient moves logp toward ref (a descent
    step on the loss raises logp where logp < ref and lowers it where logp > ref); k2, k3 and
    low_var_kl have zero gradient at the reference (k1's is the constant 1 per token, its
    expectation under the policy being 0)."""
    mask = torch.ones(1, 3, dtype=torch.bool)
    ref = torch.tensor([[-1.0, -2.0, -0.5]])
    c = cfg(kl_coef=1.0, kl_type=kind, tis_cap=None)
    at = ref.clone().requires_grad_(True)
    out = policy_loss(at, at.detach(), torch.zeros(1, 3), mask, c, ref_logprobs=ref)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-7)
    assert out.metrics["kl"].item() == pytest.approx(0.0, abs=1e-7)
    out.loss.backward()
    if kind != "k1":
        assert at.grad.abs().max().item() == pytest.approx(0.0, abs=1e-7)
    lp = (ref + torch.tensor([[-0.5, 0.7, 0.0]])).requires_grad_(True)
    out = policy_loss(lp, lp.detach(), torch.zeros(1, 3), mask, c, ref_logprobs=ref)
    out.loss.backward()
    if kind == "k1":  # d(logp - ref)/d logp = 1 everywhere: always lowers logp
        assert (lp.grad > 0).all()
    else:
        assert lp.grad[0, 0] < 0 < lp.grad[0, 1]  # below ref: pushed up; above: down
        assert lp.grad[0, 2].item() == pytest.approx(0.0, abs=1e-7)
        assert out.metrics["kl"].item() > 0


def test_entropy_bonus_of_grpo_entropy():
    # A = 0, entropies [1, 3]: loss = -coef * mean(H) = -0.001 * 2; grad on H is -coef / 2.
    ent = torch.tensor([[1.0, 3.0]], requires_grad=True)
    lp = torch.zeros(1, 2, requires_grad=True)
    c = AlgorithmConfig.from_preset("grpo_entropy")
    out = policy_loss(
        lp, lp.detach(), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), c, entropy=ent
    )
    assert out.loss.item() == pytest.approx(-c.entropy_coef * 2.0)
    out.loss.backward()
    torch.testing.assert_close(ent.grad, torch.full((1, 2), -c.entropy_coef / 2))
    assert out.metrics["entropy"].item() == pytest.approx(2.0)


def test_dr_grpo_needs_a_constant_normaliser():
    """No silent default to the tensor's padded length (which differs per micro-batch)."""
    with pytest.raises(ValueError, match="constant norm_len"):
        aggregate(L, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="constant norm_len"):
        policy_loss(logp_param(), OLD, ADV, MASK, cfg(loss_agg="seq-mean-token-sum-norm"))
    # the trainer's constant (sampling.max_new_tokens) when the config leaves it unset
    out = policy_loss(logp_param(), OLD, ADV, MASK, cfg(loss_agg="seq-mean-token-sum-norm"),
                      norm_len=4)
    assert out.loss.item() == pytest.approx(-2.28 / (2 * 4), abs=1e-6)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_micro_batch_losses_add_up_to_the_batch_loss(mode):
    """Every aggregation mode: micro-batches trimmed to their own longest row (as
    TrainBatch.select does) and normalised by the whole batch's counts sum to the loss of the
    whole batch -- the Dr.GRPO bug was a per-micro-batch padded length here."""
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    lens = torch.tensor([9, 2, 7, 3, 5, 1])
    mask = torch.arange(T)[None, :] < lens[:, None]
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + 0.4 * torch.randn(B, T, generator=g)).masked_fill(~mask, -math.inf)
    adv = torch.randn(B, T, generator=g)
    c = cfg(loss_agg=mode)
    n_tok, n_seq = float(mask.sum()), float(B)
    full = policy_loss(logp, old, adv, mask, c, norm_len=16).loss
    total = 0.0
    order = sorted(range(B), key=lambda i: -int(lens[i]))  # length-sorted, as shard_rows
    for k in range(0, B, 2):
        rows = torch.tensor(order[k:k + 2])
        t = int(lens[rows].max())  # trimmed to the micro-batch's own longest row
        total += policy_loss(logp[rows, :t], old[rows, :t], adv[rows, :t], mask[rows, :t], c,
                             num_tokens=n_tok, num_seqs=n_seq, norm_len=16).loss.item()
    assert total == pytest.approx(full.item(), abs=1e-5)


def test_masked_inf_and_extreme_logprobs_give_finite_loss_and_grads():
    lp = torch.tensor([[-1e4, 0.0, -math.inf], [-3.0, -1e4, -math.inf]]).requires_grad_(True)
    old = torch.tensor([[0.0, -1e4, -math.inf], [-math.inf, -1e4, math.nan]])
    mask = torch.tensor([[True, True, False], [False, True, False]])
    adv = torch.tensor([[1.0, -1.0, math.nan], [2.0, 1.0, math.inf]])
    eng = torch.tensor([[-1e4, 0.0, -math.inf], [0.0, 0.0, -math.inf]])
    for mode in (
        "token-mean",
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
    ):
        lp.grad = None
        c = cfg(loss_agg=mode, dual_clip_c=3.0, kl_coef=0.1, loss_norm_len=3)
        out = policy_loss(lp, old, adv, mask, c, engine_logprobs=eng, ref_logprobs=old)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert torch.isfinite(lp.grad).all() and (lp.grad[~mask] == 0).all()
        assert all(torch.isfinite(v) for v in out.metrics.values())


def test_teacher_weight_carries_no_gradient_on_a_tiny_qwen3():
    """Even if the caller forgets to detach s and q, the weight w_t stays a constant: the
    gradient of the RLRT loss equals that of -sum_t A_kt logp_t / N with A_kt a constant
    (at ratio 1 no token is clipped and d ratio / d theta = d logp / d theta)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from trainer.algorithm import token_logprobs

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
        )
    )
    B, P, R = 4, 5, 6
    prompt = torch.randint(0, 64, (B, P))
    demo = torch.randint(0, 64, (B, P + 3))  # a different, longer "teacher" prefix
    resp = torch.randint(0, 64, (B, R))
    student_ids = torch.cat([prompt, resp], 1)
    teacher_ids = torch.cat([demo, resp], 1)

    def student() -> torch.Tensor:
        return token_logprobs(model, student_ids, chunk_size=7).logprobs[:, P:]

    logp = student()  # with grad
    q = token_logprobs(model, teacher_ids, chunk_size=7).logprobs[:, -R:]  # with grad too
    mask = torch.ones(B, R, dtype=torch.bool)
    mask[3, 4:] = False
    c = AlgorithmConfig.from_preset("rlrt")
    adv = token_advantages(
        c,
        rewards=torch.tensor([1.0, 1.0, 0.0, 1.0]),
        group_ids=torch.zeros(B, dtype=torch.long),
        mask=mask,
        student_logprobs=logp,
        teacher_logprobs=q,
    )
    assert not adv.advantages.requires_grad
    assert adv.metrics["reweighted_rows"] == 3  # the weights are really in play
    assert not torch.allclose(adv.advantages[0], adv.advantages[0, :1].expand(R))

    model.zero_grad()
    policy_loss(logp, logp.detach(), adv.advantages, mask, c).loss.backward()
    got = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    lp2 = student()
    (-(adv.advantages * lp2)[mask].sum() / mask.sum()).backward()
    for g, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)

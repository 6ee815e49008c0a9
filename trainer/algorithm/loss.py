"""The policy loss shared by every preset (docs/algorithm.md, "Equations and the code that computes them"):

    ratio_t = exp(logp_theta(y_t) - s_t)
    L_t     = -min(ratio_t A_kt, clip(ratio_t, 1 - eps_low, 1 + eps_high) A_kt)
    L_t     = min(L_t, -c A_kt)                  if dual clip and A_kt < 0
    L_t    *= min(exp(s_t - e_t), C)             truncated importance weight (engine mismatch)
    L_t    += kl_coef KL_t - entropy_coef H_t
    loss    = aggregate(L, mask)                 one of four aggregation modes

s_t is the behaviour policy's log-prob (the trainer's recomputation at the rollout's policy
version), e_t the engine's sampling log-prob. Only logp_theta (and the entropy) carry
gradients; everything else is detached here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.algorithm.config import AlgorithmConfig

# exp() of a log-ratio beyond this overflows float32 gradients; verl clamps the same way.
_LOG_RATIO_CLAMP = 20.0


def aggregate(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    *,
    norm_len: int | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> Tensor:
    """Reduce a per-token loss [B,T] to a scalar.

    token-mean:              sum_{i,t} L / N_tokens
    seq-mean-token-mean:     mean_i (sum_t L_i / n_i)        over sequences with n_i > 0
    seq-mean-token-sum:      mean_i (sum_t L_i)
    seq-mean-token-sum-norm: mean_i (sum_t L_i / norm_len)   (Dr.GRPO: a constant norm_len)

    num_tokens / num_seqs replace this micro-batch's own counts as the denominator: pass the
    counts of the whole optimiser batch (all micro-batches, all ranks) so that summing the
    micro-batch losses gives the batch's loss (multiply by the world size if the data-parallel
    engine averages gradients over ranks)."""
    mask = mask.to(loss_mat.dtype)
    n_tok = mask.sum(-1)  # [B]
    seq_has = n_tok > 0
    seqs = float(seq_has.sum()) if num_seqs is None else num_seqs
    seqs = max(seqs, 1.0)
    masked = torch.where(
        mask.bool(), loss_mat, torch.zeros((), device=loss_mat.device, dtype=loss_mat.dtype)
    )
    if mode == "token-mean":
        toks = float(mask.sum()) if num_tokens is None else num_tokens
        return masked.sum() / max(toks, 1.0)
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / n_tok.clamp(min=1)).sum() / seqs
    if mode == "seq-mean-token-sum":
        return masked.sum() / seqs
    if mode == "seq-mean-token-sum-norm":
        # A constant, never this tensor's padded length: micro-batches are trimmed to their own
        # longest row (and rows are length-sorted), so a per-tensor T would weight short rows
        # more -- the very length bias Dr.GRPO removes -- and break sum(micro) == batch.
        if norm_len is None:
            raise ValueError("seq-mean-token-sum-norm needs a constant norm_len (Dr.GRPO: the "
                             "max response length, e.g. sampling.max_new_tokens)")
        return masked.sum() / (seqs * float(norm_len))
    raise ValueError(f"unknown loss aggregation {mode!r}")


@dataclass
class PolicyLoss:
    loss: Tensor  # scalar, differentiable w.r.t. logprobs (and entropy)
    metrics: dict[str, Tensor]  # detached 0-d tensors (no host sync until the caller asks)


def _mmean(x: Tensor, m: Tensor) -> Tensor:
    return (x * m).sum() / m.sum().clamp(min=1)


# verl's bound on low_var_kl (kl_penalty "low_var_kl": clamp(k3, -10, 10)).
_LOW_VAR_KL_CLAMP = 10.0


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate from samples of pi_theta (Schulman's
    estimators), x = ref - logp: k1 = -x, k2 = x^2 / 2, k3 = exp(x) - x - 1, low_var_kl = k3
    clamped to [-10, 10] (verl). Gradients flow through logprobs."""
    x = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    if kind == "k1":
        return -x
    if kind == "k2":
        return 0.5 * x * x
    if kind == "k3":
        return torch.expm1(x) - x
    if kind == "low_var_kl":
        return (torch.expm1(x) - x).clamp(-_LOW_VAR_KL_CLAMP, _LOW_VAR_KL_CLAMP)
    raise ValueError(f"unknown kl type {kind!r}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: AlgorithmConfig,
    *,
    engine_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm_len: int | None = None,
) -> PolicyLoss:
    """PPO clip loss of one (micro-)batch. All [B,T]: logprobs = log pi_theta(y_t) with grad;
    old_logprobs = s_t; advantages = A_kt; mask = response tokens; engine_logprobs = e_t (the
    TIS weight is applied when given and cfg.tis_cap is set); ref_logprobs for the KL term
    (needed when cfg.kl_coef > 0); entropy H_t with grad (needed when cfg.entropy_coef > 0);
    norm_len: the constant of seq-mean-token-sum-norm when cfg.loss_norm_len is None (the
    trainer passes sampling.max_new_tokens).

    Masked positions may hold anything (-inf, NaN padding): they are replaced by 0 before any
    arithmetic, so they contribute neither loss nor NaN gradients."""
    m = mask.bool()
    mf = m.to(torch.float32)
    zero = torch.zeros((), device=logprobs.device)

    def clean(x: Tensor) -> Tensor:
        return torch.where(m, x.float(), zero)

    logp = clean(logprobs)
    old = clean(old_logprobs.detach())
    adv = clean(advantages.detach())

    log_ratio = (logp - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    pg = torch.maximum(pg1, pg2)
    dual = torch.zeros_like(m)
    if cfg.dual_clip_c is not None:
        capped = torch.minimum(pg, -adv * cfg.dual_clip_c)
        dual = (adv < 0) & (capped < pg)
        pg = torch.where(adv < 0, capped, pg)

    metrics: dict[str, Tensor] = {}
    if engine_logprobs is not None:
        eng = clean(engine_logprobs.detach())
        d = (old - eng).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # s_t - e_t
        # Mismatch KL(engine || trainer), sampled from the engine: k3 with x = s - e.
        metrics["mismatch_kl"] = _mmean(torch.expm1(d) - d, mf)
        metrics["mismatch_k1"] = _mmean(-d, mf)
        if cfg.tis_cap is not None:
            raw = torch.exp(d)
            tis = raw.clamp(max=cfg.tis_cap)
            pg = pg * tis
            metrics["tis_weight_mean"] = _mmean(tis, mf)
            metrics["tis_capped_frac"] = _mmean((raw > cfg.tis_cap).float(), mf)

    loss_mat = pg
    agg = dict(norm_len=cfg.loss_norm_len or norm_len, num_tokens=num_tokens, num_seqs=num_seqs)
    if cfg.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        kl = torch.where(m, kl_penalty(logp, clean(ref_logprobs.detach()), cfg.kl_type), zero)
        loss_mat = loss_mat + cfg.kl_coef * kl
        metrics["kl"] = _mmean(kl.detach(), mf)
    if entropy is not None:
        ent = clean(entropy)
        metrics["entropy"] = _mmean(ent.detach(), mf)
        if cfg.entropy_coef > 0:
            loss_mat = loss_mat - cfg.entropy_coef * ent
    elif cfg.entropy_coef > 0:
        raise ValueError("entropy_coef > 0 needs the entropy")

    loss = aggregate(loss_mat, m, cfg.loss_agg, **agg)
    with torch.no_grad():
        lr = log_ratio.detach()
        r = ratio.detach()
        metrics.update(
            pg_loss=aggregate(pg.detach(), m, cfg.loss_agg, **agg),
            clipfrac_low=_mmean(((adv < 0) & (r < 1.0 - cfg.clip_eps_low)).float(), mf),
            clipfrac_high=_mmean(((adv > 0) & (r > 1.0 + cfg.clip_eps_high)).float(), mf),
            dual_clip_frac=_mmean(dual.float(), mf),
            # KL(old || theta) from samples of old: k3 with x = logp - old.
            approx_kl=_mmean(torch.expm1(lr) - lr, mf),
            ratio_mean=_mmean(r, mf),
        )
    return PolicyLoss(loss=loss, metrics=metrics)

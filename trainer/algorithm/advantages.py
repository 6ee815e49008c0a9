"""Advantages: GRPO's group advantage A_k, then the per-token advantage A_kt of every preset.

The RLRT equations (docs/rlrt-method.md), line by line:

    A_k  = (r_k - mean(r)) / (std(r) + eps)                       group_advantages
    D_t  = s_t - q_t                                              token_advantages
    w_t  = exp(sign(A_k) * D_t)                                   teacher_weight
    A_kt = A_k ((1 - lam) + lam clip(w_t, 1 - eps_w, 1 + eps_w))  reweight   (if r_k == 1)
    A_kt = A_k                                                    otherwise

Everything here is a constant for the optimiser: the inputs are detached, so gradients flow
only through the PPO ratio in loss.py. Pure torch, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from trainer.algorithm.config import AlgorithmConfig

# |log-ratio| cap. Only reached by infinite or absurd log-probs (a masked -inf, a -1e4 filler);
# it cannot change a clipped weight (clip(exp(+-1e4)) is already at a bound), it only keeps
# the diagnostics and opsd's q - s finite.
LOG_RATIO_CAP = 1e4
WEIGHT_HIST_BINS = 10


@dataclass
class GroupAdvantages:
    advantages: Tensor  # [B] float32, A_k; exactly 0 in zero-variance groups
    zero_variance: Tensor  # [B] bool, the rollout's group has all-equal rewards
    num_groups: int
    zero_variance_groups: int


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    std_norm: bool = True,
    level: str = "group",
    eps: float = 1e-6,
) -> GroupAdvantages:
    """GRPO advantage per rollout. rewards [B] float, group_ids [B] int (any labels).

    A_k = r_k - mean_group(r), divided by std + eps when std_norm: the std of the group
    (level="group") or of all B rewards (level="batch", as TRL's scale_rewards="batch").
    std is the sample std (n - 1), as torch.std in verl and TRL. A group whose rewards are all
    equal carries no signal: its advantages are set to exactly 0 (not left to float noise
    divided by eps) and the group is counted."""
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)}")
    r = rewards.detach().to(torch.float64)
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts.numel()
    mean = torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, inv, r) / counts
    dev = r - mean[inv]
    rmax = torch.full((n,), -math.inf, dtype=r.dtype, device=r.device)
    rmin = torch.full((n,), math.inf, dtype=r.dtype, device=r.device)
    rmax = rmax.scatter_reduce(0, inv, r, "amax")
    rmin = rmin.scatter_reduce(0, inv, r, "amin")
    constant = rmax == rmin

    adv = dev
    if std_norm:
        if level == "group":
            ss = torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, inv, dev * dev)
            std = (ss / (counts - 1).clamp(min=1)).sqrt()[inv]
        elif level == "batch":
            std = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
        else:
            raise ValueError(f"unknown norm level {level!r}")
        adv = dev / (std + eps)
    zero_var = constant[inv]
    adv = torch.where(zero_var, torch.zeros_like(adv), adv)
    return GroupAdvantages(
        advantages=adv.to(torch.float32),
        zero_variance=zero_var,
        num_groups=n,
        zero_variance_groups=int(constant.sum()),
    )


def teacher_weight(adv: Tensor, log_ratio: Tensor, eps_w: float) -> tuple[Tensor, Tensor, Tensor]:
    """w_t = clip(exp(sign(A) * log_ratio), 1 - eps_w, 1 + eps_w), computed in log space so
    exp never overflows. adv [B], log_ratio [B,T] (D_t = s - q for RLRT, q - s for the teacher
    direction). Returns the clipped weight [B,T] and where it sits at the low / high bound."""
    x = torch.sign(adv)[:, None] * log_ratio
    hi = math.log1p(eps_w)
    lo = math.log(1.0 - eps_w) if eps_w < 1.0 else -math.inf
    w = torch.exp(x.clamp(max=hi)).clamp(min=1.0 - eps_w)
    return w, x <= lo, x >= hi


def reweight(adv: Tensor, w: Tensor, lam: float) -> Tensor:
    """A_kt = A_k ((1 - lam) + lam w_t): adv [B], clipped w [B,T] -> [B,T]."""
    return adv[:, None] * ((1.0 - lam) + lam * w)


@dataclass
class TokenAdvantages:
    advantages: Tensor  # [B,T] float32, A_kt; 0 outside the mask; never requires grad
    group: GroupAdvantages  # A_k and the zero-variance report
    weights: Tensor  # [B,T] clipped w_t where re-weighted, 1 elsewhere
    reweighted: Tensor  # [B] bool, rows whose tokens got a teacher weight (or opsd's q - s)
    unscored: Tensor  # [B] bool, rows that needed a teacher score but had none (plain GRPO)
    weight_hist: Tensor  # [WEIGHT_HIST_BINS] counts of clipped w_t over re-weighted tokens
    weight_hist_edges: Tensor  # [WEIGHT_HIST_BINS + 1] on [1 - eps_w, 1 + eps_w]
    metrics: dict[str, float] = field(default_factory=dict)


def _masked_mean(x: Tensor, m: Tensor) -> float:
    n = int(m.sum())
    return float(x[m].double().sum() / n) if n else 0.0


def _log_ratio(a: Tensor, b: Tensor, valid: Tensor) -> Tensor:
    """a - b where valid, 0 elsewhere; -inf - -inf (NaN) counts as equal, infinities capped."""
    d = torch.where(valid, a.float() - b.float(), torch.zeros((), device=a.device))
    return d.nan_to_num(0.0, LOG_RATIO_CAP, -LOG_RATIO_CAP).clamp(-LOG_RATIO_CAP, LOG_RATIO_CAP)


def _histogram(w: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    edges = torch.linspace(lo, hi, WEIGHT_HIST_BINS + 1)
    idx = ((w.float().cpu() - lo) / max(hi - lo, 1e-12) * WEIGHT_HIST_BINS).long()
    counts = torch.bincount(idx.clamp(0, WEIGHT_HIST_BINS - 1), minlength=WEIGHT_HIST_BINS)
    return counts, edges


@torch.no_grad()
def token_advantages(
    cfg: AlgorithmConfig,
    *,
    rewards: Tensor,
    group_ids: Tensor,
    mask: Tensor,
    student_logprobs: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    has_teacher: Tensor | None = None,
    correct: Tensor | None = None,
    step: int = 0,
) -> TokenAdvantages:
    """Per-token advantages A_kt [B,T] for the preset in `cfg`.

    rewards [B]; group_ids [B] int; mask [B,T] (response tokens); student_logprobs s [B,T]
    (behaviour policy, trainer's recomputation); teacher_logprobs q [B,T], read only in rows
    where has_teacher [B] bool (default: every row when q is given); correct [B] bool, the
    gate (default: r_k == 1 as in the spec); step: the trainer step, for lam's schedule.

    A row that needs a teacher score (gated, A_k != 0) but has none keeps A_k (w_t = 1) and
    is counted in metrics["unscored_rows"]; for opsd such a row gets advantage 0."""
    mask = mask.bool()
    B, T = mask.shape
    device = mask.device
    if correct is None:
        correct = rewards == 1
    correct = correct.bool().to(device)
    if has_teacher is None:
        has_teacher = torch.full((B,), teacher_logprobs is not None, device=device)
    has_teacher = has_teacher.bool().to(device)
    if teacher_logprobs is None:
        has_teacher = torch.zeros_like(has_teacher)
    if teacher_logprobs is not None and student_logprobs is None:
        raise ValueError("teacher log-probs need the student log-probs s_t too")

    g = group_advantages(
        rewards.to(device),
        group_ids.to(device),
        std_norm=cfg.std_norm,
        level=cfg.norm_level,
        eps=cfg.adv_eps,
    )
    adv = g.advantages
    weights = torch.ones(B, T, device=device)
    lam = cfg.lam_at(step)

    # D_t = s_t - q_t on every scored token (also used for diagnostics beyond the gate).
    scored_tok = mask & has_teacher[:, None]
    D = (
        _log_ratio(student_logprobs, teacher_logprobs, scored_tok)
        if teacher_logprobs is not None
        else torch.zeros(B, T, device=device)
    )

    if cfg.advantage == "self_distill":
        # opsd: no reward; the advantage of a sampled token is q_t - s_t = -D_t.
        need = torch.ones(B, dtype=torch.bool, device=device)
        rows = need & has_teacher
        out = torch.where(mask & rows[:, None], -D, torch.zeros((), device=device))
        at_lo = at_hi = torch.zeros(B, T, dtype=torch.bool, device=device)
    else:
        out = adv[:, None].expand(B, T).clone()
        if cfg.teacher_weight == "none":
            need = torch.zeros(B, dtype=torch.bool, device=device)
        else:
            gate = correct if cfg.weight_gate == "correct" else torch.ones_like(correct)
            need = gate & (adv != 0)  # A_k = 0 rows stay 0 whatever the weight
        rows = need & has_teacher
        log_ratio = D if cfg.teacher_weight == "reversed" else -D
        w, at_lo, at_hi = teacher_weight(adv, log_ratio, cfg.eps_w)
        sel = rows[:, None].expand(B, T)
        weights = torch.where(sel, w, weights)
        out = torch.where(sel, reweight(adv, w, lam), out)
        out = torch.where(mask, out, torch.zeros((), device=device))

    # Diagnostics. Tokens that got a weight: masked tokens of re-weighted rows.
    wtok = mask & rows[:, None]
    lo_b, hi_b = max(0.0, 1.0 - cfg.eps_w), 1.0 + cfg.eps_w
    hist, edges = _histogram(weights[wtok], lo_b, hi_b)
    self_tok = scored_tok & correct[:, None]
    metrics = {
        "num_groups": float(g.num_groups),
        "zero_var_groups": float(g.zero_variance_groups),
        "adv_mean": _masked_mean(out, mask),
        "adv_abs_mean": _masked_mean(out.abs(), mask),
        "lam": lam,
        "scored_rows": float(has_teacher.sum()),
        "reweighted_rows": float(rows.sum()),
        "unscored_rows": float((need & ~has_teacher).sum()),
        "self_driven_share": _masked_mean((D > 0).float(), self_tok),
        "mean_D": _masked_mean(D, scored_tok),
        "mean_D_correct": _masked_mean(D, self_tok),
        "weight_mean": _masked_mean(weights, wtok),
        "clip_low_share": _masked_mean(at_lo.float(), wtok),
        "clip_high_share": _masked_mean(at_hi.float(), wtok),
    }
    return TokenAdvantages(
        advantages=out.float(),
        group=g,
        weights=weights,
        reweighted=rows,
        unscored=need & ~has_teacher,
        weight_hist=hist,
        weight_hist_edges=edges,
        metrics=metrics,
    )

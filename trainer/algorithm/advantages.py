"""Advantages: GRPO's group advantage A_k, then the per-token advantage A_kt of every preset.

The RLRT equations (docs/algorithm.md, "Equations and the code that computes them"), line by line:

    A_k  = (r_k - mean(r)) / (std(r) + eps)                       group_advantages
    D_t  = q_t - s_t = log P_T - log P_S  (the paper's sign)      token_advantages
    w_t  = exp(-sign(A_k) * D_t) = (P_S / P_T)^sign(A_k)          teacher_weight
    A_kt = A_k ((1 - lam) + lam clip(w_t, 1 - eps_w, 1 + eps_w))  reweight   (if r_k == 1)
    A_kt = A_k                                                    otherwise

Everything here is a constant for the optimiser: the inputs are detached, so gradients flow
only through the PPO ratio in loss.py. Pure torch, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from protocol.estimators import get_adv_est
from trainer.algorithm.config import AlgorithmConfig

# |log-ratio| cap. Only reached by infinite or absurd log-probs (a masked -inf, a -1e4 filler);
# it cannot change a clipped weight (clip(exp(+-1e4)) is already at a bound), it only keeps
# the diagnostics and opsd's q - s finite.
LOG_RATIO_CAP = 1e4
WEIGHT_HIST_BINS = 10


@dataclass
class GroupAdvantages:
    advantages: Tensor  # [B] float32, A_k; exactly 0 in zero-variance groups
    zero_variance: Tensor  # [B] bool, the rollout's group carries no signal (all A_k = 0)
    zero_advantage: Tensor  # [B] bool, A_k = 0 (the registry's test; forced exactly to 0)
    num_groups: int
    zero_variance_groups: int


def _zero_advantage_rows(r: Tensor, inv: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """([B] the response has A_k = 0, [n] the group carries no signal), by the registry's
    GRPO test applied group by group (a Python loop over B floats: negligible)."""
    est = get_adv_est("grpo")
    rows: list[list[int]] = [[] for _ in range(n)]
    for i, gi in enumerate(inv.tolist()):
        rows[gi].append(i)
    values = r.tolist()
    zero = [False] * len(values)
    constant = [False] * n
    for gi, idx in enumerate(rows):
        z = est.zero_advantage([values[i] for i in idx])
        constant[gi] = all(z)
        for i, zi in zip(idx, z, strict=True):
            zero[i] = zi
    return (torch.tensor(zero, dtype=torch.bool, device=r.device),
            torch.tensor(constant, dtype=torch.bool, device=r.device))


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
    divided by eps) and the group is counted. Which responses have A_k = 0 is decided by the
    estimator registry's test (protocol/estimators.py: a reward within ZERO_ADV_TOL of its
    group mean), the same test the teacher service uses to decide who needs a score."""
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)}")
    r = rewards.detach().to(torch.float64)
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts.numel()
    mean = torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, inv, r) / counts
    dev = r - mean[inv]
    zero, constant = _zero_advantage_rows(r, inv, n)

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
    adv = torch.where(zero, torch.zeros_like(adv), adv)
    return GroupAdvantages(
        advantages=adv.to(torch.float32),
        zero_variance=zero_var,
        zero_advantage=zero,
        num_groups=n,
        zero_variance_groups=int(constant.sum()),
    )


def teacher_weight(adv: Tensor, log_ratio: Tensor, eps_w: float) -> tuple[Tensor, Tensor, Tensor]:
    """w_t = clip(exp(sign(A) * log_ratio), 1 - eps_w, 1 + eps_w), computed in log space so
    exp never overflows. adv [B], log_ratio [B,T] (s - q = -D_t for RLRT, q - s = D_t for the
    teacher direction). Returns the clipped weight [B,T] and where it sits at the low / high
    bound."""
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


@dataclass
class EstimatorInputs:
    """What a token-advantage formula reads: the batch's tensors, already on one device."""

    cfg: AlgorithmConfig
    group: GroupAdvantages  # A_k and the zero-advantage report
    mask: Tensor  # [B,T] bool, response tokens
    D: Tensor  # [B,T] D_t = q_t - s_t (the paper's sign) on scored tokens, 0 elsewhere
    has_teacher: Tensor  # [B] bool
    correct: Tensor  # [B] bool, the gate
    lam: float  # lam at this step
    s_engine: Tensor | None = None  # [B,T] an engine's s_t of the same tokens, for engine_mismatch
    has_s_engine: Tensor | None = None  # [B] bool, rows where s_engine holds scores
    s_trainer: Tensor | None = None  # [B,T] the trainer's s_t (pi_old), for engine_mismatch


@dataclass
class EstimatorOutput:
    advantages: Tensor  # [B,T] A_kt, 0 off the mask
    weights: Tensor  # [B,T] clipped w_t where re-weighted, 1 elsewhere
    need: Tensor  # [B] bool, rows that need a teacher score
    at_lo: Tensor  # [B,T] bool, w_t at the low clip bound
    at_hi: Tensor  # [B,T] bool, w_t at the high clip bound


Formula = Callable[[EstimatorInputs], EstimatorOutput]
# The torch formula of each estimator declared in protocol/estimators.py (its facts: teacher
# scope, zero-advantage test), registered under the same name by `adv_formula`.
ADV_FORMULAS: dict[str, Formula] = {}


def adv_formula(name: str) -> Callable[[Formula], Formula]:
    """Register the formula of the estimator `name`, which protocol/estimators.py must declare
    (so the teacher service knows its scope and zero-advantage test too)."""
    get_adv_est(name)

    def wrap(fn: Formula) -> Formula:
        ADV_FORMULAS[name] = fn
        return fn

    return wrap


@adv_formula("grpo")
def grpo_formula(x: EstimatorInputs) -> EstimatorOutput:
    """A_kt = A_k, re-weighted on the gated rows that have a teacher score:
    A_kt = A_k ((1 - lam) + lam clip(w_t)), w_t = exp(-sign(A_k) D_t) (reversed, RLRT:
    (P_S/P_T)^sign(A)) or exp(sign(A_k) D_t) (teacher direction). A_k = 0 rows stay 0 whatever
    the weight. A row that needs a score but has none keeps A_k (lone_correct: grpo) or gets 0
    (lone_correct: skip)."""
    cfg, adv, mask = x.cfg, x.group.advantages, x.mask
    B, T = mask.shape
    out = adv[:, None].expand(B, T).clone()
    weights = torch.ones(B, T, device=mask.device)
    if cfg.teacher_weight == "none":
        need = torch.zeros(B, dtype=torch.bool, device=mask.device)
    else:
        gate = x.correct if cfg.weight_gate == "correct" else torch.ones_like(x.correct)
        need = gate & ~x.group.zero_advantage
    rows = need & x.has_teacher
    log_ratio = -x.D if cfg.teacher_weight == "reversed" else x.D
    w, at_lo, at_hi = teacher_weight(adv, log_ratio, cfg.eps_w)
    sel = rows[:, None].expand(B, T)
    weights = torch.where(sel, w, weights)
    out = torch.where(sel, reweight(adv, w, x.lam), out)
    if cfg.lone_correct == "skip":  # no demonstration: no gradient rather than plain GRPO
        out = torch.where((need & ~x.has_teacher)[:, None], torch.zeros((), device=mask.device),
                          out)
    out = torch.where(mask, out, torch.zeros((), device=mask.device))
    return EstimatorOutput(out, weights, need, at_lo, at_hi)


@adv_formula("self_distill")
def self_distill_formula(x: EstimatorInputs) -> EstimatorOutput:
    """opsd: no reward; the advantage of a sampled token is q_t - s_t = D_t, on every row that
    has a teacher score (a row without one gets 0: it has no other signal)."""
    mask = x.mask
    B, T = mask.shape
    need = torch.ones(B, dtype=torch.bool, device=mask.device)
    rows = need & x.has_teacher
    out = torch.where(mask & rows[:, None], x.D, torch.zeros((), device=mask.device))
    none = torch.zeros(B, T, dtype=torch.bool, device=mask.device)
    return EstimatorOutput(out, torch.ones(B, T, device=mask.device), need, none, none)


def _diagnostics(x: EstimatorInputs, o: EstimatorOutput, rows: Tensor
                 ) -> tuple[dict[str, float], Tensor, Tensor]:
    """Metrics and the weight histogram. Tokens that got a weight: masked tokens of
    re-weighted rows; D (the paper's sign, q - s) on scored tokens (also beyond the gate).
    Self-driven tokens (RLRT up-weights them when A > 0): the student more sure than the
    teacher, s > q, i.e. D < 0."""
    cfg, mask = x.cfg, x.mask
    scored_tok = mask & x.has_teacher[:, None]
    wtok = mask & rows[:, None]
    self_tok = scored_tok & x.correct[:, None]
    hist, edges = _histogram(o.weights[wtok], max(0.0, 1.0 - cfg.eps_w), 1.0 + cfg.eps_w)
    metrics = {
        "num_groups": float(x.group.num_groups),
        "zero_var_groups": float(x.group.zero_variance_groups),
        "adv_mean": _masked_mean(o.advantages, mask),
        "adv_abs_mean": _masked_mean(o.advantages.abs(), mask),
        "lam": x.lam,
        "scored_rows": float(x.has_teacher.sum()),
        "reweighted_rows": float(rows.sum()),
        "unscored_rows": float((o.need & ~x.has_teacher).sum()),
        "self_driven_share": _masked_mean((x.D < 0).float(), self_tok),
        "mean_D": _masked_mean(x.D, scored_tok),
        "mean_D_correct": _masked_mean(x.D, self_tok),
        "mean_abs_D_correct": _masked_mean(x.D.abs(), self_tok),
        "weight_mean": _masked_mean(o.weights, wtok),
        "clip_low_share": _masked_mean(o.at_lo.float(), wtok),
        "clip_high_share": _masked_mean(o.at_hi.float(), wtok),
        "clip_share": _masked_mean((o.at_lo | o.at_hi).float(), wtok),
    }
    if x.s_engine is not None and x.has_s_engine is not None and x.s_trainer is not None:
        # |s_trainer - s_engine|: the kernel mismatch between the two numeric stacks on the
        # tokens D is computed on (docs/engines.md, "Engine mismatch").
        etok = scored_tok & x.has_s_engine[:, None]
        gap = _log_ratio(x.s_trainer, x.s_engine, etok).abs()
        metrics["engine_mismatch"] = _masked_mean(gap, etok)
        metrics["engine_mismatch_tokens"] = float(etok.sum())
        # Signed, s_engine - s_trainer: in engine mode, exactly what separates mean_D_trainer
        # from mean_D on these tokens (D_trainer - D_engine = s_engine - s_trainer), where the
        # absolute value above hides whether the two stacks differ by noise or by a bias.
        metrics["engine_mismatch_signed"] = _masked_mean(
            _log_ratio(x.s_engine, x.s_trainer, etok), etok)
    return metrics, hist, edges


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
    engine_student_logprobs: Tensor | None = None,
    has_engine_student: Tensor | None = None,
) -> TokenAdvantages:
    """Per-token advantages A_kt [B,T] of the estimator `cfg.advantage` (ADV_FORMULAS).

    rewards [B]; group_ids [B] int; mask [B,T] (response tokens); student_logprobs s [B,T]
    (behaviour policy, trainer's recomputation); teacher_logprobs q [B,T], read only in rows
    where has_teacher [B] bool (default: every row when q is given); correct [B] bool, the
    gate (default: r_k == 1 as in the spec); step: the trainer step, for lam's schedule.
    engine_student_logprobs [B,T]: an inference engine's s_t of the same tokens, in rows where
    has_engine_student [B] bool; with cfg.student_logprobs == "engine" D_t = q_t - s_t takes
    s_t from it (rows without it: the trainer's, counted in student_engine_missing_rows), and
    metrics["engine_mismatch"] = mean |s_trainer - s_engine| over scored tokens either way
    (engine_mismatch_signed: mean s_engine - s_trainer); in engine mode also
    metrics["mean_D_trainer"], the trainer-based D on the same tokens as mean_D.

    A row that needs a teacher score (gated, A_k != 0) but has none keeps A_k (w_t = 1;
    lone_correct: skip gives it 0) and is counted in metrics["unscored_rows"]; for opsd such a
    row gets advantage 0."""
    mask = mask.bool()
    B, T = mask.shape
    device = mask.device
    correct = (rewards == 1 if correct is None else correct).bool().to(device)
    if has_teacher is None:
        has_teacher = torch.full((B,), teacher_logprobs is not None, device=device)
    has_teacher = has_teacher.bool().to(device)
    if teacher_logprobs is None:
        has_teacher = torch.zeros_like(has_teacher)
    elif student_logprobs is None:
        raise ValueError("teacher log-probs need the student log-probs s_t too")
    g = group_advantages(rewards.to(device), group_ids.to(device), std_norm=cfg.std_norm,
                         level=cfg.norm_level, eps=cfg.adv_eps)
    scored_tok = mask & has_teacher[:, None]
    if engine_student_logprobs is not None:
        has_engine_student = (torch.ones(B, dtype=torch.bool, device=device)
                              if has_engine_student is None
                              else has_engine_student.bool().to(device))
    s_for_d = student_logprobs
    if cfg.student_logprobs == "engine" and engine_student_logprobs is not None:
        assert has_engine_student is not None and student_logprobs is not None
        s_for_d = torch.where(has_engine_student[:, None], engine_student_logprobs.float(),
                              student_logprobs.float())
    D = (_log_ratio(teacher_logprobs, s_for_d, scored_tok)
         if teacher_logprobs is not None else torch.zeros(B, T, device=device))
    x = EstimatorInputs(cfg, g, mask, D, has_teacher, correct, cfg.lam_at(step),
                        s_engine=engine_student_logprobs, has_s_engine=has_engine_student,
                        s_trainer=student_logprobs)
    o = ADV_FORMULAS[cfg.advantage](x)
    rows = o.need & has_teacher
    metrics, hist, edges = _diagnostics(x, o, rows)
    if cfg.student_logprobs == "engine":
        with_engine = (has_engine_student if engine_student_logprobs is not None
                       else torch.zeros_like(has_teacher))
        metrics["student_engine_missing_rows"] = float((has_teacher & ~with_engine).sum())
        # The trainer-based D on the same scored tokens as mean_D, so that one engine-mode run
        # shows both D's side by side: mean_D_trainer - mean_D = engine_mismatch_signed x
        # engine_mismatch_tokens / scored tokens (rows without engine scores differ by 0).
        d_trainer = (_log_ratio(teacher_logprobs, student_logprobs, scored_tok)
                     if teacher_logprobs is not None else D)
        metrics["mean_D_trainer"] = _masked_mean(d_trainer, scored_tok)
    return TokenAdvantages(
        advantages=o.advantages.float(),
        group=g,
        weights=o.weights,
        reweighted=rows,
        unscored=o.need & ~has_teacher,
        weight_hist=hist,
        weight_hist_edges=edges,
        metrics=metrics,
    )

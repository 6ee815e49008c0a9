"""AlgorithmConfig: every knob of the algorithm, and the presets as named bundles of them.

A preset is only a dict of knob values. A config names a preset and overrides any knob:

    AlgorithmConfig.from_preset("rlrt", lam=0.3)
    AlgorithmConfig.model_validate({"preset": "rlrt", "eps_w": 0.5})   # e.g. from YAML

Explicit keys win over the preset's values, which win over the field defaults. So a new
variant is a YAML block, no code (see docs/algorithm.md).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.estimators import ADV_ESTIMATORS, Scope, get_adv_est
from protocol.messages import TeacherRequest
from tasks.teacher import ContextMode

LossAgg = Literal[
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]

# Teacher scopes from narrowest to widest; each includes the ones before it.
_SCOPE_ORDER: tuple[Scope, ...] = ("none", "correct_mixed", "nonzero_adv", "all")

# The paper's clip range of w_t per backbone kind (docs/algorithm.md, "Presets": "eps_w = 1.0
# for base models, 0.5 for instruct, 0.2 for thinking models").
EPS_W_BY_MODEL_KIND: dict[str, float] = {"base": 1.0, "instruct": 0.5, "thinking": 0.2}

# The spec's "Algorithms to offer" table. Only the knobs that differ from the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {},
    "dr_grpo": {"std_norm": False, "loss_agg": "seq-mean-token-sum-norm"},
    "rlrt": {"teacher_weight": "reversed", "weight_gate": "correct", "lam": 0.5, "eps_w": 1.0},
    "rlrt_all": {"teacher_weight": "reversed", "weight_gate": "all", "lam": 0.5, "eps_w": 1.0},
    "teacher_upweight": {
        "teacher_weight": "teacher",
        "weight_gate": "correct",
        "lam": 0.5,
        "eps_w": 1.0,
    },
    "rlsd": {
        "teacher_weight": "teacher",
        "weight_gate": "all",
        "lam": 0.5,
        "lam_schedule": "linear_decay",
        "lam_decay_steps": 50,
        "eps_w": 0.2,
        "context_mode": "reference_answer",
    },
    "opsd": {"advantage": "self_distill", "context_mode": "reference_solution"},
    "grpo_entropy": {"entropy_coef": 1e-3},
}


class AlgorithmConfig(BaseModel):
    """All knobs of the token advantage and the policy loss. Frozen: build a new one to change."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = Field(
        "grpo",
        description="name of the bundle of knob values to start from (see PRESETS); every "
        "other key given explicitly overrides the preset's value",
    )

    # ---- outcome advantage A_k (GRPO) -------------------------------------------------------
    advantage: str = Field(
        "grpo",
        description="the advantage estimator, a name registered in protocol/estimators.py "
        "(facts: teacher scope, zero-advantage test) and trainer/algorithm/advantages.py "
        "(formula). grpo: A_k from the rewards of the group, optionally re-weighted per token "
        "by the teacher; self_distill (opsd): no reward, A_kt = q_t - s_t on every token",
    )
    std_norm: bool = Field(
        True,
        description="divide A_k = r_k - mean_group(r) by std(r) + adv_eps (GRPO); off = Dr.GRPO",
    )
    norm_level: Literal["group", "batch"] = Field(
        "group",
        description="std over the rollout's group, or over the whole batch's rewards; the "
        "mean subtracted is always the group's (the baseline of GRPO)",
    )
    adv_eps: float = Field(1e-6, gt=0, description="added to the std before dividing")

    # ---- teacher re-weighting of A_k per token (RLRT and its contrasts) -------------------
    teacher_weight: Literal["none", "reversed", "teacher"] = Field(
        "none",
        description="none: A_kt = A_k; reversed (RLRT): w_t = exp(-sign(A) D_t) = "
        "(P_S/P_T)^sign(A) with the paper's D_t = q_t - s_t; teacher (RLSD direction): "
        "w_t = exp(sign(A) D_t)",
    )
    weight_gate: Literal["correct", "all"] = Field(
        "correct",
        description="which rollouts are re-weighted: correct ones only (RLRT; the paper found "
        "it essential) or all (the rlrt_all ablation, rlsd); the rest keep A_k",
    )
    lam: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="lambda: A_kt = A_k ((1 - lam) + lam clip(w_t, 1 - eps_w, 1 + eps_w))",
    )
    lam_schedule: Literal["constant", "linear_decay"] = Field(
        "constant",
        description="constant lam, or lam (1 - step / lam_decay_steps) floored at 0 (rlsd)",
    )
    lam_decay_steps: int = Field(50, ge=1, description="steps for linear_decay to reach 0")
    eps_w: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="clip range of w_t: the paper uses 1.0 for base, 0.5 for instruct and 0.2 "
        "for thinking models (set `model_kind` to get those); <= 1 keeps the lower bound >= 0",
    )
    model_kind: Literal["base", "instruct", "thinking"] | None = Field(
        None,
        description="the backbone's kind; sets eps_w to the paper's value for it (base 1.0, "
        "instruct 0.5, thinking 0.2) over the preset's; an explicit eps_w still wins. None = "
        "the preset's eps_w",
    )

    # ---- teacher context c (sent to the teacher service as TeacherRequest) ---------------
    teacher_scope: Scope | None = Field(
        None,
        description="which responses get teacher scores: none, correct_mixed, nonzero_adv, "
        "all; None = the narrowest scope the other knobs need (a wider one may be given, "
        "e.g. to log D on every response; a narrower one is an error)",
    )
    context_mode: ContextMode = Field(
        "sibling",
        description="demonstration c: a different correct response of the group (sibling), "
        "the dataset's reference_solution, or its reference_answer",
    )
    fallback_to_solution: bool = Field(
        True,
        description="sibling mode: use the reference solution when no other response is "
        "correct; without either the response keeps w_t = 1",
    )
    lone_correct: Literal["grpo", "skip"] = Field(
        "grpo",
        description="what a rollout the teacher scope wants scored but that has no teacher "
        "score trains as. In sibling mode that is a lone correct rollout (no other correct "
        "sibling) without a reference solution (with one, fallback_to_solution makes the "
        "solution its demonstration: the 'reference' choice), or a context the engine "
        "refused. grpo: plain A_k, w_t = 1 (SDPO does the same; in a 1-of-8 group that is the "
        "largest advantage of the batch, about +2.47); skip: advantage 0 on its tokens (no "
        "gradient; they still count in the token-mean denominator). opsd always gives such a "
        "row 0",
    )
    strip_think: bool = Field(True, description="remove <think>...</think> from the sibling")
    student_logprobs: Literal["trainer", "engine"] = Field(
        "trainer",
        description="where the s_t of D_t = q_t - s_t comes from. trainer: the trainer's "
        "forward (pi_old, also the PPO ratio's denominator); D then also carries the kernel "
        "mismatch between the inference engine (q_t) and the trainer (s_t). engine: the "
        "teacher service also scores the student context (prompt + response, no "
        "demonstration) in the same engine and request batch as q_t, and D is the difference "
        "of two engine scores (as in the paper's stack, where both come from one actor), at "
        "one extra prefill of prompt + response per scored response (teacher_tokens_student). "
        "The PPO ratio still uses the trainer's s_t. docs/algorithm.md, 'Where s_t of D comes "
        "from'",
    )
    teacher_template: str | None = Field(
        None,
        description="user message with {prompt} and {demonstration}; None = the spec's "
        "'{prompt}\\n\\nCorrect solution:\\n\\n{demonstration}\\n\\nCorrectly solve the "
        "original question.\\n'",
    )
    teacher_seed: int = Field(0, description="seeds the choice among several correct siblings")
    teacher_version: Literal["match_s", "any"] | None = Field(
        None,
        description="which policy version q_t may come from. match_s: the version of s_t (the "
        "trainer's weights that begin the step; the paper's current-policy teacher): a group "
        "scored by an older teacher is sent back to the teacher service and rescored at the "
        "trainer's version before it is trained on; any: whatever version scored it (recorded "
        "and reported as teacher_version_lag). None = match_s for presets that use a teacher",
    )
    teacher_temperature: float | None = Field(
        None,
        gt=0,
        description="temperature of q_t. The teacher engines score raw log-probs (temperature "
        "1, services/engines/base.py), while s_t follows the sampling temperature: a teacher "
        "preset sampling at temperature != 1 is a config error unless this is set, and only "
        "1.0 (accept q at T = 1) is servable today",
    )

    # ---- policy loss ------------------------------------------------------------------------
    loss_agg: LossAgg = Field(
        "token-mean",
        description="token-mean: sum over all tokens / token count; seq-mean-token-mean: mean "
        "over sequences of each one's token mean; seq-mean-token-sum: mean over sequences of "
        "token sums; seq-mean-token-sum-norm (Dr.GRPO): token sum / loss_norm_len, mean over "
        "sequences",
    )
    loss_norm_len: int | None = Field(
        None,
        ge=1,
        description="the constant of seq-mean-token-sum-norm (Dr.GRPO uses the max response "
        "length); None = the padded length T of the batch",
    )
    clip_eps_low: float = Field(0.2, ge=0.0, description="PPO ratio clip below: 1 - eps_low")
    clip_eps_high: float = Field(
        0.28, ge=0.0, description="PPO ratio clip above: 1 + eps_high (clip-higher, DAPO)"
    )
    dual_clip_c: float | None = Field(
        None,
        gt=1.0,
        description="dual clip: for A < 0 the loss is capped at -c A (c = 3 typical); None = off",
    )
    tis_cap: float | None = Field(
        2.0,
        gt=0.0,
        description="truncated importance weight min(exp(s_t - e_t), C) against the engine's "
        "sampling log-probs e_t (train/rollout mismatch); None = off",
    )
    kl_coef: float = Field(
        0.0,
        ge=0.0,
        description="weight of the KL to a frozen reference policy in the loss (its log-probs "
        "computed by the trainer once per step; trainer.ref_model_path); 0 = off",
    )
    kl_type: Literal["k1", "k2", "k3", "low_var_kl"] = Field(
        "low_var_kl",
        description="KL(pi_theta || pi_ref) estimator with x = ref - logp (Schulman): k1 = -x; "
        "k2 = x^2 / 2; k3 = exp(x) - x - 1 (non-negative, lower variance); low_var_kl = k3 "
        "clamped to [-10, 10] (verl's default `low_var_kl`)",
    )
    entropy_coef: float = Field(
        0.0, ge=0.0, description="entropy bonus: loss -= entropy_coef * entropy; 0 = off"
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("preset", "grpo")
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        out = {**PRESETS[name], **data, "preset": name}
        kind = data.get("model_kind")
        if kind in EPS_W_BY_MODEL_KIND and "eps_w" not in data:
            out["eps_w"] = EPS_W_BY_MODEL_KIND[kind]  # the kind beats the preset's eps_w
        return out

    @model_validator(mode="after")
    def _consistent(self) -> AlgorithmConfig:
        if self.advantage not in ADV_ESTIMATORS:
            raise ValueError(f"unknown advantage estimator {self.advantage!r}; known: "
                             f"{sorted(ADV_ESTIMATORS)}")
        if self.teacher_temperature is not None and self.teacher_temperature != 1.0:
            raise ValueError(
                f"teacher_temperature={self.teacher_temperature}: the teacher engines score raw "
                "log-probs (temperature 1) only (services/engines/base.py); set 1.0 to accept "
                "q_t at temperature 1")
        if self.advantage == "self_distill" and self.teacher_weight != "none":
            raise ValueError("advantage='self_distill' replaces A_k; teacher_weight must be 'none'")
        if self.teacher_scope is not None:
            need = _SCOPE_ORDER.index(self.required_scope)
            if _SCOPE_ORDER.index(self.teacher_scope) < need:
                raise ValueError(
                    f"teacher_scope={self.teacher_scope!r} is narrower than the "
                    f"{self.required_scope!r} these knobs need"
                )
        return self

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> AlgorithmConfig:
        """A preset with some knobs overridden, e.g. from_preset("rlrt", eps_w=0.5)."""
        return cls.model_validate({"preset": name, **overrides})

    @property
    def required_scope(self) -> Scope:
        """The narrowest teacher scope these knobs need."""
        return get_adv_est(self.advantage).teacher_scope(self.teacher_weight, self.weight_gate)

    @property
    def scope(self) -> Scope:
        """The teacher scope in effect: the explicit one or the required one."""
        return self.teacher_scope or self.required_scope

    @property
    def uses_teacher(self) -> bool:
        return self.required_scope != "none"

    @property
    def teacher_version_rule(self) -> Literal["match_s", "any"]:
        """The teacher_version in effect: match_s by default when a teacher is used."""
        if self.teacher_version is not None:
            return self.teacher_version
        return "match_s" if self.uses_teacher else "any"

    def lam_at(self, step: int) -> float:
        """lam at a trainer step (0-based): constant, or decayed linearly to 0 (rlsd)."""
        if self.lam_schedule == "constant":
            return self.lam
        return self.lam * max(0.0, 1.0 - step / self.lam_decay_steps)

    def teacher_request(self, **extra: Any) -> TeacherRequest:
        """What the trainer puts into PromptTask.teacher for the teacher service; `extra`
        sets other TeacherRequest fields (e.g. chat_template_kwargs)."""
        return TeacherRequest(
            scope=self.scope,
            context_mode=self.context_mode,
            fallback_to_solution=self.fallback_to_solution,
            strip_think=self.strip_think,
            template=self.teacher_template,
            seed=self.teacher_seed,
            estimator=self.advantage,
            score_student=self.student_logprobs == "engine" and self.uses_teacher,
            **extra,
        )

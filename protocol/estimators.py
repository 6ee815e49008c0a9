"""The advantage-estimator registry: the facts about each estimator that more than one process
needs, declared once (verl's `register_adv_est` pattern).

An estimator is what the `advantage` knob of the algorithm names. Two processes must agree on
its facts without sharing the torch formula:
- the teacher service asks *which responses need a teacher score* (`teacher_scope`), and that
  depends on which responses have zero advantage (`zero_advantage`);
- the trainer's driver asks *which groups carry no signal* (`carries_no_signal`), and its
  formula (trainer/algorithm/advantages.py, registered under the same name) forces exactly
  the zero-advantage responses of this test to A = 0.

So a new estimator is: `@register_adv_est("name")` here on its facts, and
`@adv_formula("name")` on its torch formula in the trainer; a test checks both sides list the
same names. Pure Python: the verifier and teacher images import this without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

Scope = Literal["none", "correct_mixed", "nonzero_adv", "all"]
TeacherWeight = Literal["none", "reversed", "teacher"]
WeightGate = Literal["correct", "all"]

# A reward this close to its group mean has advantage 0 (float noise in the mean of e.g. 0.1s).
# The one tolerance of the project: the teacher service and the trainer both use it.
ZERO_ADV_TOL = 1e-6


@dataclass(frozen=True)
class AdvantageEstimator:
    """What every part must know about one estimator (the formula lives in the trainer)."""

    name: str
    uses_reward: bool  # False: rewards do not enter the advantage (opsd)
    zero_advantage: Callable[[Sequence[float]], list[bool]]  # per response of one group
    teacher_scope: Callable[[TeacherWeight, WeightGate], Scope]  # scope the knobs need

    def carries_no_signal(self, rewards: Sequence[float]) -> bool:
        """Every response of the group has advantage 0 (a zero-variance group for GRPO)."""
        return bool(rewards) and all(self.zero_advantage(rewards))


ADV_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_adv_est(name: str, *, uses_reward: bool = True,
                     teacher_scope: Callable[[TeacherWeight, WeightGate], Scope]
                     ) -> Callable[[Callable[[Sequence[float]], list[bool]]],
                                   Callable[[Sequence[float]], list[bool]]]:
    """Decorate an estimator's zero-advantage test to register the estimator under `name`."""

    def wrap(fn: Callable[[Sequence[float]], list[bool]]) -> Callable[[Sequence[float]], list[bool]]:
        if name in ADV_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} registered twice")
        ADV_ESTIMATORS[name] = AdvantageEstimator(name, uses_reward, fn, teacher_scope)
        return fn

    return wrap


def get_adv_est(name: str) -> AdvantageEstimator:
    try:
        return ADV_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {sorted(ADV_ESTIMATORS)}"
                         ) from None


# --------------------------------------------------------------------------- the estimators


def _reweighting_scope(teacher_weight: TeacherWeight, weight_gate: WeightGate) -> Scope:
    """A_k re-weighted per token by the teacher: only responses with A != 0 can change (a
    weight times 0 is 0), and of those the gated ones."""
    if teacher_weight == "none":
        return "none"
    return "correct_mixed" if weight_gate == "correct" else "nonzero_adv"


@register_adv_est("grpo", teacher_scope=_reweighting_scope)
def group_mean_zero(rewards: Sequence[float]) -> list[bool]:
    """GRPO (and Dr.GRPO, and every teacher re-weighting of them): A_k = 0 for every response
    of a constant group and for any reward equal to its group mean (within ZERO_ADV_TOL).
    True whatever the std normalisation or its level, because A_k is always centred on the
    *group* mean (trainer/algorithm/advantages.py)."""
    if not rewards:
        return []
    if max(rewards) == min(rewards):
        return [True] * len(rewards)
    mean = sum(rewards) / len(rewards)
    return [abs(r - mean) <= ZERO_ADV_TOL for r in rewards]


@register_adv_est("self_distill", uses_reward=False, teacher_scope=lambda _w, _g: "all")
def never_zero(rewards: Sequence[float]) -> list[bool]:
    """opsd: A_kt = q_t - s_t on every token, whatever the rewards: no response is known to
    have zero advantage before the teacher has scored it (so no group is dropped as
    zero-variance, and every response needs a teacher score)."""
    return [False] * len(rewards)

"""The algorithm core: pure torch, no I/O (docs/algorithm.md holds it next to the spec).

cfg = AlgorithmConfig.from_preset("rlrt")
adv = token_advantages(cfg, rewards=..., group_ids=..., mask=..., student_logprobs=s,
                       teacher_logprobs=q, has_teacher=..., step=step)
out = policy_loss(logp, s, adv.advantages, mask, cfg, engine_logprobs=e)
"""

from trainer.algorithm.advantages import (
    GroupAdvantages,
    TokenAdvantages,
    group_advantages,
    reweight,
    teacher_weight,
    token_advantages,
)
from trainer.algorithm.config import PRESETS, AlgorithmConfig
from trainer.algorithm.logprobs import TokenLogProbs, logprobs_from_hidden, token_logprobs
from trainer.algorithm.loss import PolicyLoss, aggregate, kl_penalty, policy_loss

__all__ = [
    "PRESETS",
    "AlgorithmConfig",
    "GroupAdvantages",
    "PolicyLoss",
    "TokenAdvantages",
    "TokenLogProbs",
    "aggregate",
    "group_advantages",
    "kl_penalty",
    "logprobs_from_hidden",
    "policy_loss",
    "reweight",
    "teacher_weight",
    "token_advantages",
    "token_logprobs",
]

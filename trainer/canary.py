"""The trainer half of the weight canary (protocol/canary.py): the policy's own raw log-probs
of a few fixed token sequences, computed when a version is pushed and sent with it.

`canary_logprobs` runs the DeepSpeed engine's forward, so it is a collective under ZeRO-3
(every rank calls it; trainer/main.py runs it as the "canary" op) and works on stage 0/2/3
alike. Temperature 1 and eval mode: the services score raw log-probs, without dropout.
"""

from __future__ import annotations

from typing import Any

import torch

from protocol.canary import Canary, canary_sequences
from trainer.model import Policy

_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def canary_dtype(*dtypes: torch.dtype) -> str:
    """The least precise of the training and push dtypes: what both forwards can agree to."""
    coarse = max(dtypes, key=lambda d: torch.finfo(d).eps)
    return _NAMES.get(coarse, "float32")


def fixed_sequences(hf_model: Any, tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """The run's canary sequences: ids every engine accepts (below both the model's and the
    tokenizer's vocabulary: vLLM rejects ids its tokenizer does not know)."""
    vocab = int(hf_model.config.get_text_config().vocab_size)
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer))
    return canary_sequences(vocab, count=count, length=length)


@torch.no_grad()
def canary_logprobs(policy: Policy, sequences: list[list[int]]) -> list[list[float]]:
    """log p(seq[j] | seq[:j]) for j >= 1 under the current weights (rank 0's is the answer)."""
    if len({len(s) for s in sequences}) != 1:
        raise ValueError("canary sequences must have one length (no padding in this forward)")
    ids = torch.tensor(sequences, dtype=torch.long)
    mask = torch.ones_like(ids)
    module = policy.engine.module  # the PolicyModel wrapper
    temperature, training = module.temperature, module.training
    module.temperature = 1.0
    module.eval()
    try:
        lp, _ = policy.forward(ids, mask, mask.bool())
    finally:
        module.temperature = temperature
        module.train(training)
    return lp[:, 1:].float().cpu().tolist()


def make_canary(sequences: list[list[int]], logprobs: list[list[float]], dtype: str) -> Canary:
    return Canary(sequences=sequences, logprobs=logprobs, dtype=dtype)

"""Independent log-prob computation with plain transformers, to check engine numbers against."""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM


@functools.lru_cache(maxsize=8)
def reference_model(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def token_logprobs(model_path: str, seq: list[int], temperature: float = 1.0) -> list[float]:
    """log p(seq[i] | seq[:i]) for i >= 1 under the model at `model_path` (HF directory)."""
    logits = reference_model(str(model_path))(torch.tensor([seq])).logits[0, :-1].float()
    lp = torch.log_softmax(logits / temperature, -1)
    return lp.gather(1, torch.tensor(seq[1:]).unsqueeze(1)).squeeze(1).tolist()

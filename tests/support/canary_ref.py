"""The reference side of weight-canary tests: plain transformers log-probs of given weights."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from protocol.canary import Canary
from trainer.algorithm import token_logprobs


def reference_logprobs(model_dir: Path, seqs: list[list[int]],
                       state: dict[str, torch.Tensor] | None = None) -> list[list[float]]:
    """log p(seq[j] | seq[:j]), j >= 1, at temperature 1 under `model_dir`'s architecture with
    `state` loaded (tied models: the embedding alone sets the output projection too)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        lp = token_logprobs(model, torch.tensor(seqs), temperature=1.0).logprobs
    return lp[:, 1:].tolist()


def canary_for(model_dir: Path, seqs: list[list[int]],
               state: dict[str, torch.Tensor] | None = None) -> Canary:
    return Canary(sequences=seqs, logprobs=reference_logprobs(model_dir, seqs, state))


def shifted(c: Canary, delta: float, at: tuple[int, int] = (1, 3)) -> Canary:
    """`c` with one log-prob moved by `delta`: a canary the served weights cannot match."""
    lps = [list(r) for r in c.logprobs]
    lps[at[0]][at[1]] += delta
    return Canary(sequences=c.sequences, logprobs=lps, dtype=c.dtype)

"""The model behind the fake servers: a tiny HF causal LM with exactly the two operations the
real engines perform for us (sample with per-token log-probs; log-probs of given tokens), plus
all-or-nothing weight loading.

Written independently of our CPU engine on purpose: the fakes stand in for SGLang/vLLM, so
tests comparing the two paths compare two implementations, not one with itself.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]
    finish: str  # "stop" | "length" | "abort"
    matched: int | None = None  # the stop token, when finish == "stop"


class TinyLM:
    def __init__(self, model_path: str | Path) -> None:
        self.model_path = str(model_path)
        self.model = self._load(self.model_path)
        cfg = self.model.config
        self.vocab_size: int = int(cfg.vocab_size)
        self.context_len: int = int(cfg.max_position_embeddings)
        eos = cfg.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        # One forward at a time: the fakes serve requests from worker threads.
        self.lock = threading.Lock()

    @staticmethod
    def _load(path: str) -> PreTrainedModel:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.eval()
        return model

    # ------------------------------------------------------------------ weights
    def load_safetensors_dir(self, path: str | Path) -> int:
        """Load every `*.safetensors` in `path` into a *copy* of the model and swap it in only
        when all tensors matched (names and shapes); on any error the old weights stay. This is
        the rollback behaviour SGLang documents for update_weights_from_disk."""
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return self.apply_state(state)

    def apply_state(self, state: dict[str, torch.Tensor]) -> int:
        with self.lock:
            current = self.model.state_dict()
            unknown = sorted(set(state) - set(current))
            if unknown:
                raise KeyError(f"unknown parameter names: {unknown[:5]}")
            for name, t in state.items():
                if tuple(t.shape) != tuple(current[name].shape):
                    raise ValueError(f"{name}: shape {tuple(t.shape)} != {tuple(current[name].shape)}")
            new = {k: v.clone() for k, v in current.items()}
            new.update({k: v.to(torch.float32) for k, v in state.items()})
            self.model.load_state_dict(new, strict=True)
            return len(state)

    # ------------------------------------------------------------------ compute
    @torch.no_grad()
    def _logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids], dtype=torch.long)).logits[0].float()

    def prompt_logprobs(self, ids: list[int]) -> list[float | None]:
        """log p(ids[i] | ids[:i]) for i >= 1; entry 0 is None (nothing predicts it)."""
        with self.lock:
            logits = self._logits(ids)
        lp = torch.log_softmax(logits[:-1], dim=-1)
        picked = lp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
        return [None, *[float(x) for x in picked]]

    def sample(self, prompt: list[int], *, max_new_tokens: int, temperature: float = 1.0,
               top_p: float = 1.0, top_k: int = -1, seed: int | None = None,
               stop_token_ids: list[int] | None = None, ignore_eos: bool = False,
               aborted: Callable[[], bool] = lambda: False) -> Sample:
        """Autoregressive sampling without a KV cache (the model is tiny). The log-prob is
        taken from the temperature-scaled distribution before top-p/top-k, which is what
        SGLang returns by default."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        stops = set(stop_token_ids or []) | (set() if ignore_eos else self.eos_ids)
        ids = list(prompt)
        out: list[int] = []
        lps: list[float] = []
        for _ in range(max_new_tokens):
            if aborted():
                return Sample(out, lps, "abort")
            with self.lock:
                logits = self._logits(ids)[-1]
            if temperature <= 0:
                tok = int(torch.argmax(logits))
                lp = float(torch.log_softmax(logits, -1)[tok])
            else:
                scaled = torch.log_softmax(logits / temperature, -1)
                probs = _filter(scaled.exp(), top_p, top_k)
                tok = int(torch.multinomial(probs, 1, generator=gen))
                lp = float(scaled[tok])
            out.append(tok)
            lps.append(lp if math.isfinite(lp) else float("-inf"))
            ids.append(tok)
            if tok in stops:
                return Sample(out, lps, "stop", matched=tok)
        return Sample(out, lps, "length")


def _filter(probs: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    probs = probs.clone()
    if top_k > 0 and top_k < probs.numel():
        kth = torch.topk(probs, top_k).values[-1]
        probs[probs < kth] = 0
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[idx[keep]] = True
        probs[~mask] = 0
    return probs / probs.sum()

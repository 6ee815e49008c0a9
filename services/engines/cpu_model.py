"""Loading an HF causal LM for the CPU engine, and the few model facts the engine needs.

Any architecture `AutoModelForCausalLM` can load works, provided its KV cache is the plain
per-layer key/value kind (full attention: Llama, Qwen2/3, Mistral without sliding window, ...);
`check_supported` probes that once at load time so a hybrid model fails early and clearly.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer

from services.engines.base import EngineError
from services.engines.cpu_attention import IMPLEMENTATION

log = logging.getLogger(__name__)


def load_model(model_dir: str | os.PathLike, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    """Model (eval; SDPA attention, with cascade attention in decode steps) and tokenizer
    (None when the directory has none)."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise EngineError(f"{path} has no config.json: not a local HF model directory")
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=IMPLEMENTATION, local_files_only=True
    )
    model.eval()
    model.requires_grad_(False)
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # a model without a usable tokenizer still serves token ids
            log.warning("no tokenizer loaded from %s: %s", path, e)
    return model, tokenizer


def _cache_kwarg(model: PreTrainedModel) -> str:
    # transformers >= 5.x renamed `past_key_values` to `cache`.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class ModelRunner:
    """Thin, version-tolerant wrapper around the model's forward."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.cache_kw = _cache_kwarg(model)
        self.has_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        cfg = model.config
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.num_layers = int(cfg.num_hidden_layers)
        self.kv_shapes: list[tuple[int, int]] = []  # (kv_heads, head_dim) per layer, by check_supported

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        logits_to_keep: int,
    ) -> torch.Tensor:
        """Logits [B, logits_to_keep, V] for the last `logits_to_keep` positions."""
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            self.cache_kw: cache,
            "use_cache": cache is not None,
        }
        if self.has_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        logits = self.model(**kwargs).logits
        return logits[:, -logits_to_keep:]

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)


def check_supported(runner: ModelRunner) -> None:
    """Prefill two tokens, check the cache is per-layer full-attention K/V, and record each
    layer's K/V shape in `runner.kv_shapes`."""
    cache = runner.new_cache()
    with torch.inference_mode():
        ids = torch.zeros(1, 2, dtype=torch.long)
        runner.forward(ids, torch.ones(1, 2, dtype=torch.long), torch.arange(2).unsqueeze(0), cache, 1)
    kinds = {type(layer).__name__ for layer in cache.layers}
    if kinds != {"DynamicLayer"} or any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise EngineError(
            f"the CPU engine supports full-attention KV caches only; this model's cache has {sorted(kinds)}"
        )
    if len(cache.layers) != runner.num_layers:
        raise EngineError(f"cache has {len(cache.layers)} layers, config says {runner.num_layers}")
    runner.kv_shapes = [(layer.keys.shape[1], layer.keys.shape[3]) for layer in cache.layers]


def eos_token_ids(model: PreTrainedModel, tokenizer: Any) -> set[int]:
    """Every id that ends a response: generation_config, config and tokenizer EOS."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if eos is None:
            continue
        ids.update([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    return ids


def context_length(model: PreTrainedModel) -> int:
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if n else 4096

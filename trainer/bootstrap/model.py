"""A tiny `Qwen3ForCausalLM`: the real architecture (q/k RMS-norm, GQA, RoPE, SwiGLU), small
enough that SFT and RL on Countdown run on 2 CPU cores. Sized by hidden/layers/heads."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM


def tiny_qwen3_config(tokenizer: PreTrainedTokenizerFast, *, hidden: int = 64, layers: int = 4,
                      heads: int = 2, kv_heads: int = 1, mlp_mult: int = 3,
                      max_positions: int = 512, head_dim: int | None = None,
                      tie: bool = True) -> Qwen3Config:
    """`head_dim` defaults to hidden // heads (vLLM's CPU kernels need 32 or more, so its
    tests widen it). `tie`: tied embeddings, see below; the tests also build untied models,
    whose separate head is what a real engine's weight loading must handle."""
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=mlp_mult * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        # tied embeddings: with a ~140-token vocab the head is small anyway, and tying is what
        # the small Qwen3 checkpoints do
        tie_word_embeddings=tie,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        use_cache=True,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, **knobs) -> Qwen3ForCausalLM:
    """Fresh model; `seed` fixes the initial weights. `knobs` go to `tiny_qwen3_config`."""
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_qwen3_config(tokenizer, **knobs))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def num_params(model: torch.nn.Module) -> int:
    # tied embedding/head counted once
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

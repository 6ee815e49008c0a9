"""Tiny real models for engine tests: an HF directory (config + safetensors + tokenizer) and
rlrt weight directories (safetensors + sha256 manifest) holding different weights."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from protocol.weights import save_weights_dir
from trainer.bootstrap.tokenizer import build_tokenizer

CONTEXT_LEN = 96  # small, so "longer than the context window" is cheap to provoke


def tiny_config(tok: PreTrainedTokenizerFast) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=CONTEXT_LEN, tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)


def tiny_model(tok: PreTrainedTokenizerFast, seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(tiny_config(tok)).eval()


def make_model_dir(path: Path, seed: int = 0) -> Path:
    """An HF model directory the fakes (and the CPU engine) can load."""
    tok = build_tokenizer()
    tiny_model(tok, seed).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def make_weights_dir(path: Path, version: int, seed: int) -> str:
    """An rlrt weight directory with freshly initialised weights; returns its sha256."""
    tok = build_tokenizer()
    model = tiny_model(tok, seed)
    return save_weights_dir(model.state_dict(), path, version=version,
                            extra_files={"config.json": model.config.to_json_string()})

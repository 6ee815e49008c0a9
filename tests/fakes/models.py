"""Tiny real models for engine tests: an HF directory (config + safetensors + tokenizer) and
rlrt weight directories (safetensors + sha256 manifest) holding different weights."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from protocol.weights import save_weights_dir

CONTEXT_LEN = 256  # small, so "longer than the context window" is cheap to provoke
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
# Qwen-style chat template: <|im_start|>{role}\n{content}<|im_end|>\n ... <|im_start|>assistant\n
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level (every printable ASCII character is a token; BPE without merges), so
    any ASCII text round-trips exactly; the chat markers are special tokens."""
    vocab: dict[str, int] = {}
    for t in [*SPECIALS, *string.printable]:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>", ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|unk|>",
                                   additional_special_tokens=["<|im_start|>"],
                                   chat_template=CHAT_TEMPLATE)


def tiny_config(tok: PreTrainedTokenizerFast, *, head_dim: int = 16,
                tie: bool = False) -> Qwen3Config:
    """head_dim 32 (or more) for a real vLLM: its CPU attention kernels take 32, 64, 80, ...
    (`CPUAttentionBackend.get_supported_head_sizes`), not 16."""
    return Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
        max_position_embeddings=CONTEXT_LEN, tie_word_embeddings=tie,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)


def tiny_model(tok: PreTrainedTokenizerFast, seed: int, **shape: Any) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(tiny_config(tok, **shape)).eval()


def make_model_dir(path: Path, seed: int = 0, **shape: Any) -> Path:
    """An HF model directory the fakes (and the CPU engine) can load. `shape`: tiny_config's
    head_dim / tie."""
    tok = build_tokenizer()
    tiny_model(tok, seed, **shape).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def make_weights_dir(path: Path, version: int, seed: int, **shape: Any) -> str:
    """An rlrt weight directory with freshly initialised weights; returns its sha256."""
    tok = build_tokenizer()
    model = tiny_model(tok, seed, **shape)
    return save_weights_dir(model.state_dict(), path, version=version,
                            extra_files={"config.json": model.config.to_json_string()})

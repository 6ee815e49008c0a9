"""A tiny real HF policy for trainer tests: a character-level fast tokenizer with a chat
template, and a randomly initialised `Qwen3ForCausalLM`, saved with save_pretrained to a
directory (no hub download)."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab: dict[str, int] = {}
    for tok in [PAD, IM_START, IM_END, "<|unk|>", *string.printable]:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>", ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                   unk_token="<|unk|>", additional_special_tokens=[IM_START],
                                   chat_template=CHAT_TEMPLATE, model_max_length=256)


def tiny_model(vocab_size: int, *, seed: int = 0, hidden: int = 32, layers: int = 2,
               tie: bool = True, max_positions: int = 256, eos_token_id: int = 2,
               pad_token_id: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden // 4, max_position_embeddings=max_positions,
        tie_word_embeddings=tie, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    return Qwen3ForCausalLM(cfg)


def save_tiny_policy(out_dir: str | Path, *, seed: int = 0, tie: bool = True, **kw: int) -> Path:
    """Tokenizer + model in HF layout at `out_dir`; returns the path."""
    out = Path(out_dir)
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=seed, tie=tie, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **kw)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out

"""Tiny real models for tests, all from the bootstrap's model code (trainer/bootstrap/model.py):
a Qwen3 HF directory (config + safetensors + tokenizer) and rlrt weight directories
(safetensors + sha256 manifest). Two shapes: ENGINE (untied; what the fakes and the CPU engine
serve) and POLICY (tied, 4 heads; what the trainer tests train)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from support.tokenizer import CONTEXT_LEN, char_tokenizer
from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

from protocol.weights import save_weights_dir
from trainer.bootstrap.model import build_model
from trainer.bootstrap.tokenizer import build_tokenizer

# head_dim 16 by default; a real vLLM needs 32 or more (its CPU attention kernels take 32, 64,
# 80, ...: `CPUAttentionBackend.get_supported_head_sizes`), so its tests pass head_dim=32.
ENGINE: dict[str, Any] = dict(hidden=32, layers=2, heads=2, kv_heads=1, mlp_mult=2,
                              max_positions=CONTEXT_LEN, tie=False)
POLICY: dict[str, Any] = dict(hidden=32, layers=2, heads=4, kv_heads=2, mlp_mult=2,
                              max_positions=CONTEXT_LEN, tie=True)

__all__ = ["CONTEXT_LEN", "ENGINE", "POLICY", "char_tokenizer", "make_model_dir",
           "make_weights_dir", "save_bootstrap_model", "save_model", "save_tiny_policy",
           "tiny_model"]


def tiny_model(tok: PreTrainedTokenizerFast, seed: int = 0, **shape: Any) -> Qwen3ForCausalLM:
    """The one factory: `shape` is ENGINE's knobs by default, each overridable (the knobs of
    `tiny_qwen3_config`)."""
    return build_model(tok, seed=seed, **{**ENGINE, **shape}).eval()


def save_model(path: str | Path, tok: PreTrainedTokenizerFast, seed: int = 0,
               **shape: Any) -> Path:
    """Model and tokenizer in HF layout at `path`; returns the path."""
    tiny_model(tok, seed, **shape).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return Path(path)


def make_model_dir(path: Path, seed: int = 0, **shape: Any) -> Path:
    """An ENGINE-shaped HF directory the fakes (and the CPU engine) can load."""
    return save_model(path, char_tokenizer(), seed, **shape)


def make_weights_dir(path: Path, version: int, seed: int, **shape: Any) -> str:
    """An rlrt weight directory with freshly initialised ENGINE weights; returns its sha256."""
    model = tiny_model(char_tokenizer(), seed, **shape)
    return save_weights_dir(model.state_dict(), path, version=version,
                            extra_files={"config.json": model.config.to_json_string()})


def save_tiny_policy(out_dir: str | Path, *, seed: int = 0, **shape: Any) -> Path:
    """A POLICY-shaped HF directory (char tokenizer) for trainer tests."""
    return save_model(out_dir, char_tokenizer(), seed, **{**POLICY, **shape})


def save_bootstrap_model(out_dir: str | Path, *, hidden: int = 32, layers: int = 2) -> Path:
    """The bootstrap's own model and word-level tokenizer at test size (for tests that run
    the tiny run config, whose prompts the bootstrap tokenizer encodes compactly)."""
    return save_model(out_dir, build_tokenizer(), 0, hidden=hidden, layers=layers, heads=2,
                      kv_heads=1, mlp_mult=3, max_positions=512, tie=True)

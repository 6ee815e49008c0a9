"""What every part of the GPU check shares: the mode (CUDA + bf16 + NCCL, or the `--cpu`
rehearsal: CPU + fp32 + gloo), the random Qwen3 it trains and pushes, tensor checksums, and
the one JSON line each role prints."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# The real Qwen3 vocabulary (Qwen3-0.6B's config.json): the embedding and the tied head are
# the largest tensors a push moves and the canary's normaliser runs over all of them.
QWEN3_VOCAB = 151_936


@dataclass(frozen=True)
class Mode:
    """GPU: the check proper. CPU: the rehearsal; fp32 where bf16 would be meaningless (the
    reference it is compared with is fp32 too), gloo for every group."""

    cpu: bool

    @property
    def device(self) -> str:
        return "cpu" if self.cpu else "cuda"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.cpu else torch.bfloat16

    @property
    def dtype_name(self) -> str:
        return "fp32" if self.cpu else "bf16"

    @property
    def backend(self) -> str:
        return "gloo" if self.cpu else "nccl"


def mode() -> Mode:
    """From the environment the driver sets (RLRT_GPU_CHECK_CPU=1 for the rehearsal)."""
    return Mode(cpu=os.environ.get("RLRT_GPU_CHECK_CPU") == "1")


def qwen3_config(*, layers: int, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                 init_std: float = 0.02) -> Any:
    """A Qwen3 of the real vocabulary with tied embeddings; depth and width are the knobs.
    `init_std` (HF's initializer_range): at the default 0.02 a small random model's log-probs
    are nearly uniform (std 0.17 around -11.9 on random tokens), which hides precision loss;
    0.2 spreads them like a trained model's on random tokens (std 1.8, -18 to -9)."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=QWEN3_VOCAB, hidden_size=hidden, intermediate_size=3 * hidden,
                       initializer_range=init_std, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=hidden // heads, max_position_embeddings=256,
                       tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       bos_token_id=None, eos_token_id=0, pad_token_id=0, use_cache=False)


def random_qwen3(*, layers: int, seed: int = 0, **knobs: Any) -> Any:
    """A freshly initialised Qwen3ForCausalLM (fp32, CPU); `seed` fixes its weights, `knobs`
    are qwen3_config's."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(qwen3_config(layers=layers, **knobs)).eval()


def save_random_qwen3(path: str | Path, *, layers: int, seed: int = 0, **knobs: Any) -> Path:
    """The model as an HF directory (config + safetensors), what the trainer loads."""
    random_qwen3(layers=layers, seed=seed, **knobs).save_pretrained(str(path))
    return Path(path)


def checksum(t: torch.Tensor) -> str:
    """sha256 of the tensor's bytes: a broadcast moves bits, so sender and receiver agree
    exactly or the tensor did not arrive intact."""
    flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


def emit(result: dict[str, Any]) -> None:
    """A role's answer: one JSON line, the last line of its stdout."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()

"""The trainer's own update step and weight canary, in one process of one device:

    python -m selfcheck.train DEVICE OUT_DIR MODEL_DIR DEEP_DIR STAGE [STAGE ...]

For each ZeRO STAGE: `build_policy` (the trainer's DeepSpeed engine, world size 1) on the
random Qwen3 in MODEL_DIR, `update_step` for the shared update case (tests/support/
update_case.py), the whole model saved to OUT_DIR/stage<S>.safetensors. Then, on the deep model
in DEEP_DIR, the canary log-probs of the trainer's forward (`trainer.canary`). DEVICE "cpu"
runs in fp32 (the reference, and the --cpu rehearsal); "cuda" in the mode's dtype (bf16).
Prints {"stages": {S: {"losses", "finite", "seconds"}}, "canary": {"logprobs", "dtype"}}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from support.update_case import STEPS, case_batch, case_config

from protocol.canary import canary_sequences
from selfcheck.common import QWEN3_VOCAB, emit
from trainer import dist
from trainer.canary import canary_logprobs
from trainer.model import build_policy, full_state_dict
from trainer.update import update_step

CANARY_COUNT, CANARY_TOKENS = 4, 32  # the defaults of push.canary_sequences / canary_tokens


def _policy(model_dir: str, device: str, stage: int) -> Any:
    dtype = "fp32" if device == "cpu" else "bf16"
    cfg = case_config(model_dir, zero_stage=stage, micro_batch_size=2, device=device, dtype=dtype)
    return cfg, build_policy(cfg, rank=0, world_size=1, device=device)


def train(model_dir: str, device: str, stage: int, out: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg, policy = _policy(model_dir, device, stage)
    batch = case_batch()
    metrics = [update_step(policy, batch, cfg.algorithm, step=s,
                           micro_batch_size=cfg.micro_batch_size, old_logprobs_mode="reuse")
               for s in range(STEPS)]
    weights = full_state_dict(policy)
    assert weights is not None  # rank 0
    finite = all(bool(torch.isfinite(t.float()).all()) for t in weights.values())
    save_file({k: v.float().contiguous() for k, v in weights.items()},
              str(out / f"stage{stage}.safetensors"))
    del policy
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"losses": [float(m.get("loss", float("nan"))) for m in metrics], "finite": finite,
            "seconds": round(time.perf_counter() - t0, 2)}


def canary(deep_dir: str, device: str) -> dict[str, Any]:
    """The canary a push would carry, computed by the trainer's forward in this mode."""
    _, policy = _policy(deep_dir, device, 0)
    seqs = canary_sequences(QWEN3_VOCAB, count=CANARY_COUNT, length=CANARY_TOKENS)
    return {"sequences": seqs, "logprobs": canary_logprobs(policy, seqs),
            "dtype": "float32" if policy.dtype == torch.float32 else "bfloat16"}


def main(argv: list[str]) -> None:
    device, out, model_dir, deep_dir = argv[0], Path(argv[1]), argv[2], argv[3]
    torch.manual_seed(0)
    dist.setup(device, 300)
    stages = {int(s): train(model_dir, device, int(s), out) for s in argv[4:]}
    emit({"device": device, "stages": stages, "canary": canary(deep_dir, device)})


if __name__ == "__main__":
    main(sys.argv[1:])

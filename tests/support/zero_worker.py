"""One rank of the multi-process ZeRO test: `python -m support.zero_worker MODEL_DIR STAGE OUT`
(cwd tests/) with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set. Trains the shared update
case and (rank 0) writes the per-step metrics and the gathered weights to OUT.json / .safetensors."""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import save_file
from support.update_case import STEPS, case_batch, case_config

from trainer import dist
from trainer.model import build_policy, full_state_dict
from trainer.update import update_step


def main(model_dir: str, stage: int, out: str) -> None:
    torch.set_num_threads(1)
    cfg = case_config(model_dir, zero_stage=stage, micro_batch_size=2)
    rank, world = dist.setup("cpu", 120)
    policy = build_policy(cfg, rank=rank, world_size=world, device="cpu")
    batch = case_batch()
    ms = [update_step(policy, batch, cfg.algorithm, step=s, micro_batch_size=cfg.micro_batch_size,
                      old_logprobs_mode="reuse") for s in range(STEPS)]
    sd = full_state_dict(policy)
    if rank == 0:
        save_file(sd, out + ".safetensors")
        with open(out + ".json", "w") as f:
            json.dump({"world": world, "metrics": ms}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])

"""The frozen reference policy of the KL term (kl_coef > 0): the initial weights (or
`ref_model_path`), never updated, scoring the batch's sampled tokens once per RL step.

ZeRO-aware: under ZeRO-3 it is loaded into partitions (like the policy, no rank holds the
whole model) and wrapped in a DeepSpeed engine without an optimizer, so its forward gathers
the partitions layer by layer; under ZeRO 0/2 it is a plain module on the training device
(there is no optimizer state to shard). Log-probs come from the same `PolicyModel` forward as
the policy's (same temperature, same chunked log-softmax), so at initialisation pi_theta and
pi_ref agree to the last bit and the KL is exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainer.config import TrainerConfig
from trainer.model import PolicyModel, ds_config, load_hf_model, resolve_dtype, shares_prompts


@dataclass
class Reference:
    module: Any  # a DeepSpeed engine (ZeRO-3) or the PolicyModel itself
    device: str

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                logprob_mask: torch.Tensor, with_entropy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        dev = getattr(self.module, "device", None) if self.device != "cpu" else "cpu"
        dev = dev or self.device
        return self.module(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev),
                           logprob_mask=logprob_mask.to(dev), with_entropy=with_entropy)


def build_reference(cfg: TrainerConfig, *, rank: int, world_size: int,
                    device: str) -> Reference | None:
    """The reference policy when the algorithm has a KL term, else None."""
    if cfg.algorithm.kl_coef <= 0:
        return None
    dtype = resolve_dtype(cfg, device)
    path = cfg.ref_model_path or cfg.model_path
    ds = ds_config(cfg, world_size, dtype)
    zero3 = cfg.zero_stage == 3
    hf = load_hf_model(path, dtype, zero3_ds_config=ds if zero3 else None, rank=rank)
    hf.config.use_cache = False
    hf.requires_grad_(False)
    # The same forward as the policy's: at the reference weights the KL is then exactly 0.
    wrapper = PolicyModel(hf, chunk_size=cfg.logprob_chunk_size, temperature=cfg.temperature,
                          share_prompts=shares_prompts(cfg, world_size))
    if zero3:
        import deepspeed

        ref_ds = {k: v for k, v in ds.items() if k not in ("gradient_clipping",
                                                            "zero_allow_untested_optimizer")}
        engine, _, _, _ = deepspeed.initialize(model=wrapper, config=ref_ds,
                                               dist_init_required=False)
        engine.eval()
        return Reference(module=engine, device=device)
    wrapper.to(device).eval()
    return Reference(module=wrapper, device=device)

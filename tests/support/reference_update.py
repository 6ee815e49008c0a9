"""The trainer's update written in plain PyTorch + transformers, no DeepSpeed: the
reference our DeepSpeed update is checked against (tests) and timed against (bench).

Same math as trainer/update.py: old log-probs under the current weights, the algorithm's
token advantages, the policy loss normalised over the whole batch and accumulated over
micro-batches, global-norm clipping, AdamW, LambdaLR."""

from __future__ import annotations

import torch
from torch import nn

from trainer.algorithm import AlgorithmConfig, policy_loss, token_advantages, token_logprobs
from trainer.batch import TrainBatch
from trainer.config import TrainerConfig
from trainer.model import lr_lambda, param_groups


def reference_optimizer(model: nn.Module, cfg: TrainerConfig
                        ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=cfg.adam_betas, eps=cfg.adam_eps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def reference_update(model: nn.Module, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LambdaLR, batch: TrainBatch,
                     alg: AlgorithmConfig, *, step: int, micro_batch_size: int,
                     max_grad_norm: float, temperature: float = 1.0,
                     chunk_size: int = 1024, minis: list[list[int]] | None = None
                     ) -> dict[str, float]:
    """One RL step; `minis` = the rows of each PPO mini-batch (one optimizer step each, all
    against the s_t of the weights that began the step); None = the whole batch."""
    rows = list(range(batch.size))
    mbs = [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    mask = batch.response_mask
    s = torch.zeros(mask.shape)
    with torch.no_grad():
        for r in mbs:
            mb = batch.select(r)
            lp = token_logprobs(model, mb.input_ids, mb.attention_mask,
                                logprob_mask=mb.response_mask, temperature=temperature,
                                chunk_size=chunk_size).logprobs
            s[torch.as_tensor(r), : lp.shape[1]] = lp
    adv = token_advantages(alg, rewards=batch.rewards, group_ids=batch.group_ids, mask=mask,
                           student_logprobs=s, teacher_logprobs=batch.teacher_logprobs,
                           has_teacher=batch.has_teacher, correct=batch.correct, step=step)
    total, gns, clipped = 0.0, [], 0.0
    for mini in minis or [rows]:
        n_tokens = float(mask[mini].sum())
        n_seqs = float((mask[mini].sum(-1) > 0).sum())
        for k in range(0, len(mini), micro_batch_size):
            r = mini[k:k + micro_batch_size]
            mb = batch.select(r)
            idx = torch.as_tensor(r)
            T = mb.input_ids.shape[1]
            lp = token_logprobs(model, mb.input_ids, mb.attention_mask,
                                logprob_mask=mb.response_mask, temperature=temperature,
                                chunk_size=chunk_size).logprobs
            out = policy_loss(lp, s[idx, :T], adv.advantages[idx, :T], mb.response_mask, alg,
                              engine_logprobs=mb.engine_logprobs, num_tokens=n_tokens,
                              num_seqs=n_seqs)
            out.loss.backward()
            total += float(out.loss.detach()) / len(minis or [rows])
            clipped += float(out.metrics["clipfrac_low"] + out.metrics["clipfrac_high"]) \
                * float(mb.response_mask.sum())
        gns.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
                   if max_grad_norm > 0 else float("nan"))
        opt.step()
        opt.zero_grad(set_to_none=True)
    sched.step()  # once per RL step
    return {"loss": total, "grad_norm": sum(gns) / len(gns),
            "clipfrac": clipped / float(mask.sum())}

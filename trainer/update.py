"""One optimizer step on one batch:

1. old log-probs: s_t under the current weights (no grad), micro-batch by micro-batch, with
   the entropy for the metrics. Each rank scores its own rows; a sum over ranks gives every
   rank the whole [B,T] (cheap: B*T floats) so that step 2 sees whole groups.
   (`reuse` mode folds this pass into step 3, see update_step.)
2. token advantages A_kt from the algorithm core (GRPO A_k from the rewards, re-weighted per
   token by the teacher where the preset says so), identical on every rank.
3. micro-batched loss and backward. The loss of a micro-batch is normalised by the token /
   sequence counts of the WHOLE batch (all micro-batches, all ranks), so the sum of the
   micro-batch losses is the batch loss; it is multiplied by the world size because the
   engine averages gradients over ranks.
4. engine.step(): gradient reduction (ZeRO), clipping, AdamW, lr schedule.

With one optimizer step per batch, s_t equals the log-probs of the update's own forward (the
PPO ratio is 1): the trainer's s_t, not the engine's e_t, is the behaviour policy of the
spec, and the teacher weights need it before the loss (D_t = s_t - q_t). "recompute" gets it
from a separate pass; "reuse" from the same forward, before that micro-batch's loss.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch import Tensor

from trainer.algorithm import AlgorithmConfig, policy_loss, token_advantages
from trainer.batch import TrainBatch, micro_batches, num_micro_batches, shard_rows
from trainer.dist import all_reduce_sum
from trainer.model import Policy


def _scatter_rows(dst: Tensor, rows: list[int], part: Tensor) -> None:
    if rows:
        dst[torch.as_tensor(rows), : part.shape[1]] = part.float().cpu()


def _dummy(batch: TrainBatch) -> TrainBatch:
    """A one-row micro-batch that trains on nothing (mask all False), for a rank with fewer
    rows than its peers: it still joins the collectives of a forward/backward."""
    b = batch.select([0])
    b.response_mask = torch.zeros_like(b.response_mask)
    return b


@torch.no_grad()
def old_logprobs(policy: Policy, batch: TrainBatch, mine: list[list[int]]
                 ) -> tuple[Tensor, Tensor]:
    """s_t and the entropy [B,T] for the whole batch (rows of other ranks filled by them)."""
    s = torch.zeros(batch.input_ids.shape)
    ent = torch.zeros(batch.input_ids.shape)
    for rows in mine:
        mb = batch.select(rows) if rows else _dummy(batch)
        lp, h = policy.forward(mb.input_ids, mb.attention_mask, mb.response_mask,
                               with_entropy=True)
        if rows:
            _scatter_rows(s, rows, lp)
            _scatter_rows(ent, rows, h)
    all_reduce_sum(s)
    all_reduce_sum(ent)
    return s, ent


class _Sums:
    """Token-weighted sums of per-micro-batch means, summed over ranks at the end."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weight = 0.0

    def add(self, metrics: dict[str, Tensor], n_tokens: float) -> None:
        for k, v in metrics.items():
            self.sums[k] += float(v) * n_tokens
        self.weight += n_tokens

    def reduce(self, keys: list[str]) -> dict[str, float]:
        t = torch.tensor([self.sums.get(k, 0.0) for k in keys] + [self.weight], dtype=torch.float64)
        all_reduce_sum(t)
        w = max(float(t[-1]), 1.0)
        return {k: float(t[i]) / w for i, k in enumerate(keys)}


# Keys policy_loss may report; a fixed list, so every rank all-reduces the same vector.
LOSS_KEYS = ["pg_loss", "clipfrac_low", "clipfrac_high", "dual_clip_frac", "approx_kl",
             "ratio_mean", "mismatch_kl", "mismatch_k1", "tis_weight_mean", "tis_capped_frac",
             "kl", "entropy"]


def update_step(policy: Policy, batch: TrainBatch, alg: AlgorithmConfig, *, step: int,
                micro_batch_size: int, old_logprobs_mode: str = "recompute") -> dict[str, float]:
    """Run steps 1-4 on `batch` (the whole batch, identical on every rank). Returns metrics
    (identical on every rank) including seconds per phase and tokens/s.

    old_logprobs_mode "recompute": step 1 is a separate no-grad pass. "reuse": s_t is taken
    from the update's own forward (detached) micro-batch by micro-batch, and each
    micro-batch's advantages are computed right before its loss; exactly the same numbers
    (the weights do not change until step 4), one forward pass fewer."""
    rank, world = policy.rank, policy.world_size
    mine_rows = shard_rows(batch, rank, world)
    n_mb = num_micro_batches(batch.size, world, micro_batch_size)
    mine = micro_batches(mine_rows, micro_batch_size, n_mb)
    mask = batch.response_mask
    reuse = old_logprobs_mode == "reuse"

    def advantages(s: Tensor):  # noqa: ANN202 - TokenAdvantages
        return token_advantages(alg, rewards=batch.rewards, group_ids=batch.group_ids,
                                mask=mask, student_logprobs=s,
                                teacher_logprobs=batch.teacher_logprobs,
                                has_teacher=batch.has_teacher, correct=batch.correct, step=step)

    t0 = time.perf_counter()
    if reuse:
        s = torch.zeros(mask.shape)
        entropy = torch.zeros(mask.shape)
    else:
        s, entropy = old_logprobs(policy, batch, mine)
    t1 = time.perf_counter()
    adv = None if reuse else advantages(s)
    t_adv = time.perf_counter() - t1

    n_tokens = float(mask.sum())
    n_seqs = float((mask.sum(-1) > 0).sum())
    need_entropy = alg.entropy_coef > 0
    sums = _Sums()
    loss_total = torch.zeros((), dtype=torch.float64)
    for rows in mine:
        mb = batch.select(rows) if rows else _dummy(batch)
        idx = torch.as_tensor(rows or [0])
        T = mb.input_ids.shape[1]
        lp, h = policy.forward(mb.input_ids, mb.attention_mask, mb.response_mask,
                               with_entropy=need_entropy or reuse)
        dev = lp.device
        if reuse:
            if rows:
                _scatter_rows(s, rows, lp.detach())
                _scatter_rows(entropy, rows, h.detach())
            # A_kt of a row needs only its own s_t (and its group's rewards): the rows of
            # this micro-batch are final, the others are not read.
            ta = time.perf_counter()
            adv = advantages(s)
            t_adv += time.perf_counter() - ta
        out = policy_loss(
            lp, s[idx, :T].to(dev), adv.advantages[idx, :T].to(dev), mb.response_mask.to(dev),
            alg, engine_logprobs=mb.engine_logprobs.to(dev),
            entropy=h if need_entropy else None, num_tokens=n_tokens, num_seqs=n_seqs,
        )
        policy.engine.backward(out.loss * world, scale_wrt_gas=False)
        loss_total += float(out.loss.detach())
        sums.add(out.metrics, float(mb.response_mask.sum()))
    t3 = time.perf_counter()
    lr = float(policy.engine.get_lr()[0])  # the lr this step uses (step() advances it)
    policy.engine.step()
    t4 = time.perf_counter()
    if reuse:  # every rank's rows, for the batch-level diagnostics
        all_reduce_sum(s)
        all_reduce_sum(entropy)
        adv = advantages(s)
    t2 = t1 + t_adv
    all_reduce_sum(loss_total)
    metrics = sums.reduce(LOSS_KEYS)
    metrics["entropy"] = float((entropy * mask).sum() / max(n_tokens, 1.0))
    metrics.update({k: float(v) for k, v in adv.metrics.items()})
    metrics["loss"] = float(loss_total)
    gn = policy.engine.get_global_grad_norm()
    if gn is not None:
        metrics["grad_norm"] = float(gn)
    metrics["lr"] = lr
    metrics["adv_std"] = float(adv.advantages[mask].std()) if n_tokens > 1 else 0.0
    metrics["train_tokens"] = n_tokens
    metrics["micro_batches"] = float(n_mb)
    metrics["time_old_logprobs_s"] = t1 - t0
    metrics["time_advantages_s"] = t2 - t1
    metrics["time_fwd_bwd_s"] = t3 - t1 - t_adv
    metrics["time_optimizer_s"] = t4 - t3
    metrics["time_update_s"] = time.perf_counter() - t0
    metrics["tokens_per_s"] = n_tokens / max(t4 - t0, 1e-9)
    return metrics

"""One RL step on one batch (verl's PPO semantics):

1. old log-probs: s_t = pi_old under the weights that BEGIN the step (no grad), micro-batch
   by micro-batch, with the entropy for the metrics; and, when kl_coef > 0, the frozen
   reference policy's log-probs the same way. Each rank scores its own rows; a sum over ranks
   gives every rank the whole [B,T] (cheap: B*T floats) so that step 2 sees whole groups.
   (`reuse` mode folds this pass into step 3 when the step is ONE optimizer update, see
   update_step.)
2. token advantages A_kt from the algorithm core (GRPO A_k from the rewards, re-weighted per
   token by the teacher where the preset says so), identical on every rank, computed once.
3. PPO mini-batches: the batch's groups are split into mini-batches of `ppo_mini_batch_size`
   prompts, and the mini-batches are run `ppo_epochs` times. Each mini-batch is ONE optimizer
   step: micro-batched loss and backward (the loss of a micro-batch is normalised by the
   token / sequence counts of its WHOLE mini-batch, all micro-batches, all ranks, so the
   micro-batch losses sum to the mini-batch loss; multiplied by the world size because the
   engine averages gradients over ranks), then engine.step() (ZeRO reduction, clipping,
   AdamW). From the second update on, the weights have moved: the ratio exp(logp - s_t) is
   against pi_old and the PPO clip binds. The truncated importance weight exp(s_t - e_t)
   (engine vs pi_old) is unchanged by that.
4. the lr schedule advances once per RL step (as verl's), whatever the number of updates.

With one update per step, s_t equals the log-probs of the update's own forward (the ratio is
1): "reuse" takes s_t from that forward, before each micro-batch's loss, one pass fewer.
"""


from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor

from trainer.algorithm import AlgorithmConfig, policy_loss, token_advantages
from trainer.batch import (
    TrainBatch,
    micro_batches,
    num_micro_batches,
    ppo_mini_batches,
    shard_rows,
)
from trainer.config import TrainerConfig
from trainer.dist import all_reduce_sum
from trainer.model import Policy
from trainer.reference import Reference


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
def old_logprobs(policy: Policy | Reference, batch: TrainBatch, mine: list[list[int]],
                 with_entropy: bool = True) -> tuple[Tensor, Tensor]:
    """s_t (or the reference's log-probs) and the entropy [B,T] for the whole batch (rows of
    other ranks filled by them)."""
    s = torch.zeros(batch.input_ids.shape)
    ent = torch.zeros(batch.input_ids.shape)
    for rows in mine:
        mb = batch.select(rows) if rows else _dummy(batch)
        lp, h = policy.forward(mb.input_ids, mb.attention_mask, mb.response_mask,
                               with_entropy=with_entropy)
        if rows:
            _scatter_rows(s, rows, lp)
            if with_entropy:
                _scatter_rows(ent, rows, h)
    all_reduce_sum(s)
    if with_entropy:
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
                micro_batch_size: int, old_logprobs_mode: str = "recompute",
                ppo_mini_batch_size: int | None = None, ppo_epochs: int = 1,
                norm_len: int | None = None, reference: Reference | None = None,
                between: Callable[[], None] | None = None) -> dict[str, float]:
    """Run steps 1-4 on `batch` (the whole batch, identical on every rank). Returns metrics
    (identical on every rank) including seconds per phase and tokens/s.

    ppo_mini_batch_size: prompts (groups) per optimizer update; None = the whole batch.
    ppo_epochs: passes over the mini-batches. norm_len: Dr.GRPO's constant when
    alg.loss_norm_len is unset. reference: the frozen policy of the KL term (kl_coef > 0).
    old_logprobs_mode "recompute": step 1 is a separate no-grad pass. "reuse": only when the
    step is a single update (otherwise the weights move between updates and s_t must come
    from the weights that begin the step): s_t is taken from the update's own forward
    (detached) micro-batch by micro-batch, exactly the same numbers, one forward fewer.
    between: called before each micro-batch and each optimizer step (trainer/threads.py adapts
    the thread count there)."""
    if alg.kl_coef > 0 and reference is None:
        raise ValueError("kl_coef > 0 needs the reference policy (trainer.reference)")
    rank, world = policy.rank, policy.world_size
    minis = ppo_mini_batches(batch, ppo_mini_batch_size)
    n_updates = len(minis) * ppo_epochs
    reuse = old_logprobs_mode == "reuse" and n_updates == 1
    mask = batch.response_mask
    s_engine, has_s_engine = _engine_student(batch, alg)

    def advantages(s: Tensor):  # noqa: ANN202 - TokenAdvantages
        return token_advantages(alg, rewards=batch.rewards, group_ids=batch.group_ids,
                                mask=mask, student_logprobs=s,
                                teacher_logprobs=batch.teacher_logprobs,
                                has_teacher=batch.has_teacher, correct=batch.correct, step=step,
                                engine_student_logprobs=s_engine,
                                has_engine_student=has_s_engine)

    t0 = time.perf_counter()
    whole = _plan(batch, list(range(batch.size)), rank, world, micro_batch_size)
    if reuse:
        s = torch.zeros(mask.shape)
        entropy = torch.zeros(mask.shape)
    else:
        s, entropy = old_logprobs(policy, batch, whole)
    ref = old_logprobs(reference, batch, whole, with_entropy=False)[0] if reference else None
    t1 = time.perf_counter()
    adv = None if reuse else advantages(s)
    t_adv = time.perf_counter() - t1

    need_entropy = alg.entropy_coef > 0
    sums = _Sums()
    loss_total = torch.zeros((), dtype=torch.float64)
    t_opt = 0.0
    grad_norms: list[float] = []
    lr = float(policy.engine.get_lr()[0])  # the lr this step uses (advanced once, at the end)
    n_mb = 0
    for epoch in range(ppo_epochs):
        for j, rows_j in enumerate(minis):
            n_tokens = float(mask[rows_j].sum())
            n_seqs = float((mask[rows_j].sum(-1) > 0).sum())
            plan = whole if len(minis) == 1 else _plan(batch, rows_j, rank, world,
                                                        micro_batch_size)
            n_mb += len(plan)
            for rows in plan:
                if between is not None:
                    between()
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
                    # A_kt of a row needs only its own s_t (and its group's rewards): the rows
                    # of this micro-batch are final, the others are not read.
                    ta = time.perf_counter()
                    adv = advantages(s)
                    t_adv += time.perf_counter() - ta
                out = policy_loss(
                    lp, s[idx, :T].to(dev), adv.advantages[idx, :T].to(dev),
                    mb.response_mask.to(dev), alg, engine_logprobs=mb.engine_logprobs.to(dev),
                    ref_logprobs=ref[idx, :T].to(dev) if ref is not None else None,
                    entropy=h if need_entropy else None, num_tokens=n_tokens, num_seqs=n_seqs,
                    norm_len=norm_len,
                )
                policy.engine.backward(out.loss * world, scale_wrt_gas=False)
                loss_total += float(out.loss.detach()) / n_updates
                sums.add(out.metrics, float(mb.response_mask.sum()))
            if between is not None:
                between()
            ts = time.perf_counter()
            last = epoch == ppo_epochs - 1 and j == len(minis) - 1
            policy.engine.step(lr_kwargs={"advance": last})  # one lr step per RL step
            gn = policy.engine.get_global_grad_norm()  # the same on every rank
            if gn is not None:
                grad_norms.append(float(gn))
            t_opt += time.perf_counter() - ts
    t4 = time.perf_counter()
    if reuse:  # every rank's rows, for the batch-level diagnostics
        all_reduce_sum(s)
        all_reduce_sum(entropy)
        adv = advantages(s)
    n_tokens = float(mask.sum())
    all_reduce_sum(loss_total)
    metrics = sums.reduce(LOSS_KEYS)
    if grad_norms:  # the mean over the step's updates
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
    metrics["entropy"] = float((entropy * mask).sum() / max(n_tokens, 1.0))
    metrics.update({k: float(v) for k, v in adv.metrics.items()})
    metrics["loss"] = float(loss_total)
    metrics["lr"] = lr
    metrics["adv_std"] = float(adv.advantages[mask].std()) if n_tokens > 1 else 0.0
    metrics["train_tokens"] = n_tokens
    metrics["micro_batches"] = float(n_mb)
    metrics["optimizer_steps"] = float(n_updates)
    metrics["time_old_logprobs_s"] = t1 - t0
    metrics["time_advantages_s"] = t_adv
    metrics["time_fwd_bwd_s"] = t4 - t1 - t_adv - t_opt
    metrics["time_optimizer_s"] = t_opt
    metrics["time_update_s"] = time.perf_counter() - t0
    metrics["tokens_per_s"] = n_tokens * ppo_epochs / max(t4 - t0, 1e-9)
    return metrics


def _engine_student(batch: TrainBatch, alg: AlgorithmConfig) -> tuple[Tensor, Tensor]:
    """The engine's s_t of the batch's tokens, and its rows: the teacher engine's score of the
    student context when the teacher sent one (student_logprobs: engine; D uses it); otherwise
    the sampling engine's e_t of the rows sampled by the weights that begin this step
    (staleness 0), which measures the same engine/trainer gap for the engine_mismatch metric
    only (D keeps the trainer's s_t in trainer mode)."""
    if alg.student_logprobs == "engine" or bool(batch.has_student_engine.any()):
        return batch.student_engine_logprobs, batch.has_student_engine
    return batch.engine_logprobs, batch.staleness == 0


def _plan(batch: TrainBatch, rows: list[int], rank: int, world: int,
          micro_batch_size: int) -> list[list[int]]:
    """This rank's micro-batches of `rows` (the same count on every rank)."""
    mine = shard_rows(batch, rank, world, rows)
    return micro_batches(mine, micro_batch_size,
                         num_micro_batches(len(rows), world, micro_batch_size))


def train_step(cfg: TrainerConfig, policy: Policy, batch: TrainBatch, step: int,
               reference: Reference | None = None,
               between: Callable[[], None] | None = None) -> dict[str, float]:
    """`update_step` with the trainer config's knobs (what the trainer process calls)."""
    return update_step(policy, batch, cfg.algorithm, step=step,
                       micro_batch_size=cfg.micro_batch_size,
                       old_logprobs_mode=cfg.old_logprobs,
                       ppo_mini_batch_size=cfg.ppo_mini_batch_size, ppo_epochs=cfg.ppo_epochs,
                       norm_len=cfg.sampling.max_new_tokens, reference=reference,
                       between=between)

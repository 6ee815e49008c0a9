"""Supervised fine-tuning of the tiny model on Countdown, in plain torch.

Two kinds of example, mixed in every batch, loss on response tokens (and EOS) only:
  student:  chat(prompt)                          -> a target solution
  teacher:  chat(template(prompt, demonstration)) -> a target solution
The target is drawn from the problem's genuinely different solutions (by default only the
shortest ones: fewer steps are easier for a 200k-parameter model, and ties still leave the
student several paths). In a teacher example the demonstration is, with probability
`copy_fraction`, the target itself (so the model learns to use its context: the teacher is
then much better than the student), otherwise any valid solution, possibly another path (so
a teacher shown one path still gives some probability to others, as when RLRT's teacher
scores a sibling rollout).

Deterministic under `seed` (init, data order, sampling) unless `time_limit_s` cuts it short.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

from tasks.countdown import Problem, render_solution, solve_many
from tasks.teacher import render_teacher_prompt
from trainer.bootstrap.chat import encode_prompts, encode_responses


@dataclass
class SFTConfig:
    steps: int = 900
    batch_size: int = 32  # measured: the token budget, not the batch size, sets the result
    lr: float = 3e-3  # measured at this budget: 3e-3 ~ 5e-3 > 1e-2 > 2e-2
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup: int = 20
    weight_decay: float = 0.01
    # share of examples in the privileged-context format, and of those, the share whose target
    # is the demonstration itself. Measured: 0.2/0.6 left the teacher only ~2 nats better than
    # the student on a solution; 0.25/0.8 gives ~4 nats at no cost in student accuracy.
    teacher_fraction: float = 0.25
    copy_fraction: float = 0.8
    # student targets: every genuinely different solution, or only the shortest ones (fewer
    # steps are easier for a 200k-parameter model: more accuracy for the same budget)
    targets: Literal["all", "shortest"] = "shortest"
    seed: int = 0
    time_limit_s: float | None = None  # safety cap; stopping early breaks determinism
    log_every: int = 50


@dataclass
class SFTItem:
    problem: Problem
    prompt_ids: list[int]
    solutions: list[str]  # every genuinely different solution, response format
    solution_ids: list[list[int]]  # the same, tokenized, with EOS
    n_shortest: int  # solutions[:n_shortest] have the fewest steps (solve() sorts by length)


def prepare(tok: PreTrainedTokenizerFast, problems: list[Problem]) -> list[SFTItem]:
    """Solve and tokenize once up front; each step then only renders teacher prompts."""
    sols = [[render_solution(s, p.target) for s in ss] or [p.solution_text()]
            for p, ss in zip(problems, solve_many(problems), strict=True)]
    prompt_ids = encode_prompts(tok, [p.prompt_text() for p in problems])
    flat = encode_responses(tok, [s for ss in sols for s in ss])
    items, k = [], 0
    for p, ids, ss in zip(problems, prompt_ids, sols, strict=True):
        n_short = sum(s.count("\n") == ss[0].count("\n") for s in ss)
        items.append(SFTItem(p, ids, ss, flat[k:k + len(ss)], n_short))
        k += len(ss)
    return items


Pair = tuple[list[int], list[int]]  # (prompt ids, response ids incl. EOS)


def _collate(pairs: list[Pair], pad_id: int):
    """Right-padded input ids, attention mask and labels (-100 outside the response)."""
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p):n] = torch.tensor(r)
        mask[i, :n] = 1
    return ids, mask, labels


def sample_batch(tok: PreTrainedTokenizerFast, items: list[SFTItem], cfg: SFTConfig,
                 rng: random.Random) -> tuple[list[Pair], list[Pair]]:
    """(student pairs, teacher pairs) of (prompt ids, response ids) for one batch. Kept apart
    because teacher examples are about twice as long: padding them together wastes compute."""
    student: list[Pair] = []
    teacher: list[tuple[str, list[int]]] = []  # (user message, response ids)
    for _ in range(cfg.batch_size):
        it = items[rng.randrange(len(items))]
        t = rng.randrange(len(it.solutions) if cfg.targets == "all" else it.n_shortest)
        if rng.random() < cfg.teacher_fraction:
            d = t if rng.random() < cfg.copy_fraction else rng.randrange(len(it.solutions))
            teacher.append((render_teacher_prompt(it.problem.prompt_text(), it.solutions[d]),
                            it.solution_ids[t]))
        else:
            student.append((it.prompt_ids, it.solution_ids[t]))
    # one tokenizer call for all teacher prompts of the batch
    prompts = encode_prompts(tok, [u for u, _ in teacher]) if teacher else []
    return student, [(p, r) for p, (_, r) in zip(prompts, teacher, strict=True)]


def lr_at(step: int, cfg: SFTConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def train_sft(model: Qwen3ForCausalLM, tok: PreTrainedTokenizerFast, items: list[SFTItem],
              cfg: SFTConfig, log=print) -> dict:
    """Train in place. Returns {steps_done, final_loss (mean of the last 20 steps), seconds}."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # norms: no weight decay
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    step = 0
    for step in range(cfg.steps):
        if cfg.time_limit_s is not None and time.perf_counter() - t0 > cfg.time_limit_s:
            log(f"sft: time limit reached at step {step}")
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        parts = [p for p in sample_batch(tok, items, cfg, rng) if p]
        n_tokens = sum(len(r) for part in parts for _, r in part)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for part in parts:  # token-mean over the whole batch, accumulated over the two parts
            ids, mask, labels = _collate(part, tok.pad_token_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
            (loss / n_tokens).backward()
            loss_sum += loss.item()
        loss_val = loss_sum / n_tokens
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss_val)
        if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            log(f"sft step {step:5d} loss {loss_val:.4f} lr {lr_at(step, cfg):.2e} "
                f"{time.perf_counter() - t0:6.1f}s")
    else:
        step = cfg.steps
    model.eval()
    tail = losses[-20:]
    return {"steps_done": step, "final_loss": sum(tail) / max(1, len(tail)),
            "seconds": time.perf_counter() - t0}

"""ScoredGroups -> padded training tensors, and how a batch is split over ranks and
micro-batches.

One row per response: input_ids = prompt_ids + response tokens, right-padded. Per-token
arrays (engine log-probs e_t, teacher log-probs q_t, the response mask) sit at the positions
of the response tokens, so `token_logprobs(...)[:, t]` (the log-prob of input token t) lines
up with them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from protocol.messages import ScoredGroup


@dataclass
class TrainBatch:
    input_ids: Tensor  # [B,T] long
    attention_mask: Tensor  # [B,T] long
    response_mask: Tensor  # [B,T] bool, the response tokens (what is trained on)
    engine_logprobs: Tensor  # [B,T] float32 e_t, 0 off the mask
    teacher_logprobs: Tensor  # [B,T] float32 q_t, 0 where not scored
    has_teacher: Tensor  # [B] bool, the row has teacher scores
    rewards: Tensor  # [B] float32
    correct: Tensor  # [B] bool
    group_ids: Tensor  # [B] long, group index within the batch
    staleness: Tensor  # [B] long, trainer version - engine version of the sample
    response_len: Tensor  # [B] long
    truncated: Tensor  # [B] bool, stopped by the length cap
    # s_t scored by the teacher's engine on the student context (TeacherRequest.score_student)
    student_engine_logprobs: Tensor  # [B,T] float32, 0 where not scored
    has_student_engine: Tensor  # [B] bool

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())

    def select(self, rows: list[int]) -> TrainBatch:
        """Rows `rows`, trimmed to their own longest sequence (less padding per micro-batch)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        t = max(1, int(self.attention_mask[idx].sum(-1).max())) if rows else 1
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)[idx]
            out[f.name] = v[:, :t] if v.dim() == 2 else v
        return TrainBatch(**out)


def build_batch(groups: list[ScoredGroup], version: int, pad_id: int,
                max_seq_len: int | None = None) -> TrainBatch:
    """Stack the responses of `groups` (in order) into one right-padded batch."""
    rows: list[tuple[list[int], int, ScoredGroup, int]] = []
    for gi, g in enumerate(groups):
        prompt = [int(x) for x in g.task.prompt_ids]
        for k in range(len(g.responses)):
            rows.append((prompt, gi, g, k))
    if not rows:
        raise ValueError("no responses to train on")
    lengths = [len(p) + len(g.responses[k].token_ids) for p, _, g, k in rows]
    T = max(lengths)
    if max_seq_len is not None and T > max_seq_len:
        raise ValueError(f"a sequence of {T} tokens exceeds max_seq_len={max_seq_len}")
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    resp = torch.zeros(B, T, dtype=torch.bool)
    eng = torch.zeros(B, T)
    teach = torch.zeros(B, T)
    has_t = torch.zeros(B, dtype=torch.bool)
    rewards = torch.zeros(B)
    correct = torch.zeros(B, dtype=torch.bool)
    gids = torch.zeros(B, dtype=torch.long)
    stale = torch.zeros(B, dtype=torch.long)
    rlen = torch.zeros(B, dtype=torch.long)
    trunc = torch.zeros(B, dtype=torch.bool)
    s_eng = torch.zeros(B, T)
    has_s_eng = torch.zeros(B, dtype=torch.bool)
    for i, (prompt, gi, g, k) in enumerate(rows):
        r = g.responses[k]
        p, n = len(prompt), len(r.token_ids)
        input_ids[i, :p] = torch.tensor(prompt, dtype=torch.long)
        if n:
            input_ids[i, p:p + n] = torch.from_numpy(r.token_ids.astype("int64"))
            eng[i, p:p + n] = torch.from_numpy(r.logprobs.astype("float32"))
        attn[i, :p + n] = 1
        resp[i, p:p + n] = True
        ts = g.teacher[k]
        if ts is not None and n:
            teach[i, p:p + n] = torch.from_numpy(ts.logprobs.astype("float32"))
            has_t[i] = True
            if ts.student_logprobs is not None:
                s_eng[i, p:p + n] = torch.from_numpy(ts.student_logprobs.astype("float32"))
                has_s_eng[i] = True
        v = g.verifications[k]
        rewards[i] = float(v.reward)
        correct[i] = bool(v.correct)
        gids[i] = gi
        stale[i] = version - g.engine_version
        rlen[i] = n
        trunc[i] = r.finish_reason == "length"
    return TrainBatch(input_ids, attn, resp, eng, teach, has_t, rewards, correct, gids, stale,
                      rlen, trunc, s_eng, has_s_eng)


def shard_rows(batch: TrainBatch, rank: int, world_size: int,
               rows: list[int] | None = None) -> list[int]:
    """This rank's rows (of `rows`, default all): sorted by length (longest first) and dealt
    round-robin, so every rank gets about the same number of tokens, and consecutive rows
    (one micro-batch) have similar lengths (little padding)."""
    lengths = batch.attention_mask.sum(-1).tolist()
    pool = range(batch.size) if rows is None else rows
    order = sorted(pool, key=lambda i: (-lengths[i], i))
    return order[rank::world_size]


def ppo_mini_batches(batch: TrainBatch, prompts: int | None) -> list[list[int]]:
    """The rows of each PPO mini-batch: the batch's groups, in batch order, `prompts` groups
    per mini-batch (the last may be smaller); None (or >= the groups) = one mini-batch.
    Whole groups only, as verl's ppo_mini_batch_size (counted in prompts) keeps them."""
    gids = batch.group_ids.tolist()
    groups = sorted(set(gids))
    if prompts is None or prompts >= len(groups):
        return [list(range(batch.size))]
    out = []
    for k in range(0, len(groups), prompts):
        chosen = set(groups[k:k + prompts])
        out.append([i for i, g in enumerate(gids) if g in chosen])
    return out


def micro_batches(rows: list[int], size: int, count: int) -> list[list[int]]:
    """`rows` in chunks of `size`, padded with empty chunks up to `count`: every rank must run
    the same number of forward/backward passes (ZeRO's collectives pair them up)."""
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
    return chunks + [[] for _ in range(count - len(chunks))]


def num_micro_batches(batch_size: int, world_size: int, size: int) -> int:
    per_rank = -(-batch_size // world_size)
    return max(1, -(-per_rank // size))

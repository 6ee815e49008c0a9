"""ScoredGroups -> padded tensors: every per-token array lands on its response token."""

from __future__ import annotations

import numpy as np
import torch
from support.groups import scored_group

from trainer.batch import build_batch, micro_batches, num_micro_batches, shard_rows


def test_build_batch_aligns_tokens_logprobs_and_teacher():
    rng = np.random.default_rng(0)
    groups = [scored_group([1, 0, 1], rng=rng, teacher_rows=[2], engine_version=3, task_index=0),
              scored_group([0, 0], rng=rng, engine_version=5, task_index=1)]
    b = build_batch(groups, version=5, pad_id=0)
    assert b.size == 5
    row = 0
    for gi, g in enumerate(groups):
        p = len(g.task.prompt_ids)
        for k, r in enumerate(g.responses):
            n = len(r.token_ids)
            assert b.input_ids[row, :p].tolist() == g.task.prompt_ids.tolist()
            assert b.input_ids[row, p:p + n].tolist() == r.token_ids.tolist()
            assert b.response_mask[row].nonzero().flatten().tolist() == list(range(p, p + n))
            assert torch.equal(b.engine_logprobs[row, p:p + n], torch.from_numpy(r.logprobs))
            assert int(b.attention_mask[row].sum()) == p + n
            t = g.teacher[k]
            assert bool(b.has_teacher[row]) == (t is not None)
            if t is not None:
                assert torch.equal(b.teacher_logprobs[row, p:p + n], torch.from_numpy(t.logprobs))
            assert b.rewards[row] == g.verifications[k].reward
            assert int(b.group_ids[row]) == gi
            assert int(b.staleness[row]) == 5 - g.engine_version
            row += 1
    # padding is masked out everywhere
    pad = b.attention_mask == 0
    assert not b.response_mask[pad].any() and (b.engine_logprobs[pad] == 0).all()


def test_select_trims_padding_and_sharding_covers_every_row_once():
    rng = np.random.default_rng(1)
    groups = [scored_group([1, 0, 1, 0], rng=rng, resp_len=(1, 12), task_index=i) for i in range(3)]
    b = build_batch(groups, version=0, pad_id=0)
    for world in (1, 2, 3, 5):
        shards = [shard_rows(b, r, world) for r in range(world)]
        flat = sorted(i for s in shards for i in s)
        assert flat == list(range(b.size))
        counts = [len(s) for s in shards]
        assert max(counts) - min(counts) <= 1
    rows = shard_rows(b, 0, 1)[-3:]  # the three shortest
    sub = b.select(rows)
    assert sub.input_ids.shape[1] == int(b.attention_mask[rows].sum(-1).max())
    assert sub.num_tokens == int(b.response_mask[rows].sum())
    # every rank runs the same number of micro-batches, padded with empty ones
    n = num_micro_batches(b.size, 5, 2)
    assert n == 2
    assert micro_batches([7, 8, 9], 2, n) == [[7, 8], [9]]
    assert micro_batches([7], 2, n) == [[7], []]

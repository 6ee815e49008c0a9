"""Checkpoints: a fresh engine loaded from one continues exactly like the one that saved it
(model, AdamW moments, lr schedule); RNG states round-trip; an interrupted save never
becomes `latest`."""

from __future__ import annotations

import json
import random

import pytest
import torch
from support.update_case import case_batch, case_config

from trainer import dist
from trainer.checkpoint import Checkpointer
from trainer.model import build_policy, full_state_dict
from trainer.update import update_step


@pytest.mark.parametrize("stage", [0, 3])
def test_resumed_engine_continues_identically(policy_dir, tmp_path, stage):
    cfg = case_config(policy_dir, zero_stage=stage, warmup_steps=3)  # lr still ramping at 2
    rank, world = dist.setup("cpu", 120)
    batch = case_batch()

    def steps(policy, start, n):
        return [update_step(policy, batch, cfg.algorithm, step=s, micro_batch_size=3)
                for s in range(start, start + n)]

    a = build_policy(cfg, rank=rank, world_size=world, device="cpu")
    steps(a, 0, 2)
    ckpt = Checkpointer(tmp_path / "ckpt", keep=1)
    ckpt.save(a, 2, {"driver": {"admitted": 7}})
    after = steps(a, 2, 2)
    expected = full_state_dict(a)

    b = build_policy(cfg, rank=rank, world_size=world, device="cpu")
    state = ckpt.load(b)
    assert state == {"step": 2, "driver": {"admitted": 7}}
    again = steps(b, 2, 2)
    for x, y in zip(after, again, strict=True):
        assert x["loss"] == y["loss"] and x["lr"] == y["lr"]
        assert x["grad_norm"] == y["grad_norm"]
    got = full_state_dict(b)
    for n, t in expected.items():
        assert torch.equal(got[n], t), n


def test_rng_state_round_trips(policy_dir, tmp_path):
    cfg = case_config(policy_dir)
    rank, world = dist.setup("cpu", 120)
    p = build_policy(cfg, rank=rank, world_size=world, device="cpu")
    ckpt = Checkpointer(tmp_path / "ckpt")
    random.seed(5)
    torch.manual_seed(5)
    ckpt.save(p, 1, {})
    want = (random.random(), torch.rand(2))
    random.seed(77)
    torch.manual_seed(77)
    ckpt.load(p)
    got = (random.random(), torch.rand(2))
    assert got[0] == want[0] and torch.equal(got[1], want[1])


def test_an_interrupted_save_is_never_latest(policy_dir, tmp_path):
    cfg = case_config(policy_dir)
    rank, world = dist.setup("cpu", 120)
    p = build_policy(cfg, rank=rank, world_size=world, device="cpu")
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    ckpt.save(p, 4, {"x": 1})
    # a save of step 6 killed half way: its directory exists, latest.json does not name it
    half = tmp_path / "ckpt" / "step-00000006"
    half.mkdir()
    (half / "junk").write_text("partial")
    assert ckpt.latest() == {"tag": "step-00000004", "step": 4}
    assert ckpt.load(p)["x"] == 1
    ckpt.save(p, 6, {"x": 2})  # the retry replaces the partial directory
    assert not (half / "junk").exists()
    assert json.loads((tmp_path / "ckpt" / "latest.json").read_text())["step"] == 6
    ckpt.save(p, 8, {"x": 3})
    kept = sorted(d.name for d in (tmp_path / "ckpt").iterdir() if d.is_dir())
    assert kept == ["step-00000006", "step-00000008"]

"""Checkpoints you can trust (issue 26): a manifest of hashes written last and verified on
load; a resume falls back past a cut, corrupted or NaN checkpoint to the newest good one and
says so; `step=` resumes from an older one on purpose; NaN/Inf weights are never committed;
a full disk is named as such and leaves the previous checkpoint in force."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from support.update_case import case_config

from trainer import dist
from trainer.checkpoint import (
    MANIFEST,
    Checkpointer,
    CheckpointError,
    NonFiniteWeights,
    _atomic_write,
)
from trainer.disk import DiskFull
from trainer.model import build_policy, full_state_dict


@pytest.fixture()
def policy(policy_dir):
    rank, world = dist.setup("cpu", 120)
    return build_policy(case_config(policy_dir), rank=rank, world_size=world, device="cpu")


def _bump(policy, by: float) -> None:
    """Change the weights so that checkpoints of different steps differ."""
    with torch.no_grad():
        for p in policy.engine.module.parameters():
            p.add_(by)


def _saved(tmp_path, policy, steps=(2, 4)) -> Checkpointer:
    ckpt = Checkpointer(tmp_path / "ckpt", keep=3)
    for s in steps:
        _bump(policy, 0.01)
        ckpt.save(policy, s, {"s": s})
    return ckpt


def _model_file(ckpt: Checkpointer, step: int):
    d = ckpt.root / f"step-{step:08d}"
    return max((f for f in d.rglob("*.pt")), key=lambda f: f.stat().st_size)


def test_every_file_is_in_the_manifest_and_verifies(tmp_path, policy):
    ckpt = _saved(tmp_path, policy)
    files = json.loads((ckpt.root / "step-00000004" / MANIFEST).read_text())["files"]
    assert "trainer_state.json" in files and "rng-rank0.json" in files
    assert any(name.endswith(".pt") for name in files)
    assert ckpt.verify(4) is None and ckpt.choose() == 4


@pytest.mark.parametrize("damage", ["cut", "flip"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path, policy, policy_dir,
                                                                 damage, caplog):
    ckpt = _saved(tmp_path, policy)
    f = _model_file(ckpt, 4)
    data = bytearray(f.read_bytes())
    if damage == "cut":  # a crash mid-write
        f.write_bytes(data[: len(data) // 2])
    else:  # bytes damaged in place, same size
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    rel = f.relative_to(ckpt.root / "step-00000004")
    assert ckpt.verify(4) == (f"{rel} is {len(data) // 2} bytes, the manifest says {len(data)} "
                              "(cut)" if damage == "cut" else
                              f"{rel} does not match its hash (corrupted)")
    # Expected: exactly the weights saved at step 2.
    want = Checkpointer(tmp_path / "ckpt")
    fresh = build_policy(case_config(policy_dir), rank=0, world_size=1, device="cpu")
    with caplog.at_level(logging.WARNING, logger="rlrt.trainer.checkpoint"):
        state = want.load(fresh)
    assert state == {"step": 2, "s": 2}
    assert "resuming from checkpoint step 2, the newest that verifies (skipped: step 4:" \
        in caplog.text
    again = build_policy(case_config(policy_dir), rank=0, world_size=1, device="cpu")
    Checkpointer(tmp_path / "ckpt").load(again, step=2)
    for n, t in full_state_dict(fresh).items():
        assert torch.equal(t, full_state_dict(again)[n]), n


def test_resume_from_an_older_step_and_latest_follows_it(tmp_path, policy, policy_dir):
    ckpt = _saved(tmp_path, policy, steps=(2, 4, 6))
    fresh = build_policy(case_config(policy_dir), rank=0, world_size=1, device="cpu")
    assert ckpt.load(fresh, step=2)["step"] == 2
    # a crash right after: a plain resume continues the line chosen, not the abandoned one
    assert json.loads((ckpt.root / "latest.json").read_text())["step"] == 2
    assert ckpt.choose() == 2
    with pytest.raises(CheckpointError, match=r"--resume-from 3: .* \(missing\); checkpoints "
                                              r"that verify: \[6, 4, 2\]"):
        ckpt.load(fresh, step=3)


def test_a_checkpoint_without_manifest_is_a_cut_save_unless_latest_names_it(tmp_path, policy):
    ckpt = _saved(tmp_path, policy)
    (ckpt.root / "step-00000004" / MANIFEST).unlink()
    assert ckpt.verify(4) is None  # latest.json names it: written before manifests
    _atomic_write(ckpt.root / "latest.json", json.dumps({"tag": "step-00000002", "step": 2}))
    assert ckpt.verify(4) == "no manifest (its save did not complete)"


def test_nan_weights_are_never_committed(tmp_path, policy):
    ckpt = _saved(tmp_path, policy, steps=(2,))
    with torch.no_grad():
        next(policy.engine.module.parameters())[0].fill_(float("nan"))
    with pytest.raises(NonFiniteWeights, match=r"step 4 produced \d+ NaN/Inf values .*not "
                                               r"checkpointed -- the last good one is checkpoint "
                                               r".*step-00000002 \(step 2\)"):
        ckpt.save(policy, 4, {})
    assert ckpt.choose() == 2 and not (ckpt.root / "step-00000004").exists()


def test_a_nan_checkpoint_is_refused_on_load_and_the_older_one_used(tmp_path, policy, policy_dir):
    """NaN bytes that match their manifest (a checkpoint written by a version without the
    save-time check): the load itself refuses them."""
    ckpt = _saved(tmp_path, policy)
    d = ckpt.root / "step-00000004"
    f = _model_file(ckpt, 4)
    sd = torch.load(f, weights_only=False)
    module = sd["module"]
    # a layer's weight (the embedding may be tied to the head, whose copy loads last)
    name = next(n for n, _ in policy.engine.module.named_parameters() if ".layers.0." in n)
    module[name] = torch.full_like(module[name], float("inf"))
    torch.save(sd, f)
    _atomic_write(d / MANIFEST, json.dumps(ckpt._manifest(d)))  # noqa: SLF001
    assert ckpt.verify(4) is None
    fresh = build_policy(case_config(policy_dir), rank=0, world_size=1, device="cpu")
    assert ckpt.load(fresh)["step"] == 2
    with pytest.raises(NonFiniteWeights, match="--resume-from 4: .* holds .*NaN/Inf"):
        ckpt.load(fresh, step=4)


def test_a_full_disk_is_named_and_the_previous_checkpoint_kept(tmp_path, policy):
    ckpt = _saved(tmp_path, policy, steps=(2,))
    # The kernel's own ENOSPC: the next write of latest.json goes to /dev/full.
    os.symlink("/dev/full", ckpt.root / ".latest.json.tmp")
    with pytest.raises(DiskFull) as e:
        ckpt.save(policy, 4, {})
    msg = str(e.value)
    assert msg.startswith("disk full: no space left on the device saving checkpoint ")
    assert "step-00000004" in msg and " free there); kept: checkpoint " in msg
    assert "step-00000002 (step 2)" in msg and "--resume" in msg
    assert ckpt.choose() == 2  # the cut save never became latest

"""Checkpoints you can trust (issue 26): a manifest of hashes written last and verified on
load; a resume falls back past a cut, corrupted or NaN checkpoint to the newest good one and
says so; `step=` resumes from an older one on purpose; NaN/Inf weights are never committed;
a full disk is named as such and leaves the previous checkpoint in force, and a resume on a
disk still full ends with that one line (not a previous run's log tail)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from support.update_case import case_config

from rlrt.disk_space import PROBE
from rlrt.processes import Child
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


REPO = Path(__file__).resolve().parents[1]


def test_a_resume_on_a_disk_still_full_ends_with_one_line_and_the_resume_command(tmp_path):
    """The disk-full run of the campaign, resumed before space was freed, used to print the
    previous run's traceback cut mid-line: now the launcher asks the kernel first."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    run = tmp_path / "run"
    ckpt = run / "trainer" / "checkpoints"
    ckpt.mkdir(parents=True)  # what the stopped run kept
    _atomic_write(ckpt / "latest.json", json.dumps({"tag": "step-00000002", "step": 2}))
    (run / "verifier.log").write_text("Traceback (most recent call last):\n  File \"x\", li")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "run": {"dir": str(run), "bootstrap": False, "eval_prompts": 0},
        "trainer": {"model_path": str(model)},
    }))
    # The kernel's own ENOSPC for the launcher's probe of the run's folder.
    (run / PROBE).symlink_to("/dev/full")
    res = subprocess.run([sys.executable, "-m", "rlrt.cli", "train", "--config", str(cfg),
                          "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400"})
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"error: disk full at {run} ("), out[-3000:]
    assert f" free there); kept: checkpoint {ckpt / 'step-00000002'} (step 2). Free space on " \
        f"that disk, then: rlrt train --config {cfg} --resume" in lines[-1]
    assert "Traceback" not in out
    assert not (run / "redis" / "appendonly.aof").exists()  # nothing was started


def test_a_part_that_dies_while_starting_shows_only_this_starts_log(tmp_path):
    """The log is appended to across runs: a part that died silently (no room to write) must
    not be shown with the previous run's traceback, and a long tail starts at a line."""
    log = tmp_path / "verifier.log"
    log.write_text("Traceback (most recent call last):\n  File \"old run\", li")
    silent = Child("verifier", [sys.executable, "-c", "raise SystemExit(1)"], dict(os.environ),
                   log_path=log, ready_url="http://127.0.0.1:9/readyz")
    silent.start()
    with pytest.raises(RuntimeError) as e:
        silent.wait_ready(60)
    silent.stop()
    assert str(e.value) == (f"verifier exited with code 1 while starting:\n(nothing in its log "
                            f"{log} from this start)")
    talks = Child("verifier", [sys.executable, "-c", "print('line ' * 400); print('the end');"
                                                     "raise SystemExit(3)"], dict(os.environ),
                  log_path=log, ready_url="http://127.0.0.1:9/readyz")
    talks.start()
    with pytest.raises(RuntimeError) as e:
        talks.wait_ready(60)
    talks.stop()
    tail = str(e.value).split(":\n", 1)[1]
    assert tail == "the end\n" and "old run" not in str(e.value)

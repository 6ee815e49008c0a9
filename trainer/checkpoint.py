"""Resumable checkpoints, written atomically.

    <root>/step-00000012/     DeepSpeed's files (model, optimizer incl. ZeRO partitions,
                              lr scheduler) + trainer_state.json + rng-rank<r>.pt
    <root>/latest.json        {"tag": "step-00000012", "step": 12}

A checkpoint exists only once `latest.json` names it: that file is replaced with
os.replace after every rank has finished writing (barrier), so a trainer killed mid-write
leaves the previous checkpoint in force and a half-written directory that the next save
removes. `trainer_state.json` holds the step, the policy version and the driver's state
(data cursor, admitted tasks, in-flight tasks, replacements, counters, run nonce).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.dist import barrier
from trainer.model import Policy

log = logging.getLogger("rlrt.trainer.checkpoint")

LATEST = "latest.json"
STATE = "trainer_state.json"


def _tag(step: int) -> str:
    return f"step-{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    def __init__(self, root: str | Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    def latest(self) -> dict[str, Any] | None:
        p = self.root / LATEST
        if not p.is_file():
            return None
        info = json.loads(p.read_text())
        if not (self.root / info["tag"]).is_dir():
            raise FileNotFoundError(f"{p} names {info['tag']}, which is missing")
        return info

    def save(self, policy: Policy, step: int, state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. `step` = optimizer steps done; `state` is the
        trainer state of rank 0 (ignored on the others)."""
        tag = _tag(step)
        d = self.root / tag
        if policy.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if d.exists():  # a half-written attempt of a killed run
                shutil.rmtree(d)
        barrier()
        policy.engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step},
                                      save_latest=False)
        torch.save(rng_state(), d / f"rng-rank{policy.rank}.pt")
        if policy.rank == 0:
            _atomic_write(d / STATE, json.dumps({"step": step, **state}, indent=1))
        barrier()
        if policy.rank == 0:
            _atomic_write(self.root / LATEST, json.dumps({"tag": tag, "step": step}))
            self._prune(keep_tag=tag)
        barrier()
        return d

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.root.glob("step-*") if p.is_dir())
        done = [t for t in tags if t <= keep_tag]
        for t in done[: -self.keep]:
            shutil.rmtree(self.root / t, ignore_errors=True)
        for t in tags:  # leftovers of attempts beyond the latest (a killed save)
            if t > keep_tag:
                shutil.rmtree(self.root / t, ignore_errors=True)

    def load(self, policy: Policy) -> dict[str, Any] | None:
        """Restore the engine (model, optimizer, scheduler) and this rank's RNG from the
        latest checkpoint; returns the trainer state, or None when there is none."""
        info = self.latest()
        if info is None:
            return None
        tag = info["tag"]
        path, _ = policy.engine.load_checkpoint(str(self.root), tag=tag,
                                                load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        d = self.root / tag
        rng = d / f"rng-rank{policy.rank}.pt"
        if rng.is_file():
            # Our own file (python/numpy RNG states are not plain tensors).
            set_rng_state(torch.load(rng, weights_only=False))
        state = json.loads((d / STATE).read_text())
        log.info("resumed from %s (step %d)", d, state["step"])
        return state

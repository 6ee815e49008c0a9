"""Resumable checkpoints, written atomically.

    <root>/step-00000012/     DeepSpeed's files (model, optimizer incl. ZeRO partitions,
                              lr scheduler) + trainer_state.json + rng-rank<r>.json
    <root>/latest.json        {"tag": "step-00000012", "step": 12}

Loading never unpickles arbitrary objects: whoever can write the checkpoint directory must not
get code execution in the trainer. DeepSpeed's files are read with `torch.load(weights_only=True)`
and an allow-list of the few DeepSpeed classes its state holds (`_safe_globals`); our own state
is JSON (the RNG states too: python's and numpy's are plain integers, torch's a byte string).

A checkpoint exists only once `latest.json` names it: that file is replaced with
os.replace after every rank has finished writing (barrier), so a trainer killed mid-write
leaves the previous checkpoint in force and a half-written directory that the next save
removes. `trainer_state.json` holds the step, the policy version and the driver's state
(data cursor, admitted tasks, in-flight tasks, replacements, counters, run nonce).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
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


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-able values."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _safe_globals() -> list[Any]:
    """The classes DeepSpeed pickles into its checkpoint files besides tensors and builtins
    (found by loading ZeRO-0/2/3 checkpoints with weights_only=True). Anything else in a
    checkpoint is refused, not executed."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    """torch.load without arbitrary unpickling: tensors, containers, numbers and the
    allow-listed DeepSpeed classes only."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise RuntimeError(
            f"{path} holds an object outside the checkpoint allow-list, so it was not loaded "
            f"(loading it would run code from the file): {str(e).splitlines()[0][:300]}") from None


class _WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine with `load` replaced by `safe_torch_load` (its own
    TorchCheckpointEngine loads with weights_only=False). Every DeepSpeed checkpoint read --
    model states, ZeRO optimizer partitions -- goes through `checkpoint_engine.load`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location)


def weights_only_loads(engine: Any) -> None:
    """Make every checkpoint load of a DeepSpeed engine weights-only (idempotent)."""
    if not isinstance(engine.checkpoint_engine, _WeightsOnlyLoads):
        engine.checkpoint_engine = _WeightsOnlyLoads(engine.checkpoint_engine)


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
        _atomic_write(d / f"rng-rank{policy.rank}.json", json.dumps(rng_state()))
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
        weights_only_loads(policy.engine)
        path, _ = policy.engine.load_checkpoint(str(self.root), tag=tag,
                                                load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        d = self.root / tag
        rng = d / f"rng-rank{policy.rank}.json"
        if rng.is_file():
            set_rng_state(json.loads(rng.read_text()))
        elif (d / f"rng-rank{policy.rank}.pt").is_file():
            # Written before RNG states were JSON; reading it would need full unpickling.
            log.warning("%s: RNG state in the old pickled format is not loaded; sampling "
                        "continues from fresh RNG states", d)
        state = json.loads((d / STATE).read_text())
        log.info("resumed from %s (step %d)", d, state["step"])
        return state

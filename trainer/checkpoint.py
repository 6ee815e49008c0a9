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

Trust (issue 26): just before `latest.json`, rank 0 writes `checkpoint-manifest.json` (size and sha256 of
every file of the step directory; atomic). A resume verifies it and loads the newest
checkpoint that verifies and whose weights and optimizer state are finite, saying which newer
ones it skipped and why (a save cut by a crash or a full disk, bytes damaged since); the
weights are checked for NaN/Inf before a step is committed too. `load(step=N)` resumes from
an older checkpoint on purpose (`--resume-from N`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.disk import DiskFull, is_disk_full, kept_checkpoint
from trainer.dist import all_reduce_sum, barrier, broadcast_object
from trainer.dist import world as _world
from trainer.model import Policy

log = logging.getLogger("rlrt.trainer.checkpoint")

LATEST = "latest.json"
STATE = "trainer_state.json"
MANIFEST = "checkpoint-manifest.json"


def dist_rank() -> int:
    return _world()[0]


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


def _pickle_enums_by_value() -> None:
    """Some Python 3.11 releases (Debian bookworm's 3.11.2) pickle an Enum member as
    `getattr(cls, name)`, and a weights-only load refuses `getattr`: a checkpoint they wrote
    could never be resumed. Pickle DeepSpeed's enum as `cls(value)` on every Python (copyreg
    takes precedence over the class's own reduction)."""
    import copyreg

    from deepspeed.runtime.zero.config import ZeroStageEnum

    copyreg.pickle(ZeroStageEnum, lambda e: (ZeroStageEnum, (e.value,)))


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


class CheckpointError(RuntimeError):
    """No checkpoint can be trusted for this resume (the message says what was tried)."""


class NonFiniteWeights(RuntimeError):
    """The weights or optimizer state hold NaN/Inf: never committed, never resumed from."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    """sha256 of each file, several at once: hashlib releases the GIL on large blocks, and a
    checkpoint of a real model (weights + AdamW moments, one file per rank) is many GB."""
    if len(paths) < 2:
        return [_sha256(p) for p in paths]
    with ThreadPoolExecutor(min(8, len(paths))) as pool:
        return list(pool.map(_sha256, paths))


def _state_tensors(policy: Policy) -> list[tuple[str, torch.Tensor]]:
    """Every floating tensor a step changes and a checkpoint holds, as this rank has it:
    the model's parameters (ZeRO-3: this rank's partition, `ds_tensor`), the optimizer's
    parameters (ZeRO's fp32 master copies) and its state (AdamW moments)."""
    out: list[tuple[str, torch.Tensor]] = []
    for name, p in policy.engine.module.named_parameters():
        out.append((name, getattr(p, "ds_tensor", p).data))
    opt = getattr(policy.engine, "optimizer", None)
    inner = getattr(opt, "optimizer", opt)
    for i, group in enumerate(getattr(inner, "param_groups", [])):
        out += [(f"optimizer group {i} param {j}", p.data) for j, p in enumerate(group["params"])]
    for j, st in enumerate(getattr(inner, "state", {}).values()):
        out += [(f"optimizer state {j}.{k}", v) for k, v in st.items()
                if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return [(n, t) for n, t in out if t.is_floating_point() and t.numel()]


def nonfinite(policy: Policy) -> tuple[int, str | None]:
    """Collective: NaN/Inf values in the weights and optimizer state over every rank, and the
    first tensor holding one on this rank (for the message)."""
    count, first = 0, None
    for name, t in _state_tensors(policy):
        bad = int((~torch.isfinite(t)).sum())
        if bad and first is None:
            first = name
        count += bad
    total = all_reduce_sum(torch.tensor([count], dtype=torch.int64))
    return int(total.item()), first


class Checkpointer:
    def __init__(self, root: str | Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    def latest(self) -> dict[str, Any] | None:
        """What `latest.json` names (None without one); not verified, see `choose`."""
        p = self.root / LATEST
        if not p.is_file():
            return None
        info = json.loads(p.read_text())
        if not (self.root / info["tag"]).is_dir():
            raise FileNotFoundError(f"{p} names {info['tag']}, which is missing")
        return info

    def steps(self) -> list[int]:
        """Steps of the checkpoint directories present, newest first (verified or not)."""
        out = []
        for d in self.root.glob("step-*"):
            with contextlib.suppress(ValueError):
                if d.is_dir():
                    out.append(int(d.name.split("-", 1)[1]))
        return sorted(out, reverse=True)

    # ------------------------------------------------------------------ verification
    def _manifest(self, d: Path) -> dict[str, Any]:
        """The hashes of every file of `d` (rank 0, once every rank has written)."""
        paths = [f for f in sorted(d.rglob("*"))
                 if f.is_file() and f.name != MANIFEST and not f.name.startswith(".")]
        return {"files": {str(f.relative_to(d)): {"size": f.stat().st_size, "sha256": h}
                          for f, h in zip(paths, _hash_all(paths), strict=True)}}

    def verify(self, step: int) -> str | None:
        """Why checkpoint `step` cannot be trusted, or None when every file is there with the
        size and hash its manifest recorded. A checkpoint without a manifest is trusted only
        when `latest.json` names it (written before manifests existed)."""
        d = self.root / _tag(step)
        m = d / MANIFEST
        if not d.is_dir():
            return "missing"
        if not m.is_file():
            try:
                named = (self.latest() or {}).get("step") == step
            except (OSError, ValueError, KeyError):
                named = False
            if named and (d / STATE).is_file():
                log.warning("%s has no manifest (written by an older version): not verified", d)
                return None
            return "no manifest (its save did not complete)"
        try:
            files = json.loads(m.read_text())["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"unreadable manifest ({e})"
        for rel, want in files.items():
            f = d / rel
            if not f.is_file():
                return f"{rel} is missing"
            if f.stat().st_size != want["size"]:
                return f"{rel} is {f.stat().st_size} bytes, the manifest says {want['size']} (cut)"
        got = _hash_all([d / rel for rel in files])
        for (rel, want), h in zip(files.items(), got, strict=True):
            if h != want["sha256"]:
                return f"{rel} does not match its hash (corrupted)"
        return None

    def choose(self, step: int | None = None, below: int | None = None) -> int | None:
        """The step to resume from (rank 0): `step` itself when given (it must verify),
        else the newest checkpoint up to `latest.json`'s (and under `below`: those refused
        after loading) that verifies, saying which ones were skipped and why. None when there
        is no checkpoint at all."""
        if step is not None:
            why = self.verify(step)
            if why is not None:
                good = [s for s in self.steps() if self.verify(s) is None]
                raise CheckpointError(f"--resume-from {step}: checkpoint {self.root / _tag(step)} "
                                      f"cannot be used ({why}); checkpoints that verify: "
                                      f"{good or 'none'}")
            return step
        try:
            latest = self.latest()
        except (OSError, ValueError, KeyError) as e:
            log.warning("%s is unreadable (%s): looking for the newest checkpoint that verifies",
                        self.root / LATEST, e)
            latest = None
        top = latest["step"] if latest else None
        candidates = [s for s in self.steps() if top is None or s <= top]
        if not candidates and below is None:
            return None
        candidates = [s for s in candidates if below is None or s < below]
        skipped = []
        for s in candidates:
            why = self.verify(s)
            if why is None:
                if skipped:
                    log.warning("resuming from checkpoint step %d, the newest that verifies "
                                "(skipped: %s)", s, "; ".join(skipped))
                return s
            skipped.append(f"step {s}: {why}")
        raise CheckpointError(f"no checkpoint in {self.root} verifies "
                              f"({'; '.join(skipped) or 'the newer ones hold NaN/Inf'}); start "
                              "a fresh run (without --resume) or restore a copy")

    # ------------------------------------------------------------------ save
    def save(self, policy: Policy, step: int, state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. `step` = optimizer steps done; `state` is the
        trainer state of rank 0 (ignored on the others). Refuses weights holding NaN/Inf
        (NonFiniteWeights) and names a full disk (DiskFull); either way the previous
        checkpoint stays in force."""
        bad, first = nonfinite(policy)
        if bad:
            raise NonFiniteWeights(
                f"step {step} produced {bad} NaN/Inf values in the weights or optimizer state "
                f"(first: {first}); not checkpointed -- the last good one is "
                f"{kept_checkpoint(self.root)}. Lower the learning rate or check the data, then "
                "resume from it")
        tag = _tag(step)
        d = self.root / tag
        _pickle_enums_by_value()
        try:
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
                # The manifest is written last, atomically: a checkpoint without one never
                # completed, one whose files no longer match it was damaged since.
                _atomic_write(d / MANIFEST, json.dumps(self._manifest(d), indent=1))
                _atomic_write(self.root / LATEST, json.dumps({"tag": tag, "step": step}))
                self._prune(keep_tag=tag)
        except Exception as e:
            if is_disk_full(e):
                raise DiskFull(d, kept_checkpoint(self.root), "saving checkpoint") from e
            raise
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

    # ------------------------------------------------------------------ load
    def load(self, policy: Policy, step: int | None = None) -> dict[str, Any] | None:
        """Collective. Restore the engine (model, optimizer, scheduler) and this rank's RNG
        from checkpoint `step`, or (None) from the newest one that verifies, falling back past
        any whose files fail their manifest or whose weights hold NaN/Inf; returns the trainer
        state, or None when there is no checkpoint. With `step`, `latest.json` is pointed at
        it, so a later plain resume continues this line rather than the abandoned one."""
        below = None
        while True:
            chosen = self._choose_on_rank0(step, below)
            if chosen is None:
                return None
            d = self.root / _tag(chosen)
            weights_only_loads(policy.engine)
            path, _ = policy.engine.load_checkpoint(str(self.root), tag=_tag(chosen),
                                                    load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load checkpoint {d}")
            bad, first = nonfinite(policy)
            if not bad:
                break
            why = f"{bad} NaN/Inf values in the weights or optimizer state (first: {first})"
            if step is not None:
                raise NonFiniteWeights(f"--resume-from {step}: checkpoint {d} holds {why}")
            log.warning("checkpoint %s holds %s: falling back to an older one", d, why)
            below = chosen
        rng = d / f"rng-rank{policy.rank}.json"
        if rng.is_file():
            set_rng_state(json.loads(rng.read_text()))
        elif (d / f"rng-rank{policy.rank}.pt").is_file():
            # Written before RNG states were JSON; reading it would need full unpickling.
            log.warning("%s: RNG state in the old pickled format is not loaded; sampling "
                        "continues from fresh RNG states", d)
        state = json.loads((d / STATE).read_text())
        if policy.rank == 0 and step is not None:
            _atomic_write(self.root / LATEST, json.dumps({"tag": _tag(chosen), "step": chosen}))
        log.info("resumed from %s (step %d)", d, state["step"])
        return state

    def _choose_on_rank0(self, step: int | None, below: int | None) -> int | None:
        """`choose` on rank 0 (the files are read and hashed once); the same answer, or the
        same CheckpointError, on every rank."""
        answer: tuple[int | None, str | None] = (None, None)
        if dist_rank() == 0:
            try:
                answer = (self.choose(step, below=below), None)
            except CheckpointError as e:
                answer = (None, str(e))
        chosen, error = broadcast_object(answer)
        if error is not None:
            raise CheckpointError(error)
        return chosen

"""What a run trains: the facts a resume must not change behind the user's back.

A checkpoint records the fingerprint of the config that wrote it: the resolved algorithm (preset
and every knob), the group size, the model (by content, so a moved directory is the same model
and another model of the same shape is not), the data and the task. A resume whose fingerprint
differs is refused, naming each difference, unless the user says the change is meant
(`--allow-config-change`): a step that mixes 8- and 4-sample groups, or a saved config that
claims one algorithm for a run that trained another, would otherwise pass silently.

`<output_dir>/config_history.jsonl` records what each stretch of steps ran: one line per
start (`from_step`, the fingerprint, the whole config); a resume from an older step drops the
lines of the steps it redoes, like metrics.jsonl. `trainer_config.json` stays the config of
the latest start.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from trainer.config import TrainerConfig

HISTORY = "config_history.jsonl"
_SAMPLE = 1 << 16  # bytes read from each end of a weight file


class ConfigChanged(RuntimeError):
    """The resumed config differs from the checkpoint's in what the run trains."""


def model_digest(model_path: str | Path) -> str:
    """A content digest of a model directory, cheap for any size: config.json whole, and each
    weight file's name, size and first and last 64 KiB (the safetensors header is in the first
    block, so equal shapes with other values differ in the sampled data)."""
    root = Path(model_path)
    h = hashlib.sha256()
    cfg = root / "config.json"
    h.update(cfg.read_bytes() if cfg.is_file() else b"")
    for f in sorted(p for p in root.iterdir()
                    if p.suffix in (".safetensors", ".bin", ".pt")) if root.is_dir() else []:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_SAMPLE))
            fh.seek(max(0, size - _SAMPLE))
            h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:16]


def fingerprint(cfg: TrainerConfig) -> dict[str, Any]:
    """The facts of `cfg` a resume must keep (JSON-able)."""
    return {
        "algorithm": cfg.algorithm.model_dump(mode="json"),
        "group_size": cfg.group_size,
        "model": {"digest": model_digest(cfg.model_path), "path": cfg.model_path},
        "data": cfg.data.model_dump(mode="json", exclude={"task"}),
        "task": cfg.data.task,
    }


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Each fact that differs, as 'key: saved -> now'. The model compares by digest only
    (its path is for the message)."""
    a, b = _flat(saved), _flat(now)
    a.pop("model.path", None)
    b.pop("model.path", None)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            if key == "model.digest":
                out.append(f"model: {saved['model'].get('path')} (digest {a.get(key)}) -> "
                           f"{now['model'].get('path')} (digest {b.get(key)})")
            else:
                out.append(f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    return out


def check_resume(cfg: TrainerConfig, state: dict[str, Any] | None, *,
                 allow_change: bool = False) -> list[str]:
    """Refuse (ConfigChanged) a resume whose fingerprint differs from the checkpoint's, unless
    `allow_change`; returns the differences (accepted ones included). A checkpoint written
    before fingerprints existed is not checked."""
    if not state or "fingerprint" not in state:
        return []
    diff = differences(state["fingerprint"], fingerprint(cfg))
    if diff and not allow_change:
        raise ConfigChanged(
            f"the config differs from the one checkpoint step {state['step']} was trained with: "
            f"{'; '.join(diff)}. Resuming would mix the two in one run. Restore those settings, "
            "or pass --allow-config-change to continue with the new ones on purpose (the "
            f"change is recorded in {HISTORY})")
    return diff


def record_config(cfg: TrainerConfig, start_step: int, fp: dict[str, Any],
                  changed: list[str] | None = None) -> None:
    """Write trainer_config.json (this start's config) and append this start to the history,
    dropping the lines of steps this start redoes."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "trainer_config.json").write_text(cfg.model_dump_json(indent=1))
    path = cfg.out / HISTORY
    keep = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["from_step"] < start_step:
                    keep.append(line)
            except (ValueError, KeyError):
                continue  # a line cut by a kill
    entry = {"from_step": start_step, "fingerprint": fp, "changed": changed or [],
             "config": json.loads(cfg.model_dump_json())}
    keep.append(json.dumps(entry))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)

"""Per-step metrics to `metrics.jsonl`, TensorBoard, Prometheus and (optionally) Weights &
Biases, plus a rich progress bar.

`metrics.jsonl` has one JSON object per step (`step` = 0-based index of the optimizer step,
`version` = the policy version it produced). On resume, lines of steps that will be redone
are removed first, so the file always describes one consistent history.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import uuid
from pathlib import Path
from typing import Any

from trainer.config import MetricsConfig, WandbConfig

log = logging.getLogger("rlrt.trainer.metrics")

_GAUGES: dict[str, Any] = {}  # process-wide: prometheus_client refuses a second registration


def _gauge(key: str) -> Any:
    from prometheus_client import Gauge

    name = "rlrt_trainer_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
    if name not in _GAUGES:
        _GAUGES[name] = Gauge(name, f"trainer metric {key} (last step)")
    return _GAUGES[name]


def truncate_jsonl(path: Path, before_step: int) -> None:
    """Keep only the records of steps < before_step (the steps a resumed run will not redo)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", -1) < before_step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def _scalar(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    return None


def wandb_target(cfg: WandbConfig) -> tuple[str | None, str | None, str]:
    """(project, entity, mode) of a W&B run: the config's values, else W&B's own environment
    variables (WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE), as a W&B user expects; mode online
    when neither says. No project anywhere = no W&B logging."""
    return (cfg.project or os.environ.get("WANDB_PROJECT") or None,
            cfg.entity or os.environ.get("WANDB_ENTITY") or None,
            cfg.mode or os.environ.get("WANDB_MODE") or "online")


def start_wandb(out: Path, cfg: WandbConfig, *, config: dict[str, Any] | None = None) -> Any:
    """A W&B run for this output directory: the same run again on resume, or from another
    process of the run (its id is kept in <out>/wandb-run-id), the trainer's saved config
    (secrets already redacted) as its config unless `config` is given, files under
    <out>/wandb. W&B's steps only increase: after an online resume it ignores the steps the
    resumed run redoes (metrics.jsonl has the redone values)."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError("W&B logging is on (trainer.metrics.wandb.project or WANDB_PROJECT) "
                           "but wandb is not installed: pip install 'rlrt[wandb]'") from None
    project, entity, mode = wandb_target(cfg)
    id_file = out / "wandb-run-id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    if config is None:
        saved = out / "trainer_config.json"
        config = json.loads(saved.read_text()) if saved.is_file() else {}
    try:
        return wandb.init(
            project=project, entity=entity, name=cfg.name or config.get("run_id"),
            group=cfg.group, tags=cfg.tags or None, mode=mode, dir=str(out), id=run_id,
            resume="allow", config=config,
            # W&B's console capture would wrap the progress bar's stderr: the log files hold it.
            settings=wandb.Settings(console="off"),
        )
    except wandb.errors.UsageError as e:  # e.g. online without an API key
        raise RuntimeError(f"W&B ({mode}): {e}. Log in (`wandb login`, WANDB_API_KEY) or set "
                           "WANDB_MODE=offline (no key needed; `wandb sync` later)") from None


class MetricsSink:
    """Rank 0 only. `log(record)` once per step; `close()` at the end."""

    def __init__(self, out_dir: str | Path, cfg: MetricsConfig, *, total_steps: int,
                 start_step: int) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.jsonl = self.out / "metrics.jsonl"
        self.trained = self.out / "trained.jsonl"
        for p in (self.jsonl, self.trained):
            truncate_jsonl(p, start_step)
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tb"), purge_step=start_step)
        self.wandb = start_wandb(self.out, cfg.wandb) if wandb_target(cfg.wandb)[0] else None
        self.prometheus_port: int | None = None
        if cfg.prometheus_port is not None:
            from prometheus_client import start_http_server

            server, _ = start_http_server(cfg.prometheus_port, addr=cfg.prometheus_host)
            self.prometheus_port = int(server.server_port)
            self._server = server
        self.progress = None
        if cfg.progress:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                TextColumn("{task.description}"), console=Console(stderr=True), transient=False,
            )
            self.progress.start()
            self._task = self.progress.add_task("", total=total_steps, completed=start_step)

    def log(self, record: dict[str, Any], *, staleness: list[int] | None = None,
            trained: dict[str, Any] | None = None) -> None:
        step = int(record["step"])
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if trained is not None:
            with open(self.trained, "a") as f:
                f.write(json.dumps({"step": step, **trained}) + "\n")
        scalars: dict[str, float] = {}
        for k, v in record.items():
            x = _scalar(v)
            if x is None:
                continue
            scalars[k] = x
            if self.tb is not None:
                self.tb.add_scalar(k, x, step)
            if self.prometheus_port is not None:
                _gauge(k).set(x)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.tb is not None and staleness:
            import numpy as np

            self.tb.add_histogram("staleness", np.asarray(staleness), step)
        if self.progress is not None:
            desc = (f"reward {record.get('reward_mean', float('nan')):.3f} "
                    f"loss {record.get('loss', float('nan')):.4f} "
                    f"{record.get('tokens_per_s', 0):.0f} tok/s")
            self.progress.update(self._task, completed=step + 1, description=desc)
        if (step + 1) % self.cfg.log_every == 0:
            log.info("step %d: reward %.3f acc %.3f loss %.4f len %.1f stale %.2f %.1fs",
                     step, record.get("reward_mean", float("nan")),
                     record.get("accuracy", float("nan")), record.get("loss", float("nan")),
                     record.get("response_len_mean", float("nan")),
                     record.get("staleness", float("nan")), record.get("time_step_s", 0.0))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()
        if self.prometheus_port is not None:
            self._server.shutdown()

"""Settings of a local run as a whole (section `run`): where it writes, how `rlrt train`
supervises its processes, and the evaluation sets (top-level `eval:`) around and during
training."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import SettingsConfigDict

from protocol.config import (
    DEFAULT_RUN_DIR,
    ConfigError,
    RLRTSettings,
    Secret,
    format_validation_error,
)
from rlrt.redis_server import AOF_REWRITE_MIN_MB
from tasks.data import DataConfig


class RunSettings(RLRTSettings):
    section: ClassVar[str] = "run"
    model_config = SettingsConfigDict(env_prefix="RLRT_RUN__")

    name: str = Field("rlrt", description="run name (shown in logs and the report)")
    dir: str = Field(DEFAULT_RUN_DIR, description="the run's one folder: logs, Redis data, "
                     "evaluations, report, the resolved config every process reads "
                     "(config.resolved.yaml) and, unless trainer.output_dir says otherwise, the "
                     "trainer's metrics, checkpoints and pushed weights (<dir>/trainer)")
    seed: int = Field(0, description="seed of the bootstrap model and the held-out evaluation")
    control_token: Secret | None = Field(
        None, description="bearer token for the services' control endpoints; None: a fresh "
        "random token per run, given to every process of the run",
    )
    bootstrap: bool = Field(
        True, description="when the model is the built-in tiny model's path (runs/models/countdown-tiny) and "
        "does not exist, build and SFT-train it there first (`rlrt bootstrap`); any other "
        "missing model is an error, never replaced",
    )
    bootstrap_steps: int = Field(900, ge=1, description="SFT steps of that bootstrap")
    start_timeout_s: float = Field(300.0, gt=0, description="how long a service may take to become ready")
    max_restarts: int = Field(
        2, ge=0, description="a service process that dies is restarted (and given the current "
        "weights) at most this many times; then the run stops with a resumable checkpoint",
    )
    redis_aof_rewrite_mb: int = Field(
        AOF_REWRITE_MIN_MB, ge=0, description="the embedded Redis (bus.redis_url unset) rewrites "
        "its append-only file down to the live data once the file is past this many MB and has "
        "doubled since the last rewrite (the bus deletes acked entries, so the live data stays "
        "small); 0 = Redis's own threshold, 64 MB. Ignored with bus.redis_url",
    )
    stall_warn_s: float = Field(
        300.0, gt=0, description="no trainer step for this long (counted from this run's first "
        "completed step): print, per service, the entries read but not yet acked and its "
        "readiness, again every period (names the wedged service; the trainer itself fails "
        "after trainer.wait_timeout_s)",
    )
    stall_stop_s: float | None = Field(
        None, gt=0, description="no trainer step for this long: stop the run (checkpoint, "
        "resumable) with that diagnosis. None = only warn (a big model's step may be slow)",
    )
    trace: bool = Field(
        True, description="every process records what it is busy with (spans: sampling, "
        "verification, teacher scoring, the trainer's wait / update / push / checkpoint) under "
        "<dir>/trace; the report draws the last steps as timeline.png with each process's busy "
        "share (rlrt/timeline.py). One short line per message handled",
    )
    # The implicit evaluation set of a generator task (Countdown's held-out split), used when
    # the config has no top-level `eval:` list. File and hub data have no implicit one.
    eval_prompts: int = Field(200, ge=0, description="held-out prompts of the implicit set, evaluated before and after training (0 = skip)")
    eval_k: int = Field(4, ge=1, description="implicit set: samples per prompt (avg@k, pass@k)")
    eval_temperature: float = Field(1.0, ge=0, description="implicit set: sampling temperature")
    eval_top_p: float = Field(1.0, gt=0, le=1, description="implicit set: top-p")
    eval_max_new_tokens: int = Field(64, ge=1, description="implicit set: response cap")


class EvalSet(BaseModel):
    """One entry of the top-level `eval:` list: a data set scored with avg@k / pass@k before
    training, every `every` steps, and after training.

        eval:
          - {name: test, data: {path: data/test.jsonl}, k: 8, every: 20}
          - {name: countdown, task: countdown}       # a generator task's held-out split
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="metric prefix (eval/<name>/avg@k) and report label")
    data: dict[str, Any] | None = Field(
        None, description="a data section (tasks/data.py). With path, hf_dataset or "
        "task it is a set of its own (the field names, system_prompt and the chat template "
        "default to the run's: DataConfig.inherited); otherwise it overrides fields of the "
        "run's data (e.g. {split: test}). None = the run's data (split 'heldout' for a "
        "generator task)",
    )
    task: str | None = Field(None, description="shorthand for data.task")
    n: int | None = Field(None, ge=1, description="evaluate the first n rows; None = all (generator tasks: 200)")
    k: int = Field(4, ge=1, description="samples per prompt: avg@k and pass@1..k")
    every: int = Field(0, ge=0, description="also evaluate every `every` trainer steps (0 = only before and after)")
    temperature: float | None = Field(None, ge=0, description="None = trainer.sampling.temperature")
    top_p: float | None = Field(None, gt=0, le=1, description="None = trainer.sampling.top_p")
    max_new_tokens: int | None = Field(None, ge=1, description="None = trainer.sampling.max_new_tokens")

    def data_config(self, run_data: DataConfig) -> DataConfig:
        """This set's data section, from the run's (see `data`)."""
        over = dict(self.data or {})
        if self.task is not None:
            over["task"] = self.task
        if {"path", "hf_dataset", "task"} & set(over):
            cfg = DataConfig.model_validate({**run_data.inherited(), **over})
        else:
            base = run_data.model_dump(exclude_unset=True)
            if not over and run_data.kind == "generator":
                over["split"] = "heldout"
            cfg = DataConfig.model_validate({**base, **over})
        if cfg.kind == "generator" and cfg.split == "train" and "split" not in over:
            cfg = cfg.model_copy(update={"split": "heldout"})
        return cfg


def eval_sets(raw_eval: Any, run: RunSettings, run_data: DataConfig) -> list[EvalSet]:
    """The run's evaluation sets: the `eval:` list, or else the implicit held-out set of a
    generator task (from run.eval_*), or none."""
    if raw_eval is None:
        if run_data.kind != "generator" or run.eval_prompts == 0:
            return []
        return [EvalSet(name="heldout", n=run.eval_prompts, k=run.eval_k,
                        temperature=run.eval_temperature, top_p=run.eval_top_p,
                        max_new_tokens=run.eval_max_new_tokens)]
    if not isinstance(raw_eval, list):
        raise ConfigError("eval: must be a list of sets, e.g. [{name: test, data: {path: t.jsonl}}]")
    sets = []
    for i, item in enumerate(raw_eval):
        try:
            sets.append(EvalSet.model_validate(item))
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, f"eval.{i}", EvalSet)) from None
        try:
            sets[-1].data_config(run_data)  # a bad data mapping fails here, before anything starts
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, f"eval.{i}.data", DataConfig)) from None
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval: set names must be unique, got {names}")
    return sets

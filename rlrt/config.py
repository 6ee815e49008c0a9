"""RunConfig: a run's whole config, resolved once, typed section by section.

    model: Qwen/Qwen2.5-0.5B-Instruct   # what the trainer loads and the engines serve
    data: {path: my.jsonl}              # tasks/data.py: training (and eval) rows
    eval: [{name: test, data: {path: test.jsonl}, every: 10}]   # rlrt/run_config.py: EvalSet
    run: {dir: runs/mine}               # the run's one folder: every output defaults under it
    trainer: {...}                      # a section per part, SECTION_MODELS

`RunConfig.load` resolves the YAML with its overrides (protocol/config.py `resolve`: the
environment form RLRT_<SECTION>__<FIELD>, then --set; shared keys; derived defaults) and
validates each section with its part's model. `rlrt train` resolves it once and writes it to
<run.dir>/config.resolved.yaml (`write`; secrets stay in the environment), and every process it
starts (`rlrt serve X`, `rlrt run-trainer`) reads that file. `--print-config` on any entry point
prints what `to_yaml` gives.

A section's model is imported when the section is first used, so `rlrt --help` stays fast and a
part missing from an image (the verifier's has no torch) does not break the others."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from protocol.config import (
    SECTIONS,
    ConfigError,
    dump_config,
    env_var,
    format_validation_error,
    resolve,
    secret_items,
)

if TYPE_CHECKING:
    from protocol.config import BusSettings
    from rlrt.run_config import EvalSet, RunSettings
    from services.rollout.config import RolloutConfig
    from services.teacher.config import TeacherConfig
    from services.verifier.config import VerifierConfig
    from tasks.data import DataConfig
    from tasks.rewards import RewardSettings
    from trainer.config import TrainerConfig

# Each section of protocol.config.SECTIONS and the model its part reads it with.
SECTION_MODELS: dict[str, str] = {
    "bus": "protocol.config:BusSettings",
    "verifier": "services.verifier.config:VerifierConfig",
    "rollout": "services.rollout.config:RolloutConfig",
    "teacher": "services.teacher.config:TeacherConfig",
    "trainer": "trainer.config:TrainerConfig",
    "run": "rlrt.run_config:RunSettings",
    "reward": "tasks.rewards:RewardSettings",
}
assert tuple(SECTION_MODELS) == SECTIONS, "protocol.config.SECTIONS and SECTION_MODELS differ"


def section_model(name: str) -> Any:
    if name not in SECTION_MODELS:
        raise KeyError(f"unknown config section {name!r}; known: {sorted(SECTION_MODELS)}")
    module, _, attr = SECTION_MODELS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


class RunConfig:
    """A resolved run config: `raw` (the plain dict `resolve` gives) and each section typed by
    its model on first use (`cfg["trainer"]` or `cfg.trainer`)."""

    def __init__(self, raw: dict[str, Any], source: Path | None = None) -> None:
        self.raw = raw
        self.source = source
        self._typed: dict[str, Any] = {}

    @classmethod
    def load(cls, path: str | os.PathLike | None, sets: Iterable[str] = (), *,
             sections: Iterable[str] = SECTIONS,
             overrides: Mapping[str, Mapping[str, Any]] | None = None,
             environ: Mapping[str, str] | None = None) -> RunConfig:
        """Resolve the config at `path` with the environment's (`environ`, None = this
        process's) and `sets` overrides, then `overrides` ({section: {field: value}}, merged
        into nested mappings; CLI flags and the launcher's wiring; None values ignored), and validate
        `sections` (default: every one, the eval sets too) now, so an error stops the caller
        before anything starts. Raises ConfigError naming the field."""
        names = tuple(sections)
        models = {name: section_model(name) for name in names}
        raw = resolve(path, sets, models=models, environ=environ)
        for name, values in (overrides or {}).items():
            clean = {k: v for k, v in values.items() if v is not None}
            raw[name] = _merge(raw.get(name) or {}, clean)
        cfg = cls(raw, Path(path) if path is not None else None)
        for name in names:
            cfg[name]
        if names == SECTIONS:
            cfg.eval_sets  # noqa: B018 - validates the eval list
        return cfg

    def __getitem__(self, name: str) -> Any:
        if name not in self._typed:
            self._typed[name] = section_model(name).from_resolved(self.raw, name)
        return self._typed[name]

    # Typed access to each section (the same objects as cfg["name"]).
    @property
    def bus(self) -> BusSettings:
        return self["bus"]

    @property
    def verifier(self) -> VerifierConfig:
        return self["verifier"]

    @property
    def rollout(self) -> RolloutConfig:
        return self["rollout"]

    @property
    def teacher(self) -> TeacherConfig:
        return self["teacher"]

    @property
    def trainer(self) -> TrainerConfig:
        return self["trainer"]

    @property
    def run(self) -> RunSettings:
        return self["run"]

    @property
    def reward(self) -> RewardSettings:
        return self["reward"]

    @property
    def model(self) -> str | None:
        """The top-level `model` (each section's own model path is in that section)."""
        value = self.raw.get("model")
        return None if value is None else str(value)

    @property
    def train_data(self) -> DataConfig:
        """The trainer's data section (top-level `data` unless trainer.data is set), read
        without the trainer's model (the verifier, which asks, has no torch)."""
        from tasks.data import DataConfig

        try:
            return DataConfig.model_validate((self.raw.get("trainer") or {}).get("data") or {})
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, "trainer.data", DataConfig)) from None

    @property
    def eval_sets(self) -> list[EvalSet]:
        """The evaluation sets: the top-level `eval:` list, or the implicit held-out set."""
        if "eval_sets" not in self._typed:
            from rlrt.run_config import eval_sets

            self._typed["eval_sets"] = eval_sets(self.raw.get("eval"), self.run, self.train_data)
        return self._typed["eval_sets"]

    def tasks(self) -> list[str]:
        """The tasks the run names: its training data's and its eval sets' (the verifier
        grades these "module:Class" tasks and no other)."""
        data = self.train_data
        return [data.task, *(s.data_config(data).task for s in self.eval_sets)]

    # ------------------------------------------------------------------ output
    def to_dict(self, sections: Iterable[str] | None = None, *, public: bool = False) -> dict[str, Any]:
        """The resolved config as data: the shared keys (whole config only), then each of
        `sections` (default: all) as its part reads it. Secrets masked, or left out (public)."""
        names = tuple(SECTIONS if sections is None else sections)
        out: dict[str, Any] = {}
        if names == SECTIONS:
            out.update({k: self.raw[k] for k in ("model", "data") if self.raw.get(k) is not None})
            if self.raw.get("eval") is not None:
                out["eval"] = [s.model_dump(exclude_none=True) for s in self.eval_sets]
        for name in names:
            out[name] = dump_config(self[name], secrets="drop" if public else "mask")
        return out

    def secret_env(self) -> dict[str, str]:
        """Every secret of the config as its environment variable (RLRT_<SECTION>__<FIELD>):
        how the processes reading the resolved file (which holds none) receive them."""
        return {env_var([name, *path]): text for name in SECTIONS if name in self._typed
                for path, text in secret_items(self[name])}

    def to_yaml(self, sections: Iterable[str] | None = None) -> str:
        """What `--print-config` prints (secrets masked)."""
        return yaml.safe_dump(self.to_dict(sections), sort_keys=False)

    def write(self, path: str | os.PathLike) -> Path:
        """Write the whole resolved config to `path` (atomically) for the processes of the run
        to read; no secret reaches the file (tokens and passwords go by the environment)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        head = ("# The resolved config of this run, written by `rlrt train`: every process of the\n"
                f"# run reads it. Source: {self.source}. Secrets are not in it (environment).\n")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(head + yaml.safe_dump(self.to_dict(public=True), sort_keys=False))
        os.replace(tmp, path)
        return path


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def load_section(name: str, path: str | os.PathLike | None, sets: Iterable[str] = (),
                 **overrides: Any) -> Any:
    """Only section `name` of the config at `path`, resolved (see RunConfig.load)."""
    return RunConfig.load(path, sets, sections=(name,), overrides={name: overrides})[name]


def load_all(path: str | os.PathLike | None, sets: Iterable[str] = ()) -> RunConfig:
    """Every section, resolved and validated (the eval sets too)."""
    return RunConfig.load(path, sets)

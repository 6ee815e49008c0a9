"""The sections of a run's YAML config, the model that reads each one, and the keys shared by
all of them.

A run config has a section per part (`bus`, `verifier`, `rollout`, `teacher`, `trainer`, `run`,
`reward`) and three top-level keys that several parts read:

    model: Qwen/Qwen2.5-0.5B-Instruct   # what the trainer loads and the engines serve
    data: {path: my.jsonl}              # tasks/data.py: training (and eval) rows
    eval: [{name: test, data: {path: test.jsonl}, every: 10}]   # rlrt/run_config.py: EvalSet

`model` fills trainer.model_path and rollout/teacher engine.model_path, `data` fills
trainer.data, wherever the section does not set its own (a section's value wins). `model` is a
local HF directory or a hub id (`rlrt train` resolves it once, tasks/hub.py).

Precedence, lowest first: the YAML file, environment variables (`RLRT_<SECTION>__<FIELD>`),
then `--set key.path=value` overrides (the only way to override a shared key). `--set` reaches every process
of a run through the environment variable RLRT_SET (a JSON list of "key=value" strings).

Imported lazily so `rlrt --help` stays fast and a missing optional part does not break the
others."""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
from typing import Any

import yaml
from pydantic import ValidationError

from protocol.config import ConfigError, format_validation_error, read_yaml

SECTIONS: dict[str, str] = {
    "bus": "protocol.config:BusSettings",
    "verifier": "services.verifier.config:VerifierConfig",
    "rollout": "services.rollout.config:RolloutConfig",
    "teacher": "services.teacher.config:TeacherConfig",
    "trainer": "trainer.config:TrainerConfig",
    "run": "rlrt.run_config:RunSettings",
    "reward": "tasks.rewards:RewardSettings",
}
# Top-level keys that are not sections (see the module doc).
SHARED = ("model", "data", "eval")
SET_ENV = "RLRT_SET"


def section_model(name: str) -> Any:
    if name not in SECTIONS:
        raise KeyError(f"unknown config section {name!r}; known: {sorted(SECTIONS)}")
    module, _, attr = SECTIONS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


# --------------------------------------------------------------------------- --set overrides


def parse_set(items: list[str]) -> list[tuple[list[str], Any]]:
    """`["trainer.lr=1e-5", "model=org/name"]` -> [(["trainer", "lr"], 1e-05), ...]. Values are
    YAML (numbers, booleans, lists, `{...}` mappings); a bare word stays a string."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        path = [p for p in key.strip().split(".") if p]
        if not sep or not path:
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. trainer.lr=1e-5")
        top = path[0]
        if top not in SECTIONS and top not in SHARED:
            raise ConfigError(f"--set {item!r}: unknown key {top!r}; known: "
                              f"{', '.join([*SHARED, *SECTIONS])}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {e}") from None
        if isinstance(value, str) and _is_float(value):  # YAML 1.1 reads 1e-5 as a string
            value = float(value)
        out.append((path, value))
    return out


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def active_sets() -> list[str]:
    """The --set overrides of this process (inherited from the launching `rlrt` command)."""
    raw = os.environ.get(SET_ENV)
    if not raw:
        return []
    try:
        items = json.loads(raw)
    except ValueError:
        raise ConfigError(f"{SET_ENV} is not a JSON list of 'key=value' strings") from None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{SET_ENV} is not a JSON list of 'key=value' strings")
    return items


def export_sets(items: list[str]) -> None:
    """Make `items` (after any already active) the overrides of this process and its children.
    Checked here, so a bad --set fails before anything starts."""
    parse_set(items)
    os.environ[SET_ENV] = json.dumps([*active_sets(), *items])


def _put(tree: dict, path: list[str], value: Any) -> None:
    for p in path[:-1]:
        nxt = tree.get(p)
        if not isinstance(nxt, dict):
            nxt = tree[p] = {}
        tree = nxt
    tree[path[-1]] = value


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# --------------------------------------------------------------------------- the shared keys


def read_config(path: str | None, sets: list[str] | None = None) -> dict[str, Any]:
    """The YAML file with the shared keys' --set overrides applied (section fields'
    overrides are applied by `load_section`, after the section's own env variables). `sets`
    None = this process's (`active_sets`)."""
    raw = copy.deepcopy(read_yaml(path))
    for p, value in parse_set(active_sets() if sets is None else sets):
        if p[0] in SHARED:
            _put(raw, p, value)
    return raw


def _section_values(name: str, raw: dict[str, Any]) -> dict[str, Any]:
    values = raw.get(name) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"section '{name}' must be a mapping")
    values = copy.deepcopy(values)
    model, data = raw.get("model"), raw.get("data")
    if name == "trainer":
        if model and "model_path" not in values:
            values["model_path"] = str(model)
        if data is not None and "data" not in values:
            values["data"] = data
    if name in ("rollout", "teacher") and model:
        engine = values.setdefault("engine", {})
        if isinstance(engine, dict) and not engine.get("model_path"):
            engine["model_path"] = str(model)
    return values


@functools.cache
def _without_env(cls: Any) -> Any:
    """`cls` reading only its init arguments (pydantic-settings re-reads the environment on
    every validation, model_validate included)."""

    class Resolved(cls):  # type: ignore[misc, valid-type]
        @classmethod
        def settings_customise_sources(cls_, settings_cls: Any, init_settings: Any,
                                       **other: Any) -> tuple[Any, ...]:
            return (init_settings,)

    Resolved.__name__, Resolved.__qualname__ = cls.__name__, cls.__qualname__
    return Resolved


def load_section(name: str, path: str | None, sets: list[str] | None = None,
                 **overrides: Any) -> Any:
    """Section `name`: YAML (with the shared keys filled in), then env, then --set (`sets`;
    None = this process's), then `overrides` (CLI flags; None values are ignored). Raises
    ConfigError naming the field."""
    cls = section_model(name)
    sets = active_sets() if sets is None else sets
    values = _section_values(name, read_config(path, sets))
    tree: dict[str, Any] = {}
    for p, value in parse_set(sets):
        if p[0] == name:
            if len(p) == 1:
                raise ConfigError(f"--set {name}=...: set a field, e.g. {name}.FIELD=VALUE")
            _put(tree, p[1:], value)
    tree.update({k: v for k, v in overrides.items() if v is not None})
    try:
        obj = cls(**values)
        if tree:  # validated again without the env source, or env would win over --set
            obj = _without_env(cls)(**_deep_merge(obj.model_dump(), tree))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, name, cls)) from None
    return obj


def run_tasks(path: str | None, sets: list[str] | None = None) -> list[str]:
    """The tasks a run's config names: its training data's and its eval sets'. Read without
    loading the trainer section (the verifier, which asks, has no torch)."""
    from rlrt.run_config import eval_sets
    from tasks.data import DataConfig

    sets = active_sets() if sets is None else sets
    raw = read_config(path, sets)
    values = _section_values("trainer", raw).get("data") or {}
    for p, value in parse_set(sets):
        if p[:2] == ["trainer", "data"] and len(p) > 2:
            _put(values, p[2:], value)
    try:
        data = DataConfig.model_validate(values)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "trainer.data")) from None
    run = load_section("run", path, sets)
    return [data.task, *(s.data_config(data).task for s in eval_sets(raw.get("eval"), run, data))]


def load_all(path: str | None, sets: list[str] | None = None) -> dict[str, Any]:
    """Every section, resolved (YAML + env + --set). Raises ConfigError on the first bad one."""
    return {name: load_section(name, path, sets) for name in SECTIONS}

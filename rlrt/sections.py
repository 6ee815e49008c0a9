"""The sections of a run's YAML config and the model that reads each one.

Imported lazily so `rlrt --help` stays fast and a missing optional part does not break the
others."""

from __future__ import annotations

import importlib
from typing import Any

SECTIONS: dict[str, str] = {
    "bus": "protocol.config:BusSettings",
    "verifier": "services.verifier.config:VerifierConfig",
    "rollout": "services.rollout.config:RolloutConfig",
    "teacher": "services.teacher.config:TeacherConfig",
    "trainer": "trainer.config:TrainerConfig",
    "run": "rlrt.run_config:RunSettings",
    "reward": "protocol.rewards:RewardSettings",
}


def section_model(name: str) -> Any:
    if name not in SECTIONS:
        raise KeyError(f"unknown config section {name!r}; known: {sorted(SECTIONS)}")
    module, _, attr = SECTIONS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def load_section(name: str, path: str | None, **overrides: Any) -> Any:
    return section_model(name).load(path, name, **overrides)


def load_all(path: str | None) -> dict[str, Any]:
    """Every section, resolved (YAML + env). Raises ConfigError on the first bad section."""
    return {name: load_section(name, path) for name in SECTIONS}

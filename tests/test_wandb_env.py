"""W&B as its users expect (issue 27): WANDB_PROJECT / WANDB_MODE / WANDB_ENTITY are honoured
unless the config sets them, offline needs no key, and `rlrt train`'s evaluations and the whole
resolved config reach the same W&B run (rlrt/wandb_log.py). The real wandb library, offline;
its run files are read back record by record."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_wandb import complete_records

from rlrt.wandb_log import log_run
from trainer.config import MetricsConfig, WandbConfig
from trainer.metrics import MetricsSink, wandb_target


def records(out: Path) -> tuple[set[str], set[str], list[dict], dict]:
    """(run ids, projects, history rows, config) over the offline run files under out/wandb."""
    ids, projects, rows, config = set(), set(), [], {}
    for f in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        for r in complete_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.add(r.run.run_id)
                projects.add(r.run.project)
                config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "config":
                config.update({u.key: json.loads(u.value_json) for u in r.config.update})
            elif kind == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                             for i in r.history.item})
    return ids, projects, rows, config


def test_environment_fills_what_the_config_leaves_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_ENTITY", "team-env")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_target(WandbConfig()) == ("from-env", "team-env", "offline")
    assert wandb_target(WandbConfig(project="p", entity="e", mode="disabled")) == ("p", "e", "disabled")
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_target(WandbConfig())[2] == "online"


def test_offline_from_the_environment_needs_no_key_and_gets_the_evaluations(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_PROJECT", "rlrt-env")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no `wandb login`
    out = tmp_path / "out"
    out.mkdir()
    (out / "trainer_config.json").write_text(json.dumps({"run_id": "env-run", "lr": 1e-5}))
    metrics = MetricsConfig(tensorboard=False, progress=False)  # nothing about W&B in the config
    sink = MetricsSink(out, metrics, total_steps=2, start_step=0)
    assert sink.wandb is not None
    for step in range(2):
        sink.log({"step": step, "loss": 1.0 - step / 4})
    sink.close()

    evals = [{"set": "test", "label": "before training", "step": 0, "k": 4, "avg@4": 0.25,
              "pass@1": 0.25, "pass@4": 0.5},
             {"set": "test", "label": "after training", "step": 2, "k": 4, "avg@4": 0.5,
              "pass@1": 0.5, "pass@4": 0.75}]
    resolved = {"run": {"name": "env-run"}, "reward": {"fn": "r:f"}, "trainer": {"lr": 1e-5}}
    trainer_cfg = SimpleNamespace(metrics=metrics, output_dir=str(out))
    assert log_run(trainer_cfg, evals, resolved)

    ids, projects, rows, config = records(out)
    assert ids == {(out / "wandb-run-id").read_text().strip()}  # one W&B run for the whole run
    assert projects == {"rlrt-env"}
    assert config["reward"] == {"fn": "r:f"} and config["run"] == {"name": "env-run"}
    evaluated = [r for r in rows if "eval/test/avg@4" in r]
    assert [(r["eval/step"], r["eval/test/avg@4"], r["eval/test/pass@4"]) for r in evaluated] \
        == [(0, 0.25, 0.5), (2, 0.5, 0.75)]
    assert [r["loss"] for r in rows if "loss" in r] == [1.0, 0.75]

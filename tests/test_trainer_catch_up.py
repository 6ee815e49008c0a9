"""A service that comes back on its base weights mid-run (killed and restarted by its
supervisor -- Docker's restart policy, Kubernetes -- while the trainer's push retries gave
up) is caught up by the trainer: the next stale group makes it ask the services their
version and push the current weights to the one behind. Without that (push.catch_up false)
the run cannot recover: every group comes back stale, and the next push would only come
after a step, so the driver stops the run.

Real Redis, real HTTP, the real DeepSpeed engine; the stand-in pipeline samples from the
weights it was pushed (tests/support/trainer_standin.py)."""

from __future__ import annotations

import json

import pytest
import torch
from support.tiny_model import save_tiny_policy
from support.trainer_standin import StandinPipeline, standin_config

from protocol.config import BusSettings
from trainer.config import TrainerConfig
from trainer.driver import DriverError
from trainer.main import run_trainer


def config(tmp_path, model, url: str, catch_up: bool) -> TrainerConfig:
    # one attempt per push: the restarted service's 503 fails the push for good
    return standin_config(model, tmp_path / "out", url, total_steps=4, zero_variance="keep",
                          push={"retries": 1, "catch_up": catch_up})


@pytest.mark.parametrize("catch_up", [True, False], ids=["catch-up", "off"])
def test_a_service_restarted_on_base_weights_is_caught_up(tmp_path, redis_url, prefix,
                                                          catch_up):
    torch.set_num_threads(1)
    model = save_tiny_policy(tmp_path / "policy")
    standin = StandinPipeline(model, BusSettings(redis_url=redis_url, prefix=prefix), token="tok")
    standin.controls.restart_at = 2  # the push of v2 finds it restarted, on version 0
    with standin.running() as url:
        cfg = config(tmp_path, model, url, catch_up)
        if not catch_up:
            with pytest.raises(DriverError, match="do not serve the trainer's version 2"):
                run_trainer(cfg, BusSettings(redis_url=redis_url, prefix=prefix))
            assert standin.restarts == 1 and standin.version == 0
            return
        summary = run_trainer(cfg, BusSettings(redis_url=redis_url, prefix=prefix))

    assert summary["completed"] and standin.restarts == 1
    # v2 was refused (503), then sent again by the catch-up; the run's pushes went on to v4
    assert standin.controls.calls[:3] == [0, 1, 2] and standin.controls.calls.count(2) == 2
    assert standin.version == 4
    records = [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert [r["step"] for r in records if r.get("push_catch_up")] == [2]
    assert records[2]["push_catch_up"] == ["standin"]
    # nothing trained twice, and what was trained was fresh enough
    trained = [json.loads(x) for x in (cfg.out / "trained.jsonl").read_text().splitlines()]
    tasks = [g["task_index"] for t in trained for g in t["groups"]]
    assert len(tasks) == len(set(tasks)) == 4 * cfg.prompts_per_step
    assert all(r["staleness_max"] <= cfg.max_staleness for r in records)

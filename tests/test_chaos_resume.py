"""Resume integrity under faults (issue 26), on the real trainer process (`python -m
trainer.main`, as `rlrt train` runs it), real Redis (the embedded server, with its AOF) and
the stand-in services:

- the AOF cut in half after the trainer was SIGKILLed: the embedded Redis refuses it, one line
  naming the repair; after `repair_aof` the resumed trainer finds the bus behind its
  checkpoint and re-admits the tasks the checkpoint had in flight: each is trained, none
  twice (with max_staleness 1, groups that arrive too stale are dropped and replaced by
  design, so task indices are not contiguous);
- `--resume-from` an older checkpoint: no wait for groups that never come; the metrics and
  trained records describe one history, each task trained once, the same losses as the
  uninterrupted run.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from support.polling import wait_until
from support.tiny_model import save_tiny_policy
from support.trainer_standin import StandinPipeline
from test_trainer_resume import (
    STEPS,
    finish,
    idle,
    records,
    start,
    steps_logged,
    write_config,
)

from protocol.config import BusSettings
from rlrt.redis_server import AofDamaged, EmbeddedRedis, repair_aof


def _config(path: Path, model: Path, out: Path, bus: BusSettings, url: str, **trainer) -> Path:
    write_config(path, model, out, bus, url)
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"].update(trainer)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tasks(out: Path) -> list[int]:
    return sorted(g["task_index"] for t in records(out, "trained.jsonl") for g in t["groups"])


@pytest.mark.slow  # three trainer processes: a few minutes
def test_a_cut_aof_is_refused_repaired_and_every_task_trained_once(tmp_path):
    torch.set_num_threads(1)
    model = save_tiny_policy(tmp_path / "policy")
    rdir = tmp_path / "redis"
    server = EmbeddedRedis(rdir)
    bus = BusSettings(redis_url=server.start(), prefix="aof")
    out, log = tmp_path / "out", tmp_path / "t.log"
    try:
        standin = StandinPipeline(model, bus, token="tok")
        with standin.running() as url:
            # max_staleness 1: the checkpoint has a step's tasks in flight, which the cut loses
            cfg = _config(tmp_path / "c.yaml", model, out, bus, url, max_staleness=1,
                          wait_timeout_s=90)
            p = start(cfg, resume=False, log=log)
            wait_until(lambda: 4 in steps_logged(out), 240, "step 4", proc=p)
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
            wait_until(idle(standin, bus), 240, "the stand-in to drain the prompts stream")
        assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 4
        state = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json")
                           .read_text())
        inflight = sorted(int(k) for k in state["driver"]["inflight"])
        assert inflight  # the tasks a plain resume would never train
        server.stop()
        aof = rdir / "appendonly.aof"
        aof.write_bytes(aof.read_bytes()[: aof.stat().st_size // 2])

        with pytest.raises(AofDamaged, match=r"is damaged \(cut short\): Redis refused to load "
                                             r"it .* rlrt redis --directory .* --fix-aof"):
            EmbeddedRedis(rdir).start()
        valid, said = repair_aof(rdir, fix=True)
        assert valid, said
        server = EmbeddedRedis(rdir)
        assert server.start() == bus.redis_url

        standin = StandinPipeline(model, bus, token="tok")
        with standin.running() as url:  # a new stand-in: a new URL
            cfg = _config(tmp_path / "c.yaml", model, out, bus, url, max_staleness=1,
                          wait_timeout_s=90)
            finish(start(cfg, resume=True, log=log), log)
    finally:
        server.stop()
    text = log.read_text()
    assert "Redis lost writes made before the checkpoint" in text or \
        "the bus has no record of checkpoint step 4" in text, text[-3000:]
    assert f"re-admitted the {len(inflight)} tasks in flight at checkpoint step 4" in text
    assert [r["step"] for r in records(out, "metrics.jsonl")] == list(range(STEPS))
    tasks = _tasks(out)
    assert len(tasks) == len(set(tasks)) == STEPS * 2  # none twice
    assert set(inflight) <= set(tasks)  # none of the checkpoint's in-flight tasks lost


@pytest.mark.slow  # three trainer processes: a few minutes
def test_resume_from_an_older_checkpoint_does_not_wait_and_keeps_one_history(tmp_path,
                                                                             redis_url):
    torch.set_num_threads(1)
    model = save_tiny_policy(tmp_path / "policy")
    bus = BusSettings(redis_url=redis_url, prefix="older")
    out, log = tmp_path / "out", tmp_path / "t.log"
    standin = StandinPipeline(model, bus, token="tok")
    with standin.running() as url:
        # wait_timeout_s 60: a resume that waited for the abandoned steps' groups fails
        cfg = _config(tmp_path / "c.yaml", model, out, bus, url, wait_timeout_s=60,
                      checkpoint={"every": 2, "keep": 3})
        finish(start(cfg, resume=False, log=log), log)
        first = records(out, "metrics.jsonl")
        assert sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*")) == [2, 4, 6]

        finish(start(cfg, resume=False, log=log, args=("--resume-from", "2")), log)
    text = log.read_text()
    assert "the bus has seen checkpoint step 6: this run resumes from the older step 2" in text
    again = records(out, "metrics.jsonl")
    assert [r["step"] for r in again] == list(range(STEPS))
    assert [r["loss"] for r in again] == [r["loss"] for r in first]
    tasks = _tasks(out)
    assert tasks == list(range(STEPS * 2))
    history = [json.loads(x)["from_step"] for x in
               (out / "config_history.jsonl").read_text().splitlines()]
    assert history == [0, 2]

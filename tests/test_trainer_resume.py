"""Kill and resume the trainer process (`python -m trainer.main --config F [--resume]`, as
`rlrt train` runs it) against real Redis, real HTTP and the stand-in pipeline:

- run A trains 6 steps uninterrupted;
- run B, same settings: SIGTERM after step 1 (clean stop: checkpoint at the last completed
  step, exit 0), --resume, SIGKILL after step 4 (mid-run: the last checkpoint is at step 4,
  so step 4 is lost), --resume to the end.

With deterministic CPU settings (max_staleness 0, seeded sampling), B must train exactly A's
prompts, each exactly once, step for step, with exactly A's per-step losses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from support.polling import wait_until
from support.tiny_model import save_tiny_policy
from support.trainer_standin import StandinPipeline

from protocol.bus import Bus
from protocol.config import BusSettings

ROOT = Path(__file__).parent.parent
STEPS = 6


def write_config(path: Path, model: Path, out: Path, bus: BusSettings, url: str) -> Path:
    cfg = {
        "bus": {"redis_url": bus.redis_url, "prefix": bus.prefix},
        "trainer": {
            "run_id": "resume-test", "model_path": str(model), "output_dir": str(out),
            "zero_stage": 0, "prompts_per_step": 2, "group_size": 4,
            "sampling": {"max_new_tokens": 6, "seed": 11}, "lr": 2e-3, "warmup_steps": 2,
            "total_steps": STEPS, "max_staleness": 0, "zero_variance": "keep",
            "algorithm": {"preset": "rlrt"}, "torch_threads": 1, "micro_batch_size": 4,
            "deterministic": True, "wait_timeout_s": 120,
            "data": {"source": "countdown", "num_prompts": 50},
            "push": {"services": [{"name": "standin", "url": url}], "control_token": "tok"},
            "checkpoint": {"every": 2}, "metrics": {"progress": False},
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


# `rlrt run-trainer`: the same trainer as `rlrt train` starts it, with its one-line refusals
RUN_TRAINER = ("rlrt.cli", "run-trainer")


def start(config: Path, *, resume: bool, log: Path, args: tuple[str, ...] = (),
          entry: tuple[str, ...] = ("trainer.main",)) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", *entry, "--config", str(config), *args]
    return subprocess.Popen(cmd + (["--resume"] if resume else []), cwd=ROOT, env=env,
                            stdout=open(log, "a"), stderr=subprocess.STDOUT)


def steps_logged(out: Path) -> list[int]:
    f = out / "metrics.jsonl"
    if not f.is_file():
        return []
    steps = []
    for line in f.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a line being written
    return steps




def finish(proc: subprocess.Popen, log: Path) -> None:
    try:
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, log.read_text()[-4000:]


def idle(standin: StandinPipeline, bus: BusSettings) -> Callable[[], bool]:
    """Every prompt published so far has been answered (nothing left to sample)."""
    import asyncio

    async def backlog() -> int:
        b = Bus.from_url(None, bus)
        try:
            return await b.backlog(bus.stream("prompts"))
        finally:
            await b.close()

    return lambda: standin.busy == 0 and asyncio.run(backlog()) == 0


def records(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


@pytest.mark.slow  # four trainer processes (DeepSpeed import + init each): a few minutes
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path, redis_url):
    torch.set_num_threads(1)
    model = save_tiny_policy(tmp_path / "policy")

    # ---- A: uninterrupted
    bus_a = BusSettings(redis_url=redis_url, prefix="resumeA")
    sa = StandinPipeline(model, bus_a, token="tok")
    with sa.running() as url:
        cfg_a = write_config(tmp_path / "a.yaml", model, tmp_path / "A", bus_a, url)
        finish(start(cfg_a, resume=False, log=tmp_path / "a.log"), tmp_path / "a.log")

    # ---- B: SIGTERM, resume, SIGKILL, resume
    bus_b = BusSettings(redis_url=redis_url, prefix="resumeB")
    out = tmp_path / "B"
    log = tmp_path / "b.log"
    sb = StandinPipeline(model, bus_b, token="tok")
    with sb.running() as url:
        cfg_b = write_config(tmp_path / "b.yaml", model, out, bus_b, url)
        p = start(cfg_b, resume=False, log=log)
        wait_until(lambda: 1 in steps_logged(out), 240, "step 1", proc=p)
        p.send_signal(signal.SIGTERM)
        finish(p, log)  # a clean exit, with a checkpoint at the last completed step
        done = max(steps_logged(out)) + 1
        latest = json.loads((out / "checkpoints" / "latest.json").read_text())
        assert latest["step"] == done

        p = start(cfg_b, resume=True, log=log)
        wait_until(lambda: 4 in steps_logged(out), 240, "step 4", proc=p)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 4
        # let the stand-in answer what the killed trainer had published (deterministically
        # with the weights it had pushed), so the resumed run meets them as real services
        # would have left them
        wait_until(idle(sb, bus_b), 240, "the stand-in to drain the prompts stream")

        finish(start(cfg_b, resume=True, log=log), log)

    a_metrics, b_metrics = records(tmp_path / "A", "metrics.jsonl"), records(out, "metrics.jsonl")
    assert [r["step"] for r in b_metrics] == list(range(STEPS))
    assert [r["loss"] for r in b_metrics] == [r["loss"] for r in a_metrics]
    assert [r["reward_mean"] for r in b_metrics] == [r["reward_mean"] for r in a_metrics]

    a_trained, b_trained = records(tmp_path / "A", "trained.jsonl"), records(out, "trained.jsonl")
    prompts = [[g["prompt_id"] for g in t["groups"]] for t in b_trained]
    assert prompts == [[g["prompt_id"] for g in t["groups"]] for t in a_trained]
    tasks = [g["task_index"] for t in b_trained for g in t["groups"]]
    assert sorted(tasks) == list(range(STEPS * 2))  # none skipped, none twice
    assert all(g["staleness"] == 0 for t in b_trained for g in t["groups"])
    assert Path(json.loads(log.read_text().strip().splitlines()[-1])["final_model"]).is_dir()

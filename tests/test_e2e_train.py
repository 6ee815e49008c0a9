"""`rlrt train` end to end: embedded Redis, the three services and the DeepSpeed trainer as
real processes on a tiny model; weights pushed every step; report written; nothing left
running afterwards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from support.tiny_model import save_bootstrap_model

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, model: Path, **trainer) -> Path:
    run = tmp_path / "run"
    cfg = {
        "run": {"name": "e2e", "dir": str(run), "bootstrap": False, "eval_prompts": 4, "eval_k": 2,
                "eval_max_new_tokens": 12},
        "bus": {"prefix": "e2e", "claim_idle_ms": 5000},
        "verifier": {"port": 0, "workers": 1},
        "rollout": {"port": 0, "engine": {"kind": "cpu", "model_path": str(model),
                                          "cpu": {"num_threads": 1}}},
        "teacher": {"port": 0, "engine": {"kind": "cpu", "model_path": str(model),
                                          "cpu": {"num_threads": 1}}},
        "trainer": {
            "run_id": "e2e", "model_path": str(model), "algorithm": {"preset": "rlrt"},
            "data": {"source": "countdown", "num_prompts": 64},
            "prompts_per_step": 2, "group_size": 4,
            "sampling": {"temperature": 1.0, "max_new_tokens": 12},
            "micro_batch_size": 8, "lr": 1e-4, "warmup_steps": 0, "zero_stage": 0,
            "torch_threads": 1, "zero_variance": "keep", "total_steps": 2,
            "output_dir": str(run / "trainer"), "checkpoint": {"every": 1},
            **trainer,
        },
    }
    p = tmp_path / "e2e.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def run_processes(marker: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                out.append(p)
        except psutil.Error:
            continue
    return out


def test_rlrt_train_runs_the_whole_system(tmp_path: Path) -> None:
    model = save_bootstrap_model(tmp_path / "model")
    cfg = write_config(tmp_path, model)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "rlrt.cli", "train", "--config", str(cfg)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "trainer" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    report = json.loads((run / "report.json").read_text())
    assert report["eval_before"]["n_prompts"] == 4 and report["eval_after"]["n_prompts"] == 4
    # The services served the trainer's last weights during the final evaluation.
    assert report["eval_after"]["engine_version"] == 2
    assert (run / "training.png").stat().st_size > 1000
    assert not run_processes(str(cfg.parent))  # no orphan service or trainer


def test_a_preset_that_never_scores_trains_without_a_teacher(tmp_path: Path) -> None:
    """grpo: no teacher service starts and none is pushed weights; the verifier's groups
    reach the trainer directly."""
    model = save_bootstrap_model(tmp_path / "model")
    cfg = write_config(tmp_path, model, algorithm={"preset": "grpo"})
    cfg_dict = yaml.safe_load(cfg.read_text())
    cfg_dict["run"]["eval_prompts"] = 0
    cfg.write_text(yaml.safe_dump(cfg_dict))
    res = subprocess.run([sys.executable, "-m", "rlrt.cli", "train", "--config", str(cfg)],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "trainer" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["rollout.log", "verifier.log"]
    resolved = yaml.safe_load((run / "config.resolved.yaml").read_text())
    assert [s["name"] for s in resolved["trainer"]["push"]["services"]] == ["rollout"]
    assert resolved["trainer"]["teacher_service"] is False
    assert not run_processes(str(cfg.parent))


@pytest.mark.slow
def test_ctrl_c_stops_everything_and_resume_finishes(tmp_path: Path) -> None:
    model = save_bootstrap_model(tmp_path / "model")
    cfg = write_config(tmp_path, model, total_steps=6)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "rlrt.cli", "train", "--config", str(cfg)]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "trainer" / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else ""
        assert time.monotonic() < deadline
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "--resume" in out
    assert not run_processes(str(cfg.parent))
    res = subprocess.run(argv + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(6))  # every step once, none lost or repeated


def test_a_service_killed_mid_run_is_restarted_at_the_current_weights(tmp_path: Path) -> None:
    """SIGKILL the rollout service after the first trained step: the launcher names it,
    restarts it, pushes it the trainer's newest weights, and the run still trains every step
    and finishes with the services at the final version."""
    model = save_bootstrap_model(tmp_path / "model")
    cfg = write_config(tmp_path, model, total_steps=4)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "rlrt.cli", "train", "--config", str(cfg)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = tmp_path / "run" / "trainer" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 400
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else ""
            assert time.monotonic() < deadline
            time.sleep(0.2)
        rollout = [p for p in run_processes(str(cfg.parent)) if "rollout" in p.info["cmdline"]]
        assert len(rollout) == 1
        rollout[0].kill()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "rollout died" in out and "restarting" in out
    # The version the restarted service reports serving, not the one sent: the launcher's push
    # (200, or 409 when the trainer's own next push reached the new process first), or none
    # needed because the trainer's got there first.
    back = re.search(r"rollout back, serving weights version (\d+) \((already up to date|"
                     r"pushed version (\d+): (200|409))\)", out)
    assert back, out[-3000:]
    assert back.group(3) is None or int(back.group(1)) >= int(back.group(3)), back.group(0)
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["eval_after"]["engine_version"] == 4  # the revived service got every push
    assert not run_processes(str(cfg.parent))

"""A run whose pipeline stops moving says where it is stuck, and (with `run.stall_stop_s`) stops
resumably instead of waiting: here the verifier, then the trainer, is frozen with SIGSTOP
(alive, so the launcher does not restart it, but answering nothing). The diagnosis itself, case
by case: tests/test_supervisor.py."""

from __future__ import annotations

import contextlib
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
from test_e2e_train import REPO, run_processes, write_config


def test_a_frozen_verifier_is_named_and_the_run_stops_resumably(tmp_path: Path) -> None:
    model = save_bootstrap_model(tmp_path / "model")
    cfg_path = write_config(tmp_path, model, total_steps=200)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["run"].update(eval_prompts=0, stall_warn_s=2, stall_stop_s=5)
    cfg_path.write_text(yaml.safe_dump(cfg))
    metrics = tmp_path / "run" / "trainer" / "metrics.jsonl"
    log = tmp_path / "out.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rlrt.cli", "train", "--config", str(cfg_path)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    verifier = None
    try:
        deadline = time.monotonic() + 400
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        verifier = next(p for p in run_processes(str(cfg_path.parent))
                        if "verifier" in " ".join(p.cmdline()) and "serve" in p.cmdline())
        verifier.send_signal(signal.SIGSTOP)
        while "stopping the trainer" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        verifier.send_signal(signal.SIGCONT)  # so it can shut down in order
        proc.wait(300)
    finally:
        if verifier is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                verifier.send_signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    text = " ".join(log.read_text().split())
    assert proc.returncode != 0, text[-3000:]
    warn = re.search(r"no training step for (\d+) s \(after step (\d+)\): (.*?) stopping", text)
    assert warn, text[-3000:]
    # the frozen service is the one whose readiness probe got no answer; the others answered
    assert re.search(r"verifier: \S+ in flight, /readyz no answer", warn.group(3)), warn.group(3)
    assert re.search(r"rollout: \d+ in flight, /readyz 200", warn.group(3)), warn.group(3)
    assert "the run stalled" in text and "--resume" in text
    assert not run_processes(str(cfg_path.parent))


@pytest.mark.slow
def test_a_frozen_trainer_is_named_as_the_part_not_progressing(tmp_path: Path) -> None:
    model = save_bootstrap_model(tmp_path / "model")
    cfg_path = write_config(tmp_path, model, total_steps=200)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["run"].update(eval_prompts=0, stall_warn_s=2)  # no stall_stop_s: it only warns
    cfg_path.write_text(yaml.safe_dump(cfg))
    metrics = tmp_path / "run" / "trainer" / "metrics.jsonl"
    log = tmp_path / "out.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rlrt.cli", "train", "--config", str(cfg_path)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    trainer = None
    try:
        deadline = time.monotonic() + 400
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        trainer = next(p for p in run_processes(str(cfg_path.parent))
                       if "run-trainer" in p.cmdline())
        trainer.send_signal(signal.SIGSTOP)
        # The services finish what the trainer had sent out, then idle: the trainer is named.
        while "the trainer is not progressing" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        trainer.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the trainer checkpoints, all stop in order
        proc.wait(300)
    finally:
        if trainer is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                trainer.send_signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    text = " ".join(log.read_text().split())
    named = re.search(r"the trainer is not progressing \(every service is ready with nothing in "
                      r"flight; (\d+) groups wait in its input stream", text)
    assert named, text[-3000:]
    assert not run_processes(str(cfg_path.parent))

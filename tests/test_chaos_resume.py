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
  uninterrupted run;
- the newest checkpoint cut (a crash mid-write) or holding NaN/Inf after a SIGKILL: `--resume`
  falls back to the older one with its log line, and the run finishes with one history;
- a resume with a changed config: refused with one line naming the difference; the resume
  with the run's own config then finishes, each task trained once;
- a second trainer on the run's output folder: refused with the first one's pid, while the
  first finishes with each task once;
- a full disk at a checkpoint: the trainer stops with one line (path, free space, the
  checkpoint kept, --resume); once space is back the resume finishes, each task once.

Each row asserts "nothing lost, nothing doubled": `metrics.jsonl` holds steps 0..STEPS-1 once
and `trained.jsonl` every task once.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from support.polling import wait_until
from support.tiny_model import save_tiny_policy
from support.trainer_standin import StandinPipeline
from test_trainer_resume import (
    RUN_TRAINER,
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
from trainer.checkpoint import MANIFEST, Checkpointer, _atomic_write


def _config(path: Path, model: Path, out: Path, bus: BusSettings, url: str, *,
            claim_idle_ms: int | None = None, **trainer) -> Path:
    write_config(path, model, out, bus, url)
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"].update(trainer)
    if claim_idle_ms is not None:
        cfg["bus"]["claim_idle_ms"] = claim_idle_ms
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tasks(out: Path) -> list[int]:
    return sorted(g["task_index"] for t in records(out, "trained.jsonl") for g in t["groups"])


def _one_history(out: Path) -> None:
    """Nothing lost, nothing doubled: every step recorded once, every task trained once."""
    assert [r["step"] for r in records(out, "metrics.jsonl")] == list(range(STEPS))
    assert _tasks(out) == list(range(STEPS * 2))


def _last_line(log: Path) -> str:
    return [ln for ln in log.read_text().splitlines() if ln.strip()][-1]


def _exit_code(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()


def _damage(out: Path, step: int, how: str) -> None:
    """Damage checkpoint `step`: cut its model file in half (a crash mid-write), or put Inf in
    a layer's weights and write a manifest that matches (a checkpoint saved by a version
    without the save-time check: only the load can tell)."""
    d = out / "checkpoints" / f"step-{step:08d}"
    f = max(d.rglob("*.pt"), key=lambda f: f.stat().st_size)  # the model states
    if how == "cut":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return
    sd = torch.load(f, weights_only=False)
    name = next(n for n in sd["module"] if ".layers.0." in n and sd["module"][n].is_floating_point())
    sd["module"][name] = torch.full_like(sd["module"][name], float("inf"))
    torch.save(sd, f)
    ckpt = Checkpointer(out / "checkpoints")
    _atomic_write(d / MANIFEST, json.dumps(ckpt._manifest(d)))  # noqa: SLF001
    assert ckpt.verify(step) is None


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


@pytest.mark.slow  # two trainer processes
@pytest.mark.parametrize("damage", ["cut", "nan"])
def test_a_damaged_newest_checkpoint_falls_back_and_the_run_keeps_one_history(tmp_path, redis_url,
                                                                              damage):
    torch.set_num_threads(1)
    model = save_tiny_policy(tmp_path / "policy")
    bus = BusSettings(redis_url=redis_url, prefix=f"damaged-{damage}")
    out, log = tmp_path / "out", tmp_path / "t.log"
    standin = StandinPipeline(model, bus, token="tok")
    with standin.running() as url:
        cfg = _config(tmp_path / "c.yaml", model, out, bus, url, wait_timeout_s=60,
                      checkpoint={"every": 2, "keep": 3})
        p = start(cfg, resume=False, log=log)
        wait_until(lambda: 4 in steps_logged(out), 240, "step 4", proc=p)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 4
        wait_until(idle(standin, bus), 240, "the stand-in to drain the prompts stream")
        _damage(out, 4, damage)
        finish(start(cfg, resume=True, log=log), log)
    text = log.read_text()
    if damage == "cut":
        assert "resuming from checkpoint step 2, the newest that verifies (skipped: step 4: " \
            in text and "(cut))" in text, text[-3000:]
    else:
        assert "step-00000004 holds " in text and "NaN/Inf values in the weights or optimizer " \
            "state" in text and "falling back to an older one" in text, text[-3000:]
        assert "resumed from " in text and "(step 2)" in text
    assert "the bus has seen checkpoint step 4: this run resumes from the older step 2" in text
    _one_history(out)


@pytest.mark.slow  # three trainer processes
def test_a_resume_with_a_changed_config_is_refused_and_the_run_resumes_once(tmp_path, redis_url):
    torch.set_num_threads(1)
    model = save_tiny_policy(tmp_path / "policy")
    bus = BusSettings(redis_url=redis_url, prefix="changed")
    out, log, refused = tmp_path / "out", tmp_path / "t.log", tmp_path / "refused.log"
    standin = StandinPipeline(model, bus, token="tok")
    with standin.running() as url:
        cfg = _config(tmp_path / "c.yaml", model, out, bus, url)
        p = start(cfg, resume=False, log=log, entry=RUN_TRAINER)
        wait_until(lambda: 1 in steps_logged(out), 240, "step 1", proc=p)
        p.send_signal(signal.SIGTERM)
        finish(p, log)  # a clean stop: a checkpoint at the last completed step
        at = json.loads((out / "checkpoints" / "latest.json").read_text())["step"]
        changed = _config(tmp_path / "changed.yaml", model, out, bus, url, group_size=2,
                          algorithm={"preset": "grpo"})
        assert _exit_code(start(changed, resume=True, log=refused, entry=RUN_TRAINER)) == 2
        assert _last_line(refused).startswith(
            f"error: trainer: the config differs from the one checkpoint step {at} was trained "
            "with: "), refused.read_text()[-3000:]
        assert "group_size: 4 -> 2" in _last_line(refused)
        assert "algorithm.preset: 'rlrt' -> 'grpo'" in _last_line(refused)
        assert "--allow-config-change" in _last_line(refused)
        assert "Traceback" not in refused.read_text()
        finish(start(cfg, resume=True, log=log, entry=RUN_TRAINER), log)
    _one_history(out)
    history = [json.loads(x) for x in (out / "config_history.jsonl").read_text().splitlines()]
    # each stretch of steps ran the run's own config; the refused one never ran
    assert [(h["from_step"], h["fingerprint"]["group_size"], h["fingerprint"]["algorithm"]["preset"])
            for h in history] == [(0, 4, "rlrt"), (at, 4, "rlrt")]


@pytest.mark.slow  # two trainer processes
def test_a_second_trainer_on_one_output_folder_is_refused_while_the_first_finishes(tmp_path,
                                                                                   redis_url):
    torch.set_num_threads(1)
    model = save_tiny_policy(tmp_path / "policy")
    bus = BusSettings(redis_url=redis_url, prefix="shared-out")
    out, log, second_log = tmp_path / "out", tmp_path / "t.log", tmp_path / "second.log"
    standin = StandinPipeline(model, bus, token="tok")
    with standin.running() as url:
        # claim_idle_ms 10 s: an entry delivered just as the first was frozen can be lost to
        # it (seen once: its read timed out on waking) until reclaimed that long after (60 s
        # by default)
        cfg = _config(tmp_path / "c.yaml", model, out, bus, url, claim_idle_ms=10_000)
        first = start(cfg, resume=False, log=log, entry=RUN_TRAINER)
        try:
            wait_until(lambda: steps_logged(out), 240, "the first trainer's first step",
                       proc=first)
            # Frozen, the first holds the folder for as long as the second waits for it
            # (a first run that would finish meanwhile would hand the folder over).
            first.send_signal(signal.SIGSTOP)
            second = start(cfg, resume=False, log=second_log, entry=RUN_TRAINER)
            assert _exit_code(second) == 2
        finally:
            first.send_signal(signal.SIGCONT)
        assert _last_line(second_log).startswith(
            f"error: trainer: another trainer (pid {first.pid}) is writing to {out}: one run "
            "per output folder"), second_log.read_text()[-3000:]
        finish(first, log)
    _one_history(out)


@pytest.mark.slow  # two trainer processes
def test_a_full_disk_stops_with_one_line_and_the_resume_trains_each_task_once(tmp_path,
                                                                              redis_url):
    torch.set_num_threads(1)
    model = save_tiny_policy(tmp_path / "policy")
    bus = BusSettings(redis_url=redis_url, prefix="disk-full")
    out, log = tmp_path / "out", tmp_path / "t.log"
    root = out / "checkpoints"
    standin = StandinPipeline(model, bus, token="tok")
    with standin.running() as url:
        cfg = _config(tmp_path / "c.yaml", model, out, bus, url)
        p = start(cfg, resume=False, log=log, entry=RUN_TRAINER)

        def latest() -> int | None:
            try:
                return json.loads((root / "latest.json").read_text())["step"]
            except (OSError, ValueError):
                return None

        wait_until(lambda: latest() == 2, 240, "the checkpoint at step 2", proc=p)
        # The kernel's own ENOSPC for the next checkpoint's commit (latest.json).
        (root / ".latest.json.tmp").symlink_to("/dev/full")
        assert _exit_code(p) == 4
        line = _last_line(log)
        assert line.startswith("error: trainer: disk full: no space left on the device saving "
                               "checkpoint "), log.read_text()[-3000:]
        assert f"kept: checkpoint {root / 'step-00000002'} (step 2). Free space" in line
        assert "--resume" in line and latest() == 2
        (root / ".latest.json.tmp").unlink()  # space is back
        wait_until(idle(standin, bus), 240, "the stand-in to drain the prompts stream")
        finish(start(cfg, resume=True, log=log, entry=RUN_TRAINER), log)
    _one_history(out)

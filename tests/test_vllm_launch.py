"""Real vLLM in the loop (-m vllm): the engine client across a killed and restarted server, a
teacher sharing the rollout's server, and `rlrt train --config configs/countdown-vllm.yaml`
(short) with the vLLM server SIGKILLed mid-run: the launcher restarts it, the services come
back, the current weights are pushed again and the run finishes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from support.reference_logprobs import token_logprobs
from support.tiny_model import save_bootstrap_model
from support.vllm_server import NEEDS_VLLM, WeightsDir, train_command, vllm_server

from protocol.messages import WeightUpdate
from services.engines.base import UpstreamError
from services.engines.config import EngineConfig
from services.engines.factory import make_engine

pytestmark = NEEDS_VLLM
REPO = Path(__file__).resolve().parents[1]
SEQS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
OFFSETS = [3, 1]


def update(w: WeightsDir) -> WeightUpdate:
    return WeightUpdate(run_id="t", version=w.version, location=w.path, sha256=w.sha256)


def check(out: list[np.ndarray], path: str | Path) -> None:
    for seq, off, got in zip(SEQS, OFFSETS, out, strict=True):
        np.testing.assert_allclose(got, token_logprobs(str(path), seq)[off - 1:], atol=1e-4)


@pytest.mark.timeout(1500)  # two vLLM start-ups: 2-3 min each on 2 loaded cores
async def test_killed_server_restarted_then_pushed_again(vllm_model_dir: Path, vllm_weights,  # noqa: ANN001
                                                         tmp_path: Path) -> None:
    """Rollout and a following teacher on one private server; the server is SIGKILLed and
    restarted (base weights): both report unhealthy, requests wait instead of serving base
    weights under our version, and one push (loaded by the rollout engine, adopted by the
    teacher) heals both."""
    with vllm_server(vllm_model_dir, tmp_path, name="vllm-restart") as srv:
        kw = dict(kind="vllm", url=srv.url, model_path=str(vllm_model_dir), quarantine_wait_s=240)
        roll = await make_engine(EngineConfig(**kw))
        teach = await make_engine(EngineConfig(**kw, share_rollout_server=True))
        try:
            # one load: the teacher's update waits for the rollout's
            t = asyncio.ensure_future(teach.update_weights(update(vllm_weights[1])))
            assert await roll.update_weights(update(vllm_weights[1])) == 1
            assert await t == 1
            check(await teach.score(SEQS, OFFSETS), vllm_weights[1].path)
            assert teach.version == 1
            log = srv.server.child.log_tail(1_000_000)  # type: ignore[union-attr]
            assert log.count("POST /collective_rpc") == 1  # one load for both services

            srv.server.kill()
            pending = asyncio.ensure_future(roll.score(SEQS, OFFSETS))  # waits for the server
            await asyncio.to_thread(srv.server.restart)  # base weights, version "default"
            with pytest.raises(UpstreamError, match="restarted"):
                await pending
            assert not (await roll.health())["ok"] and not (await teach.health())["ok"]
            # the launcher's re-push (rlrt/engine_servers.py: revive)
            t = asyncio.ensure_future(teach.update_weights(update(vllm_weights[1])))
            assert await roll.update_weights(update(vllm_weights[1])) == 1
            assert await t == 1
            assert (await roll.health())["ok"] and (await teach.health())["ok"]
            check(await roll.score(SEQS, OFFSETS), vllm_weights[1].path)
            check(await teach.score(SEQS, OFFSETS), vllm_weights[1].path)
        finally:
            await roll.close()
            await teach.close()


def _server_pids(model: Path) -> list[int]:
    """The vLLM API servers on `model` (the session leaders: their engine-core children,
    forked, carry the same command line)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if "vllm.entrypoints.launchers.api_server.entry" in cmd and str(model) in cmd:
            try:
                if os.getsid(p.info["pid"]) == p.info["pid"]:
                    out.append(p.info["pid"])
            except OSError:
                continue
    return out


def _leftovers(marker: str) -> list[str]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and "pytest" not in cmd:
            out.append(cmd[:200])
    return out


@pytest.mark.slow  # 10-20 min on 2 cores (two vLLM start-ups, services, trainer): -m "vllm and slow"
@pytest.mark.timeout(2700)
def test_rlrt_train_countdown_vllm_survives_a_killed_server(tmp_path: Path) -> None:
    model = save_bootstrap_model(tmp_path / "model", hidden=64)
    run = tmp_path / "run"
    steps = 4
    sets = [f"model={model}", f"run.dir={run}", "run.bootstrap=false", "run.eval_prompts=0",
            "bus.prefix=vllmlaunch", "bus.claim_idle_ms=5000", f"trainer.total_steps={steps}",
            "trainer.prompts_per_step=4", "trainer.group_size=4", "trainer.micro_batch_size=16",
            "trainer.sampling.max_new_tokens=16", f"trainer.output_dir={run / 'trainer'}",
            "trainer.checkpoint.every=2", "trainer.warmup_steps=0",
            "trainer.zero_variance=keep"]  # a random-init model: every group scores 0
    argv, env = train_command(sets)
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    metrics = run / "trainer" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 900
        while not (metrics.exists() and '"step"' in metrics.read_text()):  # one step done
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no training step within 900 s"
            time.sleep(1)
        (pid,) = _server_pids(model)
        os.killpg(pid, signal.SIGKILL)  # the server and its engine-core workers: a crash
        code = proc.wait(timeout=1500)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        log.close()
    out = (tmp_path / "train.log").read_text()
    assert code == 0, out[-4000:]
    assert "rollout-vllm died" in out and "rollout back, serving weights version" in out, out[-4000:]
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert sorted(r["step"] for r in rows) == list(range(steps))  # steps count from 0
    assert not _leftovers(str(model)), "processes left behind"
    assert not _server_pids(model)

"""`rlrt serve rollout|teacher --config FILE` as real processes (slow: fresh interpreters
importing torch): YAML + env config, the fake engine servers, real Redis, SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from support.fake_engines import Fake
from support.groups import verified_group
from support.polling import answers, wait_until
from support.services import take

from protocol.bus import Bus
from protocol.config import BusSettings
from protocol.messages import PromptTask, RolloutGroup, SamplingParams, ScoredGroup
from rlrt.processes import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def start(kind: str, engine: dict, redis_url: str, prefix: str, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = {"bus": {"redis_url": redis_url, "prefix": prefix, "block_ms": 100},
           kind: {"port": port, "engine": engine}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), f"RLRT_{kind.upper()}__TOKEN": "tok"}
    proc = subprocess.Popen([sys.executable, "-m", "rlrt.cli", "serve", kind, "--config", str(path)],
                            cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: answers(url + "/readyz"), 180, f"rlrt serve {kind} to be ready", proc=proc,
               every_s=0.1)
    return proc, url


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_rollout(redis_url: str, prefix: str, fake_sglang: Fake, model_dir, tmp_path: Path) -> None:  # noqa: ANN001
    proc, url = start("rollout", {"kind": "sglang", "url": fake_sglang.url,
                                  "model_path": str(model_dir)}, redis_url, prefix, tmp_path)
    try:
        assert httpx.get(url + "/v1/version").status_code == 401  # token from the environment
        v = httpx.get(url + "/v1/version", headers={"Authorization": "Bearer tok"}).json()
        assert v["version"] == 0 and v["engine"]["engine"] == "sglang"
        bus_cfg = BusSettings(redis_url=redis_url, prefix=prefix)

        async def roundtrip() -> RolloutGroup:
            bus = Bus.from_url(redis_url, bus_cfg)
            try:
                task = PromptTask(run_id="r", prompt_id="p", prompt_text="hi",
                                  prompt_ids=np.asarray([5, 6, 7]), answer="1", group_size=2,
                                  sampling=SamplingParams(max_new_tokens=4))
                await bus.publish(bus_cfg.stream("prompts"), task)
                return (await take(bus, bus_cfg.stream("rollouts"), RolloutGroup))[0]
            finally:
                await bus.close()

        assert len(asyncio.run(roundtrip()).responses) == 2
    finally:
        assert stop(proc) == 0


def test_serve_teacher(redis_url: str, prefix: str, fake_vllm: Fake, model_dir, tmp_path: Path) -> None:  # noqa: ANN001
    proc, _url = start("teacher", {"kind": "vllm", "url": fake_vllm.url,
                                   "model_path": str(model_dir)}, redis_url, prefix, tmp_path)
    try:
        bus_cfg = BusSettings(redis_url=redis_url, prefix=prefix)

        async def roundtrip() -> ScoredGroup:
            bus = Bus.from_url(redis_url, bus_cfg)
            try:
                group = verified_group(model_dir, ["5", "5!", "7"], [True, True, False])
                await bus.publish(bus_cfg.stream("verified"), group)
                return (await take(bus, bus_cfg.stream("scored"), ScoredGroup))[0]
            finally:
                await bus.close()

        sg = asyncio.run(roundtrip())
        assert [t is not None for t in sg.teacher] == [True, True, False]
    finally:
        assert stop(proc) == 0

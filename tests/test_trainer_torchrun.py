"""The documented trainer entry point, `torchrun --nproc_per_node 2 -m trainer.main -c
configs/countdown-tiny.yaml`, trains against a running pipeline (embedded Redis and the three
services, started by the launcher's own code) on 2 CPU ranks (gloo), the config shrunk with
--set. Slow: a tiny model, two steps, fresh interpreters importing torch and DeepSpeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.tiny_model import save_bootstrap_model

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "countdown-tiny.yaml"



@pytest.mark.slow
def test_torchrun_two_ranks_on_the_tiny_config(tmp_path: Path, monkeypatch) -> None:
    from rich.console import Console

    from rlrt.launch import LocalRun
    from rlrt.supervisor import Supervisor, own_redis

    for var in list(os.environ):
        if var.startswith("RLRT_"):
            monkeypatch.delenv(var)
    model = save_bootstrap_model(tmp_path / "model")
    run_dir = tmp_path / "run"
    sets = [f"model={model}", f"run.dir={run_dir}", "run.bootstrap=false", "run.eval_prompts=0",
            "bus.prefix=torchrun-test", "bus.claim_idle_ms=5000", "data.num_prompts=32",
            "trainer.prompts_per_step=2", "trainer.group_size=2", "trainer.total_steps=2",
            "trainer.sampling.max_new_tokens=8", "trainer.micro_batch_size=4",
            "trainer.warmup_steps=0", "trainer.checkpoint.every=0", "trainer.export_final=false",
            "trainer.zero_variance=keep"]
    plan = LocalRun(TINY, sets=sets).preflight()
    sup = Supervisor(plan, console=Console(stderr=True),
                     redis=own_redis(plan.cfg.bus.redis_url, plan.run_dir, plan.cfg.run))
    try:
        sup.start_redis()
        sup.start_services()
        env = {**plan.trainer_env(sup.redis_url), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        push = [s.model_dump(exclude_none=True) for s in plan.cfg.trainer.push.services]
        torchrun = Path(sys.executable).parent / "torchrun"
        argv = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "trainer.main",
                "-c", str(TINY), *(f"--set={s}" for s in sets),
                f"--set=trainer.push.services={json.dumps(push)}"]
        res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        sup.stop_all()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # The outputs went under run.dir (the config states no trainer.output_dir).
    rows = [json.loads(x) for x in (run_dir / "trainer" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]

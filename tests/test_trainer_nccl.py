"""The trainer's half of an NCCL weight update (trainer/transports/nccl.py), run over gloo
on CPU against a receiver process that plays the service + engine and joins with SGLang's
released `init_custom_process_group` (tests/support/nccl_receiver.py): bucket metadata sized by ds_numel under ZeRO-3, the broadcasts matching
it tensor for tensor, group reuse, and a refusal reported at once (no rendezvous wait).
NCCL itself and the vLLM path run only on GPUs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from support.tiny_model import save_tiny_policy
from support.update_case import case_batch, case_config
from support.upstream import package_dir

from rlrt.processes import free_port
from trainer import dist
from trainer.config import NcclPush, ServiceEndpoint
from trainer.model import (
    build_policy,
    full_state_dict,
    named_weights,
    numel_of,
    plan_buckets,
)
from trainer.transports.nccl import _PEERS, nccl_push_all
from trainer.update import update_step

TESTS = Path(__file__).parent


@pytest.fixture
def receiver():
    package_dir("sglang")  # skips with the reason when the sources are not fetched
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]),
           "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "support.nccl_receiver"], cwd=TESTS, env=env,
                         stdout=subprocess.PIPE, text=True)
    url = p.stdout.readline().strip()
    try:
        assert url.startswith("http"), "receiver did not start"
        yield url
    finally:
        p.kill()
        p.wait()


@pytest.fixture
def policy(tmp_path):
    torch.set_num_threads(1)
    cfg = case_config(save_tiny_policy(tmp_path / "policy"), zero_stage=3)
    rank, world = dist.setup("cpu", 120)
    return build_policy(cfg, rank=rank, world_size=world, device="cpu"), cfg


def test_buckets_are_sized_by_ds_numel_under_zero3(policy):
    p, _ = policy
    items = named_weights(p.hf_model)
    assert any(t.numel() == 0 for _, t in items)  # partitioned: numel() would lie
    budget = 40_000
    plan = plan_buckets(items, budget, torch.float32)
    assert [i for b in plan for i in b] == list(range(len(items)))  # order kept, all once
    assert len(plan) > 1
    for b in plan:
        nbytes = sum(numel_of(items[i][1]) * 4 for i in b)
        assert nbytes <= budget or len(b) == 1


def test_nccl_push_broadcasts_every_bucket_and_reuses_the_group(policy, receiver):
    p, cfg = policy
    _PEERS.clear()
    push = NcclPush(nccl_backend="gloo", bucket_mb=0.02, nccl_timeout_s=60,
                    master_port=free_port(), control_token="t",
                    services=[ServiceEndpoint(name="rollout", url=receiver, engine="sglang")])

    def check(version: int) -> None:
        res = nccl_push_all(p, push, version=version, dtype=torch.float32)
        assert res.ok == ["rollout"] and not res.failed
        got = httpx.get(f"{receiver}/_received").json()
        want = full_state_dict(p)
        assert got.keys() == want.keys()
        for n, t in want.items():
            assert got[n][1] == list(t.shape) and got[n][2] == "float32"
            assert got[n][0] == pytest.approx(float(t.double().sum()), abs=1e-9), n

    check(1)
    update_step(p, case_batch(), cfg.algorithm, step=0, micro_batch_size=4)  # new weights
    check(2)
    assert httpx.get(f"{receiver}/_inits").json()["inits"] == 1  # the group was reused
    assert httpx.get(f"{receiver}/v1/version").json()["version"] == 2

    # a refusal is reported at once (the trainer does not wait out the rendezvous), the
    # group is dropped, and the next update builds a new one
    httpx.post(f"{receiver}/_fail", json={"status": 409})
    _PEERS["rollout"].reset()  # as after a failure: next update must re-initialise
    t0 = time.monotonic()
    res = nccl_push_all(p, push, version=3, dtype=torch.float32)
    assert "HTTP 409" in res.failed["rollout"] and time.monotonic() - t0 < 30
    check(4)
    assert httpx.get(f"{receiver}/_inits").json()["inits"] == 2


def test_a_data_parallel_sglang_server_is_refused_with_the_reason():
    from fastapi import FastAPI
    from support.trainer_standin import serve

    from trainer.transports.nccl import Peer

    app = FastAPI()

    @app.get("/v1/version")
    def version() -> dict:  # what a rollout service in front of `--dp-size 3` reports
        return {"version": 0, "engine": {"engine_world_size": 3, "dp_size": 3}}

    push = NcclPush(services=[ServiceEndpoint(name="rollout", url="http://x", engine="sglang")])
    with serve(app) as url:
        svc = ServiceEndpoint(name="rollout", url=url, engine="sglang")
        with pytest.raises(RuntimeError, match="dp_size=3.*one server per replica"):
            Peer(svc, push, free_port()).prepare()
        # a vLLM server with data parallelism is fine (vLLM ranks its DP workers itself)
        assert Peer(svc.model_copy(update={"engine": "vllm"}), push, free_port()).prepare()

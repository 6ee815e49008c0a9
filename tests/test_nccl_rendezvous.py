"""The trainer's update-group set-up (trainer/transports/nccl.py) meets SGLang's own
`init_custom_process_group` -- the released sglang source (scripts/fetch-upstream.sh),
loaded in isolation -- on gloo, each side in its own process (tests/support/
rendezvous_roles.py): they form one group and a broadcast arrives. Also with two peers
under distinct group names, and inside a 2-rank training job whose default group has a
bound device (simulated), where torch would otherwise take its split path on rank 0 alone.
NCCL itself needs GPUs: scripts/gpu_check.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.upstream import package_dir

from rlrt.processes import free_port

TESTS = Path(__file__).parent
TIMEOUT = 60  # the rendezvous timeout of each side; a broken rendezvous fails within it


@pytest.fixture(autouse=True)
def _sglang_sources() -> None:
    package_dir("sglang")  # skips with the reason when not fetched


def start(*args: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "support.rendezvous_roles",
                             *map(str, args)], cwd=TESTS, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def result(p: subprocess.Popen) -> dict:
    try:
        out, err = p.communicate(timeout=TIMEOUT + 60)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    assert p.returncode == 0, f"{p.args[3]} failed ({p.returncode}): {err[-2000:]}"
    return json.loads(out.strip().splitlines()[-1])


def finish(procs: list[subprocess.Popen]) -> list[dict]:
    try:
        return [result(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def received(value: float) -> list[list[float]]:
    return [[value] * 16, [value + 1] * 16]


def test_trainer_and_sglang_form_one_group() -> None:
    port = free_port()
    peer, trainer = finish([start("sglang-peer", port, "rlrt_weight_sync_rollout", 2, 1, TIMEOUT),
                            start("trainer", TIMEOUT, f"{port}:rlrt_weight_sync_rollout:2:3")])
    assert trainer["groups"]["rlrt_weight_sync_rollout"] == {"size": 2, "rank": 0}
    assert (peer["rank"], peer["size"]) == (1, 2)
    assert peer["got"] == received(3)


def test_two_engine_gpus_join_as_rank_offset_plus_tp_rank() -> None:
    port = free_port()  # one engine with TP 2: ranks 1 and 2 of a world of 3
    p1, p2, trainer = finish([start("sglang-peer", port, "g", 3, 1, TIMEOUT),
                              start("sglang-peer", port, "g", 3, 2, TIMEOUT),
                              start("trainer", TIMEOUT, f"{port}:g:3:7")])
    assert trainer["groups"]["g"]["size"] == 3
    assert [p1["rank"], p2["rank"]] == [1, 2] and p1["got"] == p2["got"] == received(7)


def test_two_peers_with_distinct_group_names() -> None:
    a, b = free_port(), free_port()
    pa, pb, trainer = finish([
        start("sglang-peer", a, "rlrt_weight_sync_rollout", 2, 1, TIMEOUT),
        start("sglang-peer", b, "rlrt_weight_sync_teacher", 2, 1, TIMEOUT),
        start("trainer", TIMEOUT, f"{a}:rlrt_weight_sync_rollout:2:1",
              f"{b}:rlrt_weight_sync_teacher:2:10")])
    assert set(trainer["groups"]) == {"rlrt_weight_sync_rollout", "rlrt_weight_sync_teacher"}
    assert pa["got"] == received(1) and pb["got"] == received(10)


def test_one_group_name_twice_is_refused_by_torch() -> None:
    # Why the names must differ: the second group of one name fails in the trainer.
    a, b = free_port(), free_port()
    procs = [start("sglang-peer", a, "same", 2, 1, TIMEOUT),
             start("sglang-peer", b, "same", 2, 1, 10),
             start("trainer", TIMEOUT, f"{a}:same:2:1", f"{b}:same:2:2")]
    try:
        out, err = procs[2].communicate(timeout=TIMEOUT + 60)
        assert procs[2].returncode != 0 and "group name has already been created" in err, err[-800:]
        assert result(procs[0])["got"] == received(1)  # the first group did work
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_two_rank_trainer_with_a_bound_default_group() -> None:
    train, port = free_port(), free_port()
    peer, r1, r0 = finish([
        start("sglang-peer", port, "rlrt_weight_sync_rollout", 2, 1, TIMEOUT),
        start("trainer-rank", train, 1, 1, TIMEOUT, f"{port}:rlrt_weight_sync_rollout:2:4"),
        start("trainer-rank", train, 0, 1, TIMEOUT, f"{port}:rlrt_weight_sync_rollout:2:4")])
    assert peer["got"] == received(4)
    assert r0["groups"]["rlrt_weight_sync_rollout"]["size"] == 2
    # torch's split path (a collective of all training ranks under NCCL) was not taken, and
    # the default group got its bound device back
    assert r0["split_calls"] == 0 and r0["bound"] == r1["bound"] == "cpu:0"


@pytest.mark.slow
def test_without_clearing_the_bound_device_torch_takes_the_split_path() -> None:
    # Negative control for the test above: the simulation does reach torch's split path
    # (which hangs under NCCL; gloo gets through it slowly).
    train, port = free_port(), free_port()
    peer, _r1, r0 = finish([
        start("sglang-peer", port, "g", 2, 1, TIMEOUT),
        start("trainer-rank", train, 1, 2, TIMEOUT, f"{port}:g:2:4"),
        start("trainer-rank", train, 0, 2, TIMEOUT, f"{port}:g:2:4")])
    assert r0["split_calls"] >= 1 and peer["got"] == received(4)

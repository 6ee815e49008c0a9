"""run_trainer end to end, in process: real Redis, real HTTP weight pushes, the real
DeepSpeed engine, and a stand-in pipeline (tests/support/trainer_standin.py) that samples
from the pushed weights. Checks what a run leaves behind: metrics, the trained-prompt log,
checkpoints, and a final model that is exactly the last pushed weights."""

from __future__ import annotations

import json

import pytest
import torch
from prometheus_client import REGISTRY
from support.tiny_model import save_tiny_policy
from support.trainer_standin import StandinPipeline, standin_config
from transformers import AutoModelForCausalLM

from protocol.config import BusSettings
from trainer.main import run_trainer

REQUIRED = [
    "reward_mean", "accuracy", "response_len_mean", "adv_mean", "adv_abs_mean", "adv_std",
    "self_driven_share", "mean_D", "weight_mean", "clip_low_share", "clip_high_share",
    "clipfrac_low", "clipfrac_high", "mismatch_kl", "entropy", "staleness_hist",
    "staleness", "teacher_tokens_scored", "teacher_tokens_skipped", "loss", "grad_norm",
    "lr", "tokens_per_s", "time_wait_s", "time_old_logprobs_s", "time_fwd_bwd_s",
    "time_optimizer_s", "time_push_s", "time_step_s", "push_ok", "push_failed",
]


# Every stream of the pipeline renamed in the one place stream names are set (bus.streams).
RENAMED = {"prompts": "p2", "rollouts": "r2", "verified": "v2", "scored": "s2"}


@pytest.fixture(params=[(True, {}), (False, {}), (True, RENAMED)],
                ids=["push-overlap", "push-sync", "renamed-streams"])
def run(request, tmp_path, redis_url, prefix):
    torch.set_num_threads(1)
    overlap, streams = request.param
    model = save_tiny_policy(tmp_path / "policy")
    bus = BusSettings(redis_url=redis_url, prefix=prefix, streams=streams)
    standin = StandinPipeline(model, bus, token="tok")
    with standin.running() as url:
        cfg = standin_config(model, tmp_path / "out", url, push={"overlap": overlap},
                             checkpoint={"every": 2})
        summary = run_trainer(cfg, bus)
    return cfg, summary, standin


def test_renamed_streams_carry_the_whole_run(run, redis_url):
    """A stream renamed in bus.streams is the one the trainer and the pipeline use: the run
    completes on the new names and nothing touches the old ones."""
    import redis

    cfg, summary, standin = run
    streams = standin.bus_cfg.streams
    r = redis.Redis.from_url(redis_url)
    prefix = standin.bus_cfg.prefix
    used = {k.decode().split(":")[1] for k in r.scan_iter(f"{prefix}:*")}
    assert summary["completed"]
    assert {streams.get(s, s) for s in ("prompts", "scored", "verified")} <= used
    renamed_away = {s for s, name in streams.items() if name != s}
    assert not renamed_away & used, sorted(renamed_away & used)


def test_a_run_trains_pushes_logs_checkpoints_and_exports(run):
    cfg, summary, standin = run
    out = cfg.out
    assert summary["completed"] and summary["version"] == 3 and summary["stopped"] is None
    # an initial push, then one after every step, each loaded by the service
    assert standin.controls.calls == [0, 1, 2, 3] and standin.version == 3

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    # Every step reports one push as loaded by the service: with overlap the previous one
    # (step 0: the initial push), which that step waited for; without, its own.
    assert all(r["push_ok"] == 1 and r["push_failed"] == [] for r in records)
    assert all(("push_wait_s" in r) == cfg.push.overlap for r in records[1:])
    for r in records:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert r["push_ok"] == 1 and r["push_failed"] == []
        assert r["staleness_max"] <= cfg.max_staleness  # the bound holds for every sample
        assert r["teacher_version_lag_max"] == 0  # rlrt: teacher_version match_s
        assert sum(r["staleness_hist"].values()) == r["samples"]
        assert r["groups"] == cfg.prompts_per_step
    # groups sampled and scored at t-1 (max_staleness 1) were sent back and rescored at t
    assert standin.rescored == sum(r.get("teacher_rescored", 0) for r in records)
    # warm-up of 1 step, as verl's: step 0 runs at lr 0, the peak from step 1 on
    assert records[0]["lr"] == 0.0 and records[1]["lr"] == pytest.approx(1e-3)
    # the trainer's log-probs and the sampler's agree on fresh samples (same weights)
    fresh = [r for r in records if r["staleness_max"] == 0]
    assert fresh and all(r["mismatch_kl"] < 1e-6 for r in fresh)

    trained = [json.loads(line) for line in (out / "trained.jsonl").read_text().splitlines()]
    tasks = [g["task_index"] for t in trained for g in t["groups"]]
    assert len(tasks) == len(set(tasks)) == 3 * cfg.prompts_per_step  # each prompt once
    assert all(g["staleness"] == t["version"] - g["engine_version"]
               and g["s_version"] == t["version"] for t in trained for g in t["groups"])

    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 3
    assert any((out / "tb").iterdir())
    assert REGISTRY.get_sample_value("rlrt_trainer_loss") == pytest.approx(records[-1]["loss"])

    final = AutoModelForCausalLM.from_pretrained(summary["final_model"], dtype=torch.float32)
    served = dict(standin.model.named_parameters())
    for n, p in final.named_parameters():
        assert torch.equal(p, served[n]), n

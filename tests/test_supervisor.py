"""The launcher's supervision, piece by piece: the stall clock and its diagnosis (which part is
not progressing), the line after a revival (what the service says it serves), the last line
of a stopped run (a full disk named as such). One launcher per run directory:
tests/test_launcher.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from support.fake_engines import Fake
from support.serve import serve_app_here

from protocol.messages import WeightUpdate
from protocol.weights_client import WeightsClient
from rlrt.config import RunConfig
from rlrt.plan import RunPlan
from rlrt.repush import repush
from rlrt.supervisor import GAVE_UP, STALLED, StallWatch, diagnose
from rlrt.train import stop_reason
from trainer.disk import EXIT_DISK_FULL

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the stall clock
def test_the_stall_clock_starts_at_the_first_step_of_this_run() -> None:
    w = StallWatch(warn_s=10, stop_s=25)
    assert w.tick(3, 0.0) is None  # a resumed run's steps so far: no clock yet
    assert w.tick(3, 1000.0) is None  # start-up and the first step may take long
    assert w.tick(4, 1000.0) is None  # a step of this run: the clock starts
    assert w.tick(4, 1009.9) is None
    assert w.tick(4, 1010.0) == "warn"
    assert w.tick(4, 1015.0) is None  # once per warn_s
    assert w.tick(4, 1020.0) == "warn"
    assert w.tick(4, 1025.0) == "stop"
    assert w.tick(5, 1026.0) is None and w.warned == 0  # a step resets it


def test_without_stall_stop_the_clock_only_warns() -> None:
    w = StallWatch(warn_s=1, stop_s=None)
    w.tick(0, 0.0), w.tick(1, 0.0)  # noqa: B018
    assert [w.tick(1, t) for t in (1.0, 2.0, 3.0, 1e6)] == ["warn"] * 4


# --------------------------------------------------------------------------- its diagnosis
def test_idle_services_name_the_trainer() -> None:
    line = diagnose({"verifier": (0, 200, "/readyz 200 ok"), "rollout": (0, 200, "/readyz 200 ok"),
                     "teacher": (0, 200, "/readyz 200 ok")}, trainer_waiting=7)
    assert line.startswith("the trainer is not progressing")
    assert "7 groups wait in its input stream" in line
    assert "rollout: 0 in flight, /readyz 200 ok" in line


@pytest.mark.parametrize("states", [
    {"verifier": (3, 200, "/readyz 200"), "rollout": (0, 200, "/readyz 200")},     # work held
    {"verifier": (0, None, "/readyz no answer"), "rollout": (0, 200, "/readyz 200")},  # frozen
    {"verifier": ("? (TimeoutError)", 200, "/readyz 200"), "rollout": (0, 200, "/readyz 200")},
    {"verifier": (0, 503, "/readyz 503 broken pool"), "rollout": (0, 200, "/readyz 200")},
])
def test_a_busy_or_silent_service_does_not_blame_the_trainer(states: dict) -> None:
    line = diagnose(states, trainer_waiting=0)
    assert "trainer" not in line
    assert line.startswith("verifier: ")


# --------------------------------------------------------------------------- the last line
def _plan(tmp_path: Path, **run) -> RunPlan:  # noqa: ANN003
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": str(tmp_path / "m"), "run": {"dir": str(tmp_path / "run"), **run},
                                 "trainer": {"output_dir": str(tmp_path / "run" / "trainer")}}))
    cfg = RunConfig.load(p, environ={})
    return RunPlan(cfg, p, (), ("verifier", "rollout", "teacher"), {}, "t",
                   tmp_path / "run" / "r.yaml", environ={})


def test_a_full_disk_is_named_with_its_path_free_space_what_was_kept_and_how_to_go_on(
        tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    ckpt = plan.checkpoint_root
    ckpt.mkdir(parents=True)
    (ckpt / "latest.json").write_text('{"step": 6, "tag": "step-6"}')
    # Redis also refuses writes on a full disk: the disk is the cause, and is what is named.
    line = stop_reason(EXIT_DISK_FULL, plan, redis_problem="ResponseError: MISCONF", own_redis=True)
    assert line.startswith(f"the trainer stopped: disk full at {plan.trainer_out} (")
    assert " free there); kept: checkpoint " in line and "(step 6)" in line
    assert line.endswith(f"then: rlrt train --config {tmp_path / 'c.yaml'} --resume")


def test_every_other_stop_says_why_and_how_to_go_on(tmp_path: Path) -> None:
    plan = _plan(tmp_path, stall_stop_s=30)
    again = plan.resume_command
    assert stop_reason(STALLED, plan, redis_problem=None, own_redis=True) == (
        "the run stalled: no training step for 30 s (run.stall_stop_s; the diagnosis is "
        f"above). Continue with: {again}")
    assert stop_reason(GAVE_UP, plan, redis_problem="ConnectionError: x", own_redis=True).startswith(
        "lost Redis (ConnectionError: x)")
    assert stop_reason(1, plan, redis_problem=None, own_redis=True) == (
        f"the trainer exited with code 1; see the messages above. Continue with: {again}")


# --------------------------------------------------------------------------- after a revival
TOKEN = "s3cret"


@pytest.fixture
async def rollout(fake_sglang: Fake, model_dir: Path) -> AsyncIterator[str]:
    """A real engine service (control API over an SGLang engine, the fake SGLang server)."""
    from services.engines.config import EngineConfig
    from services.engines.control_api import EngineSlot
    from services.engines.factory import make_engine
    from services.engines.service import build_service_app

    slot = EngineSlot()
    slot.set(await make_engine(EngineConfig(kind="sglang", url=fake_sglang.url,
                                            model_path=str(model_dir), flush_interval_s=0.01)))
    app = build_service_app("rollout", slot, None, token=TOKEN, max_body_bytes=64 * 1024)
    async with serve_app_here(app) as url:
        yield url
    await slot.engine.close()  # type: ignore[union-attr]


def _update(w, **kw) -> WeightUpdate:  # noqa: ANN001
    return WeightUpdate(**{"run_id": "launcher", "version": w.version, "location": w.path,
                           "sha256": w.sha256, **kw})


async def test_a_revived_service_is_reported_at_the_version_it_serves(rollout: str, weights_v1) -> None:  # noqa: ANN001
    client = WeightsClient("rollout", rollout, TOKEN)
    # the sync client runs in a thread: the service answers on this test's loop
    line = await asyncio.to_thread(repush, client, _update(weights_v1))
    assert line == "rollout back, serving weights version 1 (pushed version 1: 200)"
    line = await asyncio.to_thread(repush, client, _update(weights_v1))
    assert line == "rollout back, serving weights version 1 (already up to date)"


async def test_a_refused_push_is_not_reported_as_served(rollout: str, weights_v1) -> None:  # noqa: ANN001
    client = WeightsClient("rollout", rollout, TOKEN)
    line = await asyncio.to_thread(repush, client, _update(weights_v1, sha256="0" * 64))
    assert line == "rollout back, serving weights version 0 (pushed version 1: 409)"


def test_an_unreachable_service_says_so(tmp_path: Path) -> None:
    from rlrt.processes import free_port

    line = repush(WeightsClient("teacher", f"http://127.0.0.1:{free_port()}", TOKEN), None)
    assert line.startswith("teacher back, serving weights version unknown (GET /v1/version: Connect")

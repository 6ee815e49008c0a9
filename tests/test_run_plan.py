"""rlrt/plan.py: the processes of a local run decided from its config alone (argv, environment,
wiring), checked without starting anything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from rlrt.config import RunConfig
from rlrt.plan import RunPlan, needed_services, wiring


def _plan(tmp_path: Path, services: tuple[str, ...] = ("verifier", "rollout", "teacher"),
          environ: dict[str, str] | None = None, **kw) -> RunPlan:  # noqa: ANN003
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "model": str(tmp_path / "model"), "run": {"dir": str(tmp_path / "run")},
        "trainer": {"output_dir": str(tmp_path / "run" / "trainer")}}))
    ports = {name: 18000 + i for i, name in enumerate(services)}
    base = RunConfig.load(cfg_path, environ={})
    cfg = RunConfig.load(cfg_path, overrides=wiring(base, services, ports, tmp_path / "model"),
                         environ={})
    return RunPlan(cfg, cfg_path, ("trainer.lr=1e-5",), services, ports, "tok",
                   tmp_path / "run" / "config.resolved.yaml", environ=environ or {}, **kw)


def test_each_service_is_rlrt_serve_on_the_resolved_file_with_its_own_log(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    spec = plan.service("verifier", "redis://x")
    assert spec.argv == [sys.executable, "-m", "rlrt.cli", "serve", "verifier", "--config",
                         str(plan.resolved_path)]
    assert spec.log_path == tmp_path / "run" / "logs" / "verifier.log"
    assert spec.ready_url == "http://127.0.0.1:18000/readyz"
    assert spec.env["RLRT_BUS__REDIS_URL"] == spec.env["REDIS_URL"] == "redis://x"
    # every service's token (the trainer pushes to the engine services, the evaluation
    # calls the verifier)
    assert {spec.env[f"RLRT_{n.upper()}__TOKEN"] for n in plan.services} == {"tok"}


def test_the_trainer_resumes_with_its_flags_and_no_inherited_rendezvous(tmp_path: Path) -> None:
    plan = _plan(tmp_path, resume=True, trainer_args=("--resume-from=4",),
                 environ={"MASTER_PORT": "29500", "RANK": "0", "PATH": "/bin"})
    spec = plan.trainer("redis://x")
    assert spec.argv[-4:] == ["--config", str(plan.resolved_path), "--resume", "--resume-from=4"]
    assert spec.log_path is None and spec.ready_url is None  # the launcher's terminal
    assert "MASTER_PORT" not in spec.env and "RANK" not in spec.env and spec.env["PATH"] == "/bin"
    assert spec.env["RLRT_TRAINER__PUSH__CONTROL_TOKEN"] == "tok"


def test_overrides_reach_children_by_the_file_only(tmp_path: Path) -> None:
    """A port or any setting given again in the environment would be applied twice (and beat
    a --set): the children's environment carries none, only the file has them."""
    plan = _plan(tmp_path, environ={"RLRT_ROLLOUT__PORT": "9", "RLRT_TRAINER__LR": "3e-4"})
    for spec in (plan.service("rollout", None), plan.trainer(None)):
        assert "RLRT_ROLLOUT__PORT" not in spec.env and "RLRT_TRAINER__LR" not in spec.env
    assert plan.cfg["rollout"].port == 18001
    assert plan.resume_command == (f"rlrt train --config {tmp_path / 'c.yaml'} "
                                   "--set trainer.lr=1e-5 --resume")


@pytest.mark.parametrize("services", [("verifier", "rollout", "teacher"), ("verifier", "rollout")])
def test_the_trainer_pushes_to_the_engine_services_that_run(tmp_path: Path, services) -> None:  # noqa: ANN001
    plan = _plan(tmp_path, services)
    pushed = [(s.name, s.url) for s in plan.cfg["trainer"].push.services]
    assert pushed == [(n, plan.url(n)) for n in ("rollout", "teacher") if n in services]
    # the CPU engines serve the trainer's model unless told otherwise
    assert plan.cfg["rollout"].engine.model_path == str(tmp_path / "model")


def test_planning_starts_and_writes_nothing(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    plan.service("rollout", None), plan.trainer(None)  # noqa: B018
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("preset, teacher", [("grpo", False), ("dr_grpo", False), ("rlrt", True)])
def test_a_preset_that_never_scores_runs_no_teacher(tmp_path: Path, preset: str, teacher: bool) -> None:
    """No teacher service, no weight push to it, and the trainer reads the verifier's groups."""
    from protocol.topology import SERVICES, trainer_input

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": "m", "trainer": {"algorithm": {"preset": preset}}}))
    cfg = RunConfig.load(cfg_path, environ={})
    services = needed_services(cfg, SERVICES)
    assert ("teacher" in services) is teacher
    assert needed_services(cfg, ("verifier", "rollout")) == ("verifier", "rollout")  # rlrt eval
    ports = dict.fromkeys(services, 1)
    wired = RunConfig.load(cfg_path, overrides=wiring(cfg, services, ports, Path("m")), environ={})
    assert wired.trainer.teacher_service is teacher
    assert [s.name for s in wired.trainer.push.services] == ["rollout", "teacher"][:1 + teacher]
    assert trainer_input(teacher)[0] == ("scored" if teacher else "verified")


def test_a_preset_that_scores_refuses_to_run_without_a_teacher(tmp_path: Path) -> None:
    from protocol.config import ConfigError

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": "m", "trainer": {
        "algorithm": {"preset": "rlrt"}, "teacher_service": False}}))
    with pytest.raises(ConfigError, match="needs teacher scores"):
        RunConfig.load(cfg_path, environ={})


def test_grpo_with_teacher_version_match_s_keeps_its_teacher(tmp_path: Path) -> None:
    """match_s sends re-score requests that only a teacher answers: that grpo run keeps one,
    and a config that turns the teacher off for it is refused."""
    from protocol.config import ConfigError
    from protocol.topology import SERVICES

    alg = {"preset": "grpo", "teacher_version": "match_s"}
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": "m", "trainer": {"algorithm": alg}}))
    assert "teacher" in needed_services(RunConfig.load(cfg_path, environ={}), SERVICES)
    cfg_path.write_text(yaml.safe_dump({"model": "m", "trainer": {
        "algorithm": alg, "teacher_service": False}}))
    with pytest.raises(ConfigError, match="re-score requests need a teacher"):
        RunConfig.load(cfg_path, environ={})


def test_the_verifiers_group_is_what_the_trainer_takes_without_a_teacher() -> None:
    """A VerifiedGroup off the wire becomes the ScoredGroup a teacher with nothing to score
    would have published: no teacher entry, every token counted as skipped."""
    import numpy as np
    from support.groups import scored_group

    from protocol.codec import decode, encode
    from protocol.messages import ScoredGroup, VerifiedGroup, derive_id

    g = scored_group([1.0, 0.0, 1.0], rng=np.random.default_rng(0))
    verified = decode(encode(VerifiedGroup.model_validate(
        {k: v for k, v in dict(g).items() if k in VerifiedGroup.model_fields})), VerifiedGroup)
    scored = decode(encode(ScoredGroup.unscored(verified)), ScoredGroup)
    assert scored.teacher == [None] * 3 and scored.teacher_version is None
    assert scored.scored_tokens == 0
    assert scored.skipped_tokens == sum(len(r.token_ids) for r in g.responses)
    assert scored.rewards == [1.0, 0.0, 1.0] and scored.task.group_id == g.task.group_id
    assert scored.msg_id == derive_id(verified.msg_id, "scored")

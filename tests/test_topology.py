"""The pipeline table (protocol/topology.py) and the one place stream names are set
(bus.streams): the configs read the table, a renamed stream reaches a real service, and the
per-service stream keys of earlier versions are refused with the way to do it now."""

from __future__ import annotations

import pytest
from support.fake_engines import Fake
from support.services import running, take

from protocol.bus import Bus
from protocol.config import BusSettings, ConfigError
from protocol.messages import PromptTask, RolloutGroup
from protocol.topology import ENGINE_STAGES, SERVICES, STAGES, STREAMS
from rlrt.config import load_section
from rlrt.processes import free_port
from services.engines.config import EngineConfig
from services.rollout.config import RolloutConfig
from services.rollout.main import serve_rollout
from services.teacher.config import TeacherConfig
from services.verifier.config import VerifierConfig

CONFIGS = {"rollout": RolloutConfig, "verifier": VerifierConfig, "teacher": TeacherConfig}


def test_the_table_is_a_closed_chain() -> None:
    """Each stage consumes what exactly one other stage produces, on that stage's stream."""
    for s in STAGES.values():
        (nxt,) = [t for t in STAGES.values() if t.in_stream == s.out_stream]
        assert nxt.consumes is s.produces, s.name
    assert {s.in_stream for s in STAGES.values()} == set(STREAMS)
    assert set(SERVICES) == {n for n, s in STAGES.items() if s.port is not None}
    assert ENGINE_STAGES == ("rollout", "teacher")


@pytest.mark.parametrize("name", SERVICES)
def test_service_configs_read_their_row(name: str) -> None:
    cfg, row = CONFIGS[name](), STAGES[name]
    assert (cfg.port, cfg.group, cfg.in_stream, cfg.out_stream) == (
        row.port, row.group, row.in_stream, row.out_stream)


def test_bus_streams_rename_and_refuse() -> None:
    bus = BusSettings(prefix="x", streams={"rollouts": "rollouts-v2"})
    assert bus.stream("rollouts") == "x:rollouts-v2" and bus.stream("prompts") == "x:prompts"
    assert bus.stream("eval:abc") == "x:eval:abc"  # not a pipeline stream: as given
    with pytest.raises(ValueError, match="unknown stream"):
        BusSettings(streams={"prompt": "p"})
    with pytest.raises(ValueError, match="its own non-empty name"):
        BusSettings(streams={"prompts": "rollouts"})


def test_the_old_per_service_stream_keys_are_refused(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    path = tmp_path / "run.yaml"
    path.write_text("rollout: {out_stream: my-rollouts}\n")
    with pytest.raises(ConfigError, match=r"rollout\.out_stream .*bus: \{streams: \{rollouts: my-rollouts\}\}"):
        load_section("rollout", str(path))
    path.write_text("verifier: {}\n")
    monkeypatch.setenv("RLRT_VERIFIER__IN_STREAM", "r2")
    with pytest.raises(ConfigError, match=r"verifier\.in_stream .*\{rollouts: r2\}"):
        load_section("verifier", str(path))


async def test_a_renamed_stream_reaches_the_service(redis_url: str, prefix: str, fake_sglang: Fake,
                                                   model_dir) -> None:  # noqa: ANN001
    """The rollout service consumes and publishes on the names bus.streams gives (the raw
    Redis keys below), not on its defaults."""
    from test_rollout_service import make_task

    bus_cfg = BusSettings(redis_url=redis_url, prefix=prefix, block_ms=100,
                          streams={"prompts": "my-prompts", "rollouts": "my-rollouts"})
    cfg = RolloutConfig(port=free_port(), token="tok", consumer="r1", concurrency=2,
                        engine=EngineConfig(kind="sglang", url=fake_sglang.url,
                                            model_path=str(model_dir), flush_interval_s=0.01))
    bus = Bus.from_url(redis_url, bus_cfg)
    try:
        async with running(lambda s: serve_rollout(cfg, bus_cfg, s), f"http://127.0.0.1:{cfg.port}"):
            task: PromptTask = make_task(model_dir)
            await bus.publish(f"{prefix}:my-prompts", task)
            (group,) = await take(bus, f"{prefix}:my-rollouts", RolloutGroup)
            assert group.parent_id == task.msg_id
            assert not await bus.r.exists(f"{prefix}:prompts", f"{prefix}:rollouts")
    finally:
        await bus.close()

"""The rollout service end to end: real Redis, real uvicorn, the fake SGLang server (and once
the built-in CPU engine), PromptTask in -> RolloutGroup out, control API in between."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from support.fake_engines import Fake
from support.reference_logprobs import token_logprobs
from support.services import running, take
from support.tiny_model import CONTEXT_LEN
from transformers import AutoTokenizer

from protocol.bus import Bus
from protocol.config import BusSettings
from protocol.messages import PromptTask, RolloutGroup, SamplingParams, derive_id
from rlrt.processes import free_port
from services.engines.config import EngineConfig
from services.rollout.config import RolloutConfig
from services.rollout.main import serve_rollout

TOKEN = "tok"


def make_task(model_dir, question: str = "What is 2+3?", **kw) -> PromptTask:  # noqa: ANN001
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                  add_generation_prompt=True, return_dict=False)
    fields = dict(run_id="r", prompt_id="p1", prompt_text=question, prompt_ids=np.asarray(ids),
                  answer="5", group_size=3, sampling=SamplingParams(max_new_tokens=6, seed=5))
    fields.update(kw)
    return PromptTask(**fields)


def settings(redis_url: str, prefix: str, engine: EngineConfig) -> tuple[RolloutConfig, BusSettings]:
    bus_cfg = BusSettings(redis_url=redis_url, prefix=prefix, max_deliveries=2,
                          retry_backoff_s=0.01, block_ms=100)
    cfg = RolloutConfig(port=free_port(), token=TOKEN, engine=engine, consumer="r1", concurrency=2)
    return cfg, bus_cfg


def sglang_engine(fake: Fake, model_dir, **kw) -> EngineConfig:  # noqa: ANN001
    return EngineConfig(kind="sglang", url=fake.url, model_path=str(model_dir),
                        flush_interval_s=0.01, **kw)


async def test_prompt_to_rollout_group_and_weight_update(redis_url: str, prefix: str,
                                                         fake_sglang: Fake, model_dir,  # noqa: ANN001
                                                         weights_v1) -> None:  # noqa: ANN001
    cfg, bus_cfg = settings(redis_url, prefix, sglang_engine(fake_sglang, model_dir))
    url = f"http://127.0.0.1:{cfg.port}"
    bus = Bus.from_url(redis_url, bus_cfg)
    try:
        async with running(lambda s: serve_rollout(cfg, bus_cfg, s), url):
            task = make_task(model_dir)
            await bus.publish(bus_cfg.stream("prompts"), task)
            (group,) = await take(bus, bus_cfg.stream("rollouts"), RolloutGroup)
            assert group.msg_id == derive_id(task.msg_id, "rollout") and group.parent_id == task.msg_id
            assert group.engine_version == 0 and group.task.prompt_id == "p1"
            assert len(group.responses) == 3
            prompt = task.prompt_ids.tolist()
            for r in group.responses:
                ref = token_logprobs(str(model_dir), prompt + r.token_ids.tolist())[len(prompt) - 1:]
                np.testing.assert_allclose(r.logprobs, ref, atol=1e-4)

            async with httpx.AsyncClient(base_url=url, timeout=60,
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as c:
                r = await c.post("/v1/weights", json={"version": 1, "location": weights_v1.path,
                                                      "sha256": weights_v1.sha256})
                assert r.status_code == 200, r.text
            task2 = make_task(model_dir, prompt_id="p2")
            await bus.publish(bus_cfg.stream("prompts"), task2)
            (group2,) = await take(bus, bus_cfg.stream("rollouts"), RolloutGroup)
            assert group2.engine_version == 1
            r0 = group2.responses[0]
            ref = token_logprobs(weights_v1.path, prompt + r0.token_ids.tolist())[len(prompt) - 1:]
            np.testing.assert_allclose(r0.logprobs, ref, atol=1e-4)
    finally:
        await bus.close()


async def test_poison_tasks_are_dead_lettered_and_service_stays_up(
        redis_url: str, prefix: str, fake_sglang: Fake, model_dir) -> None:  # noqa: ANN001
    cfg, bus_cfg = settings(redis_url, prefix, sglang_engine(fake_sglang, model_dir,
                                                             request_timeout_s=1.5))
    url = f"http://127.0.0.1:{cfg.port}"
    bus = Bus.from_url(redis_url, bus_cfg)
    prompts = bus_cfg.stream("prompts")
    try:
        async with running(lambda s: serve_rollout(cfg, bus_cfg, s), url):
            good = make_task(model_dir)
            bad = [make_task(model_dir, prompt_ids=np.asarray([], dtype=np.int32), prompt_id="empty"),
                   make_task(model_dir, prompt_ids=np.asarray([5, 99_999]), prompt_id="oov"),
                   make_task(model_dir, prompt_ids=np.full(CONTEXT_LEN + 10, 5), prompt_id="long")]
            for t in bad:
                await bus.publish(prompts, t)
            # an engine that times out: retried, then dead-lettered too
            fake_sglang.config(mode="hang")
            await bus.publish(prompts, make_task(model_dir, prompt_id="timeout"))
            while len(await bus.dead_letters(prompts)) < 4:  # wait for the verdicts
                await asyncio.sleep(0.05)
            fake_sglang.config(mode="ok")
            await bus.publish(prompts, good)
            (group,) = await take(bus, bus_cfg.stream("rollouts"), RolloutGroup)
            assert group.task.prompt_id == "p1"
            dead = await bus.dead_letters(prompts)
            errors = sorted(d["error"] for d in dead)
            assert any("empty" in e for e in errors)
            assert any("outside the vocabulary" in e for e in errors)
            assert any("context window" in e for e in errors)
            assert any("no answer within" in e for e in errors)
            async with httpx.AsyncClient(base_url=url) as c:
                assert (await c.get("/readyz")).status_code == 200
    finally:
        fake_sglang.config(mode="ok")
        await bus.close()


async def test_cpu_engine_rollout(redis_url: str, prefix: str, model_dir) -> None:  # noqa: ANN001
    cfg, bus_cfg = settings(redis_url, prefix, EngineConfig(kind="cpu", model_path=str(model_dir),
                                                            cpu={"num_threads": 1}))
    url = f"http://127.0.0.1:{cfg.port}"
    bus = Bus.from_url(redis_url, bus_cfg)
    try:
        async with running(lambda s: serve_rollout(cfg, bus_cfg, s), url):
            task = make_task(model_dir, group_size=2)
            await bus.publish(bus_cfg.stream("prompts"), task)
            (group,) = await take(bus, bus_cfg.stream("rollouts"), RolloutGroup)
    finally:
        await bus.close()
    assert len(group.responses) == 2 and group.engine_version == 0
    assert all(1 <= len(r.token_ids) <= 6 for r in group.responses)


def test_config_from_env_needs_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from protocol.config import ConfigError

    monkeypatch.setenv("RLRT_ROLLOUT__ENGINE__KIND", "sglang")
    with pytest.raises(ConfigError, match="needs engine.url"):
        RolloutConfig.load(None)
    monkeypatch.setenv("RLRT_ROLLOUT__ENGINE__URL", "http://127.0.0.1:30000")
    cfg = RolloutConfig.load(None)
    assert cfg.engine.kind == "sglang" and cfg.engine.url == "http://127.0.0.1:30000"

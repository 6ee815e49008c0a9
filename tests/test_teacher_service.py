"""The teacher service end to end: real Redis, real uvicorn, the fake vLLM server (and once the
built-in CPU engine), VerifiedGroup in -> ScoredGroup out, only what the contract asks scored."""

from __future__ import annotations

import httpx
import numpy as np
from support.fake_engines import Fake
from support.groups import verified_group
from support.reference_logprobs import token_logprobs
from support.services import running, take
from support.tiny_model import CONTEXT_LEN
from transformers import AutoTokenizer

from protocol.bus import Bus
from protocol.config import BusSettings
from protocol.messages import (
    ScoredGroup,
    VerifiedGroup,
    derive_id,
)
from rlrt.processes import free_port
from services.engines.config import EngineConfig
from services.teacher.config import TeacherConfig
from services.teacher.main import serve_teacher
from tasks.teacher import teacher_context_for_group

TOKEN = "tok"


def settings(redis_url: str, prefix: str, engine: EngineConfig) -> tuple[TeacherConfig, BusSettings]:
    bus_cfg = BusSettings(redis_url=redis_url, prefix=prefix, max_deliveries=2,
                          retry_backoff_s=0.01, block_ms=100)
    return TeacherConfig(port=free_port(), token=TOKEN, engine=engine, consumer="t1"), bus_cfg


def expected(model_path: str, group: VerifiedGroup, i: int, tok) -> np.ndarray:  # noqa: ANN001
    ctx = teacher_context_for_group(group, i, tok)
    assert ctx is not None
    return np.asarray(token_logprobs(model_path, ctx.input_ids)[ctx.response_start - 1:])


async def test_scores_only_what_the_contract_asks(redis_url: str, prefix: str, fake_vllm: Fake,
                                                  model_dir, weights_v1) -> None:  # noqa: ANN001
    engine = EngineConfig(kind="vllm", url=fake_vllm.url, model_path=str(model_dir))
    cfg, bus_cfg = settings(redis_url, prefix, engine)
    url = f"http://127.0.0.1:{cfg.port}"
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    bus = Bus.from_url(redis_url, bus_cfg)
    inp, out = bus_cfg.stream("verified"), bus_cfg.stream("scored")
    mixed = verified_group(model_dir, ["The answer is 5", "I think 5", "It is 7", "no idea"],
                           [True, True, False, False])
    try:
        async with running(lambda s: serve_teacher(cfg, bus_cfg, s), url):
            await bus.publish(inp, mixed)
            (sg,) = await take(bus, out, ScoredGroup)
            assert sg.msg_id == derive_id(mixed.msg_id, "scored")
            assert [t is not None for t in sg.teacher] == [True, True, False, False]
            for i in (0, 1):
                np.testing.assert_allclose(sg.teacher[i].logprobs, expected(str(model_dir), mixed, i, tok),
                                           atol=1e-4)
                assert sg.teacher[i].context_mode == "sibling" and sg.teacher[i].demo_index == 1 - i
            lens = [len(r.token_ids) for r in mixed.responses]
            assert sg.scored_tokens == lens[0] + lens[1] and sg.skipped_tokens == lens[2] + lens[3]
            assert sg.teacher_version == 0
            # nothing to score: all correct (A = 0), or a preset without teacher: no engine call
            n_calls = len(fake_vllm.calls("/v1/completions"))
            for g in (verified_group(model_dir, ["5", "5 it is"], [True, True], group_id="g2"),
                      verified_group(model_dir, ["5", "7"], [True, False], scope="none", group_id="g3")):
                await bus.publish(inp, g)
                (sg2,) = await take(bus, out, ScoredGroup)
                assert sg2.teacher == [None, None] and sg2.teacher_version is None
                assert sg2.scored_tokens == 0 and sg2.skipped_tokens == sum(len(r.token_ids) for r in g.responses)
            assert len(fake_vllm.calls("/v1/completions")) == n_calls

            # after a weight push the scores come from the new weights, stamped with the version
            async with httpx.AsyncClient(base_url=url, timeout=60,
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as c:
                r = await c.post("/v1/weights", json={"version": 1, "location": weights_v1.path,
                                                      "sha256": weights_v1.sha256})
                assert r.status_code == 200, r.text
            again = verified_group(model_dir, ["The answer is 5", "I think 5", "It is 7", "no idea"],
                                   [True, True, False, False], group_id="g4")
            await bus.publish(inp, again)
            (sg3,) = await take(bus, out, ScoredGroup)
            assert sg3.teacher_version == 1
            np.testing.assert_allclose(sg3.teacher[0].logprobs, expected(weights_v1.path, again, 0, tok),
                                       atol=1e-4)
    finally:
        await bus.close()


async def test_too_long_context_is_left_unscored(redis_url: str, prefix: str, fake_vllm: Fake,
                                                 model_dir) -> None:  # noqa: ANN001
    cfg, bus_cfg = settings(redis_url, prefix,
                            EngineConfig(kind="vllm", url=fake_vllm.url, model_path=str(model_dir)))
    url = f"http://127.0.0.1:{cfg.port}"
    bus = Bus.from_url(redis_url, bus_cfg)
    # The teacher context is question + reference solution + the response: the long response
    # overflows the context window, the short one fits. The group must still go through.
    group = verified_group(model_dir, ["5 " * (CONTEXT_LEN // 2), "5", "7"], [True, True, False],
                           context_mode="reference_solution")
    try:
        async with running(lambda s: serve_teacher(cfg, bus_cfg, s), url):
            await bus.publish(bus_cfg.stream("verified"), group)
            (sg,) = await take(bus, bus_cfg.stream("scored"), ScoredGroup)
    finally:
        await bus.close()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    fits = [len(teacher_context_for_group(group, i, tok).input_ids) < CONTEXT_LEN for i in (0, 1)]
    assert fits == [False, True]  # the case this test is about
    assert [t is not None for t in sg.teacher] == [False, True, False]
    assert sg.teacher[1].context_mode == "reference_solution"
    np.testing.assert_allclose(sg.teacher[1].logprobs, expected(str(model_dir), group, 1, tok), atol=1e-4)
    assert sg.scored_tokens == len(group.responses[1].token_ids)


async def test_cpu_engine_teacher(redis_url: str, prefix: str, model_dir) -> None:  # noqa: ANN001
    cfg, bus_cfg = settings(redis_url, prefix, EngineConfig(kind="cpu", model_path=str(model_dir),
                                                            cpu={"num_threads": 1}))
    url = f"http://127.0.0.1:{cfg.port}"
    bus = Bus.from_url(redis_url, bus_cfg)
    group = verified_group(model_dir, ["The answer is 5", "I think 5", "no"], [True, True, False])
    try:
        async with running(lambda s: serve_teacher(cfg, bus_cfg, s), url):
            await bus.publish(bus_cfg.stream("verified"), group)
            (sg,) = await take(bus, bus_cfg.stream("scored"), ScoredGroup)
    finally:
        await bus.close()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    np.testing.assert_allclose(sg.teacher[1].logprobs, expected(str(model_dir), group, 1, tok), atol=1e-4)
    assert sg.teacher[2] is None and sg.teacher_version == 0

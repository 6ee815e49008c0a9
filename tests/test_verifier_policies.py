"""Extraction policies (tasks.math.POLICIES) on real math-verify: several boxed answers as a
set, references that are worked solutions, the `boxed` / `math_verify` / `dapo` policies, and
the policy chosen by the config (per data source) or the REST request reaching the checker --
through the real `rlrt serve verifier` process and the bus, with the reward plug-ins on."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from support.verifier_live import VerifierProcess, live_verifier

from protocol.bus import Bus
from protocol.config import BusSettings
from protocol.messages import PromptTask, Response, RolloutGroup, VerifiedGroup
from services.verifier.config import VerifierConfig
from services.verifier.extract import MAX_JOINED, boxed_answers
from services.verifier.mathcheck import check_math
from services.verifier.pool import VerifyPool

B = r"\boxed"

# (response, reference, correct): several boxes that answer one problem are one set answer.
SEVERAL: list[tuple[str, str, bool]] = [
    (rf"{B}{{1}} and {B}{{2}} and {B}{{3}}", r"\{1,2,3\}", True),
    (rf"{B}{{1}},{B}{{2}},{B}{{3}}", r"\{3,2,1\}", True),
    (rf"$$ {B}{{(2, 2)}} \quad \text{{and}} \quad {B}{{(6, 2)}} $$", "(6,2),(2,2)", True),
    (rf"\( y_1 = {B}{{3}} \) and \( y_2 = {B}{{5}} \)", "3, 5", True),
    (rf"{B}{{1}} for part (a) and {B}{{2}}", "1, 2", True),
    (rf"{B}{{-2}} \quad \text{{and}} \quad {B}{{1}}.", r"n = \boxed{1,-2}", True),  # gold boxed too
    (rf"{B}{{1}} and {B}{{2}}", r"\{1,2,3\}", False),  # a missing solution
    (rf"{B}{{1}}, {B}{{2}}, {B}{{3}}", "2", False),  # listing candidates is not answering
    # a later box after prose that is no conjunction supersedes the earlier one
    (rf"First {B}{{3}}, no wait, {B}{{5}}", "5", True),
    (rf"First {B}{{3}}, no wait, {B}{{5}}", "3, 5", False),
    (rf"{B}{{3}} or maybe {B}{{5}}", "3, 5", False),
    (rf"{B}{{3}} Wait, {B}{{5}}", "5", True),
    (rf"{B}{{3}} wait, {B}{{5}}", "3, 5", False),
    (rf"{B}{{1}} no no no no no {B}{{2}}", "2", True),
]


@pytest.mark.parametrize(("response", "reference", "expected"), SEVERAL)
def test_several_boxes_are_one_set_answer(response: str, reference: str, expected: bool) -> None:
    r = check_math(response, reference)
    assert r.correct is expected, (r.detail, r.parsed_response, r.parsed_reference)


def test_joined_boxes_are_reported() -> None:
    assert boxed_answers(rf"so {B}{{1}} and {B}{{2}}.")[0] == ["1", "2"]
    assert boxed_answers(rf"{B}{{1}}{B}{{2}}")[0] == ["1", "2"]
    assert boxed_answers(rf"{B}{{1}}. Then {B}{{2}}")[0] == ["2"]
    assert boxed_answers("none") == ([], -1)
    many = ", ".join(rf"{B}{{{i}}}" for i in range(100))
    assert boxed_answers(many)[0] == [str(i) for i in range(100 - MAX_JOINED, 100)]
    r = check_math(rf"{B}{{1}} and {B}{{2}}", "1, 2")
    assert (r.correct, r.detail, r.parsed_response) == (True, "boxed x2", "1 and 2")


def test_a_worked_solution_is_graded_by_its_last_box() -> None:
    solution = (r"Setting $x = 0$ gives $f(0) = \boxed{-1}$ (a step). " + "We go on. " * 150
                + r"so the solutions are $n = \boxed{1,-2}.$")
    assert len(solution) > 1024  # longer than an answer may be: only its answer is parsed
    assert check_math(rf"{B}{{-2}} and {B}{{1}}", solution).correct
    assert not check_math(rf"{B}{{-1}}", solution).correct
    # no box: math-verify's own reading of a solution ("The final answer is ... I hope")
    prose = "Long working. " * 100 + "Final Answer: The final answer is $28 \\%$. I hope it is correct."
    assert check_math(rf"{B}{{28\%}}", prose).correct
    assert not check_math(rf"{B}{{72\%}}", prose).correct


def test_a_final_answer_after_the_boxes_is_the_answer() -> None:
    steps = rf"interest {B}{{200}}, then {B}{{255}}; in all $10,455. "
    r = check_math(steps + "Final Answer: The final answer is $10,455$. I hope it is correct.", "10455")
    assert (r.correct, r.detail) == (True, "final_answer_line")
    # prose that merely mentions "answer" after the box does not override it
    assert check_math(rf"{B}{{12}} is the answer to this.", "12").correct
    # a final-answer line with nothing parseable leaves the box in charge
    assert check_math(rf"{B}{{12}} That is my final answer!", "12").correct


RESPONSES = [
    "First 5+7 = 12, so the total is \\boxed{12}.",  # boxed
    "5+7 = 12, so the total is 12.\nAnswer: 12",  # DAPO's last line
    "Adding them, the total comes to 12 apples.",  # free-form
]
VERDICTS = {"boxed": [True, True, False], "math_verify": [True, True, True],
            "dapo": [False, True, False]}


@pytest.mark.parametrize("policy", sorted(VERDICTS))
def test_each_policy_reads_its_own_format(policy: str) -> None:
    got = [check_math(r, "12", policy) for r in RESPONSES]
    assert [r.correct for r in got] == VERDICTS[policy], [r.detail for r in got]
    missing = [r for r, want in zip(got, VERDICTS[policy], strict=True) if not want]
    assert all(r.status == "parse_error" and "no final answer" in r.detail for r in missing)


def test_dapo_takes_the_last_answer_line_at_the_end() -> None:
    assert check_math("Answer: 3\nwait\nAnswer: $\\frac{1}{2}$", "0.5", "dapo").correct
    assert not check_math("Answer: 3\nwait\nAnswer: 4", "3", "dapo").correct
    # an "Answer:" line far from the end is not the final answer (verl's math_dapo: last 300 chars)
    far = check_math("Answer: 7\n" + "more working " * 40, "7", "dapo")
    assert (far.correct, far.status) == (False, "parse_error")


def test_unknown_policy_is_a_callers_bug() -> None:
    with pytest.raises(ValueError, match="unknown extraction policy"):
        check_math(rf"{B}{{1}}", "1", "lenient")


def test_config_picks_the_policy_per_data_source() -> None:
    cfg = VerifierConfig(math_policy="dapo", math_policy_by_source={"numina": "math_verify"})
    assert cfg.math_policy_for("math") == "dapo"
    assert cfg.math_policy_for("math", {"data_source": "numina"}) == "math_verify"
    assert cfg.math_policy_for("math", {"data_source": "other"}) == "dapo"
    assert cfg.math_policy_for("math", {"data_source": "numina"}, "boxed") == "boxed"
    assert cfg.math_policy_for("countdown", {"data_source": "numina"}) is None
    assert VerifierConfig().math_policy == "boxed"
    with pytest.raises(ValueError):
        VerifierConfig(math_policy="lenient")


# ------------------------------------------------------------------------------ REST API
@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    cfg = VerifierConfig(workers=1, math_policy="dapo", math_policy_by_source={"numina": "math_verify"},
                         consumer=f"pol-{uuid.uuid4().hex[:6]}")
    with VerifyPool(1, kill_grace_s=0.3) as pool, live_verifier(cfg, pool) as live, \
            httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def test_rest_request_picks_the_policy(client: httpx.Client) -> None:
    def correct(**kw: object) -> list[bool]:
        items = [{"response": r, "reference": "12", **kw} for r in RESPONSES]
        r = client.post("/v1/verify/batch", json={"items": items})
        assert r.status_code == 200, r.text
        return [x["correct"] for x in r.json()["results"]]

    assert correct() == VERDICTS["dapo"]  # the config's math_policy
    assert correct(row={"data_source": "numina"}) == VERDICTS["math_verify"]  # by source
    for policy, verdicts in VERDICTS.items():
        assert correct(policy=policy) == verdicts
        assert correct(policy=policy, row={"data_source": "numina"}) == verdicts  # request wins


def test_rest_refuses_a_policy_it_cannot_apply(client: httpx.Client) -> None:
    bad = client.post("/v1/verify", json={"response": "x", "reference": "1", "policy": "lenient"})
    assert bad.status_code == 422
    other = client.post("/v1/verify", json={"response": "Answer: 24", "reference": "numbers=3,8;target=24",
                                            "task": "countdown", "policy": "dapo"})
    assert other.status_code == 422 and "policy applies to task 'math' only" in other.text


# ------------------------------------------------ end to end: config -> service -> bus -> trainer
def group(i: int, source: str | None) -> RolloutGroup:
    responses = [Response(token_ids=np.arange(3, dtype=np.int32), logprobs=np.full(3, -0.5, np.float32),
                          finish_reason="stop", text=t) for t in RESPONSES]
    prompt = PromptTask(run_id="r", prompt_id=f"p{i}", prompt_text="5 + 7 apples?", prompt_ids=[1, 2, 3],
                        answer="12", task="math", group_size=len(RESPONSES),
                        meta={"fields": {"data_source": source}} if source else {})
    return RolloutGroup(run_id="r", task=prompt, responses=responses, engine_version=1, parent_id=prompt.msg_id)


def test_policy_from_the_config_reaches_the_bus_workers_verdicts(tmp_path: Path, redis_url: str,
                                                                 prefix: str) -> None:
    """`rlrt serve verifier` with `verifier.math_policy` and `math_policy_by_source` in its
    config, and the reward plug-ins on (`reward: {fn: task}`, the path the RLRT gate and the
    rewards of a run take): each group's `correct` flags and rewards follow its data source's
    policy."""
    proc = VerifierProcess(tmp_path, redis_url, prefix, workers=1, math_policy="dapo",
                           math_policy_by_source={"numina": "math_verify", "math500": "boxed"})
    config = yaml.safe_load(proc.config.read_text())
    proc.config.write_text(yaml.safe_dump({**config, "reward": {"fn": "task"}}))
    proc.start()
    try:
        got = asyncio.run(_round_trip(redis_url, prefix, {"dapo": None, "math_verify": "numina",
                                                          "boxed": "math500"}))
    finally:
        proc.kill()
    for policy, verified in got.items():
        assert [v.correct for v in verified.verifications] == VERDICTS[policy], policy
        assert [v.reward for v in verified.verifications] == [float(c) for c in VERDICTS[policy]]


async def _round_trip(redis_url: str, prefix: str, sources: dict[str, str | None]) -> dict[str, VerifiedGroup]:
    bus = Bus.from_url(redis_url, BusSettings(prefix=prefix, block_ms=50))
    sent = {policy: group(i, source) for i, (policy, source) in enumerate(sources.items())}
    by_prompt = {g.task.prompt_id: policy for policy, g in sent.items()}
    got: dict[str, VerifiedGroup] = {}

    async def keep(m: VerifiedGroup) -> None:
        got[by_prompt[m.task.prompt_id]] = m

    try:
        for g in sent.values():
            await bus.publish(f"{prefix}:rollouts", g)
        await asyncio.wait_for(bus.consume(f"{prefix}:verified", "trainer", "t", keep, VerifiedGroup,
                                           asyncio.Event(), max_messages=len(sent)), timeout=120)
    finally:
        await bus.close()
    return got

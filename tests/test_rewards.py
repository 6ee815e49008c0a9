"""Reward plug-ins (tasks/rewards.py): a user's module written to a temporary directory,
imported by dotted path, run inside the verifier's real pool workers (deadline, kill), its
failures dead-lettered with the traceback on a real Redis, and its non-binary rewards carried
into the trainer's batch and advantages."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from protocol.bus import Bus
from protocol.config import BusSettings, ConfigError
from protocol.messages import PromptTask, Response, RolloutGroup, ScoredGroup, VerifiedGroup
from services.verifier import worker
from services.verifier.pool import Item, VerifyPool
from tasks.base import CheckResult
from tasks.rewards import (
    RewardFnError,
    RewardSettings,
    as_reward,
    load_fn,
    locate,
    prompt_row,
    score,
)

USER_MODULE = '''
import time


def shortness(response, reference, row):
    """Partial credit: 1 for an empty response, 0 from 100 characters on."""
    return max(0.0, 1.0 - len(response) / 100)


def exact(response, reference, row):
    ok = response.strip() == reference.strip()
    return {"reward": 1.0 if ok else 0.25, "correct": ok}


def from_row(response, reference, row):
    return float(row["difficulty"]) * (1.0 if row["prompt_id"] in response else 0.5)


def broken(response, reference, row):
    if "boom" in response:
        return {"a": 1}["missing_key_in_user_code"]
    return 0.5


def not_a_number(response, reference, row):
    return "high"


def sleepy(response, reference, row):
    time.sleep(60)
    return 1.0


def stubborn(response, reference, row):
    # Swallows the in-worker deadline: only the parent's kill can stop it.
    while True:
        try:
            time.sleep(60)
        except BaseException:
            pass
'''


@pytest.fixture(scope="module")
def user_pkg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A user's package `<name>/rewards.py` in a fresh directory: (directory, package name)."""
    root = tmp_path_factory.mktemp("userproj")
    name = f"userpkg_{uuid.uuid4().hex[:8]}"
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("")
    (root / name / "rewards.py").write_text(textwrap.dedent(USER_MODULE))
    # a module whose import is slow (a big library): the service imports it before any deadline
    (root / name / "slow.py").write_text("import time\n\ntime.sleep(2.0)\n\n\n"
                                         "def score(response, reference, row):\n    return 0.25\n")
    return root, name


@pytest.fixture(scope="module")
def user_pool(user_pkg: tuple[Path, str]) -> Iterator[VerifyPool]:
    """Real worker processes. `spawn` so the workers see the user's directory on sys.path
    (the session's forkserver, if another test started it, has an older sys.path; the
    service itself starts its own forkserver after PYTHONPATH is set: see the CLI test)."""
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(user_pkg[0]))
    with VerifyPool(1, kill_grace_s=0.3, start_method="spawn") as p:
        yield p
    mp.undo()


def spec(**kw: object) -> tuple:
    s = RewardSettings(**kw).spec()
    assert s is not None
    return s


# --------------------------------------------------------------------------- config and maths


def test_settings_forms_and_errors() -> None:
    assert not RewardSettings().enabled and RewardSettings().spec() is None
    assert RewardSettings(fn="a.b:c").spec() == ((("a.b:c", 1.0),), "flags", 1.0)
    s = RewardSettings(fns=[{"fn": "task"}, {"fn": "x.py:f", "weight": 0.1}], correct_by="threshold",
                       correct_threshold=0.5)
    assert s.spec() == ((("task", 1.0), ("x.py:f", 0.1)), "threshold", 0.5)
    for bad in ({"fn": "nocolon"}, {"fn": "a:b", "fns": [{"fn": "c:d"}]}, {"fns": [{"fn": ":f"}]},
                {"fns": [{"fn": "a:b", "wieght": 1}]}):
        with pytest.raises(ValueError):
            RewardSettings(**bad)


def test_section_is_read_from_the_run_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("reward:\n  fn: mypkg.rewards:score\n  correct_threshold: 0.8\n")
    s = RewardSettings.load(cfg)
    assert s.spec() == ((("mypkg.rewards:score", 1.0),), "flags", 0.8)
    cfg.write_text("reward:\n  fn: not-a-path\n")
    with pytest.raises(ConfigError, match="reward.fn"):
        RewardSettings.load(cfg)


def test_return_forms() -> None:
    assert as_reward(0.3) == (0.3, None)
    assert as_reward(True) == (1.0, None)
    assert as_reward(np.float32(0.5)) == (0.5, None)
    assert as_reward((0.7, True)) == (0.7, True)
    assert as_reward({"reward": 2, "correct": np.bool_(False)}) == (2.0, False)
    assert as_reward(CheckResult(correct=True, reward=1.0)) == (1.0, True)
    for bad in ("1.0", None, float("nan"), (1.0,), {"score": 1}, {"reward": 1, "correct": "yes"}):
        with pytest.raises((TypeError, ValueError)):
            as_reward(bad)


def test_weighted_sum_and_the_correct_gate(user_pkg: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    root, name = user_pkg
    monkeypatch.syspath_prepend(str(root))
    right = CheckResult(correct=True, reward=1.0, detail="boxed")
    wrong = CheckResult(correct=False, reward=0.0, status="parse_error", detail="no answer")
    fns = [{"fn": "task"}, {"fn": f"{name}.rewards:shortness", "weight": 0.1}]
    # flags: the task checker's verdict gates, the format term only adds to the reward
    r = score(spec(fns=fns), "x" * 40, "ref", {}, lambda: right)
    assert r.reward == pytest.approx(1.0 + 0.1 * 0.6) and r.correct and r.status == "ok"
    assert f"{name}.rewards:shortness=0.6" in r.detail and "task: boxed" in r.detail
    r = score(spec(fns=fns), "", "ref", {}, lambda: wrong)
    assert r.reward == pytest.approx(0.1) and not r.correct and r.status == "parse_error"
    # threshold: the summed reward decides
    r = score(spec(fns=fns, correct_by="threshold", correct_threshold=0.05), "", "ref", {}, lambda: wrong)
    assert r.correct
    # no term gives a flag: reward >= threshold
    one = spec(fn=f"{name}.rewards:shortness", correct_threshold=0.5)
    assert score(one, "x" * 40, "r", {}, lambda: right).correct
    assert not score(one, "x" * 60, "r", {}, lambda: right).correct
    # a user flag wins over the threshold under "flags"
    ex = spec(fn=f"{name}.rewards:exact", correct_threshold=0.1)
    res = score(ex, "nope", "42", {}, lambda: right)
    assert res.reward == 0.25 and not res.correct


def test_task_checker_runs_only_when_named(user_pkg: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(user_pkg[0]))

    def never() -> CheckResult:
        raise AssertionError("the task checker must not run without a 'task' term")

    assert score(spec(fn=f"{user_pkg[1]}.rewards:shortness"), "", "r", {}, never).reward == 1.0


def test_user_errors_carry_the_traceback(user_pkg: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    root, name = user_pkg
    monkeypatch.syspath_prepend(str(root))
    with pytest.raises(RewardFnError) as e:
        score(spec(fn=f"{name}.rewards:broken"), "boom", "r", {}, lambda: None)
    assert "missing_key_in_user_code" in e.value.text and "rewards.py" in e.value.text
    with pytest.raises(RewardFnError, match="not a number"):
        score(spec(fn=f"{name}.rewards:not_a_number"), "", "r", {}, lambda: None)
    with pytest.raises(RewardFnError, match="ModuleNotFoundError"):
        score(spec(fn="no_such_pkg_xyz.mod:f"), "", "r", {}, lambda: None)


def test_prompt_row() -> None:
    p = PromptTask(run_id="r", prompt_id="p1", prompt_text="What is 1+1?", prompt_ids=[1], answer="2",
                   solution="1+1=2", meta={"fields": {"difficulty": 3, "answer": "two"}, "row": 17, "epoch": 0})
    assert prompt_row(p) == {"difficulty": 3, "prompt_id": "p1", "prompt": "What is 1+1?", "answer": "2",
                             "solution": "1+1=2", "task": "math", "meta": {"row": 17, "epoch": 0}}


def test_file_path_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_rewards.py").write_text("def f(response, reference, row):\n    return len(response) / 10\n")
    monkeypatch.chdir(tmp_path)
    assert load_fn("my_rewards.py:f")("abc", "", {}) == pytest.approx(0.3)


def test_locate_finds_typos_without_running_user_code(user_pkg: tuple[Path, str], monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    root, name = user_pkg
    monkeypatch.chdir(root)  # found from the working directory, as `rlrt` run in a project dir
    locate(spec(fns=[{"fn": "task"}, {"fn": f"{name}.rewards:exact"}]))
    with pytest.raises(ValueError, match="module 'no_such_pkg_xyz' not found"):
        locate(spec(fn="no_such_pkg_xyz:f"))
    with pytest.raises(ValueError, match="not found"):
        locate(spec(fn=str(tmp_path / "absent.py") + ":f"))


# --------------------------------------------------------------------------- in the real pool


def items(name: str, fn: str, texts: list[str], ref: str = "1/2", timeout_s: float = 3.0,
          row: dict | None = None, task: str = "math") -> list[Item]:
    s = spec(fns=[{"fn": "task"}, {"fn": f"{name}.rewards:{fn}", "weight": 0.5}])
    return [Item(task=task, response=t, reference=ref, timeout_s=timeout_s, reward=s, row=row or {})
            for t in texts]


def test_pool_runs_user_functions_with_math_verify(user_pool: VerifyPool, user_pkg: tuple[Path, str]) -> None:
    name = user_pkg[1]
    texts = [r"\boxed{0.5}", r"\boxed{3}", "x" * 200]
    got = user_pool.run_sync(items(name, "shortness", texts))
    assert [v.reward for v in got] == pytest.approx([1.0 + 0.5 * (1 - len(texts[0]) / 100),
                                                     0.5 * (1 - len(texts[1]) / 100), 0.0])
    assert [v.correct for v in got] == [True, False, False]
    assert [v.status for v in got] == ["ok", "ok", "parse_error"]
    assert all(v.reward_error is None for v in got)
    # the row reaches the function
    s = spec(fn=f"{name}.rewards:from_row")
    got = user_pool.run_sync([Item(task="math", response=t, reference="1", timeout_s=3.0, reward=s,
                              row={"prompt_id": "p7", "difficulty": 0.8}) for t in ("p7!", "other")])
    assert [v.reward for v in got] == pytest.approx([0.8, 0.4])


def test_pool_reports_a_failing_function_and_keeps_serving(user_pool: VerifyPool, user_pkg: tuple[Path, str]) -> None:
    got = user_pool.run_sync(items(user_pkg[1], "broken", [r"\boxed{0.5}", r"boom \boxed{0.5}", r"\boxed{0.5}"]))
    assert got[0].reward_error is None and got[0].reward == pytest.approx(1.25)
    assert got[1].status == "error" and "missing_key_in_user_code" in got[1].reward_error
    assert "Traceback" in got[1].reward_error and "broken" in got[1].detail
    assert got[2].reward_error is None and got[2].reward == pytest.approx(1.25)


def test_pool_deadline_and_kill_apply_to_user_functions(user_pool: VerifyPool, user_pkg: tuple[Path, str]) -> None:
    name = user_pkg[1]
    restarts = user_pool.stats().restarts
    soft = user_pool.run_sync(items(name, "sleepy", [r"\boxed{0.5}"], timeout_s=0.5))[0]
    assert soft.status == "timeout" and soft.reward == 0.0 and soft.reward_error is None
    assert user_pool.stats().restarts == restarts  # the in-worker timer answered; the worker lives
    hard = user_pool.run_sync(items(name, "stubborn", [r"\boxed{0.5}"], timeout_s=0.5))[0]
    assert hard.status == "timeout" and "killed" in hard.detail
    assert user_pool.stats().restarts == restarts + 1
    # the replacement worker grades the next item normally
    assert user_pool.run_sync(items(name, "shortness", [r"\boxed{1/2}"]))[0].correct


# --------------------------------------------------------------------------- bus worker


def group(i: int, texts: list[str], answer: str, row: dict | None = None) -> RolloutGroup:
    responses = [Response(token_ids=np.arange(4, dtype=np.int32) + k, logprobs=np.full(4, -0.5, np.float32),
                          finish_reason="stop", text=t) for k, t in enumerate(texts)]
    prompt = PromptTask(run_id="r", prompt_id=f"p{i}", prompt_text="q", prompt_ids=[1, 2, 3], answer=answer,
                        group_size=len(texts), meta={"fields": row or {}, "row": 17})
    return RolloutGroup(run_id="r", task=prompt, responses=responses, engine_version=0, parent_id=prompt.msg_id)


async def test_bus_worker_dead_letters_failing_groups_and_rewards_flow_to_the_trainer(
        redis_url: str, prefix: str, user_pool: VerifyPool, user_pkg: tuple[Path, str]) -> None:
    from tasks.teacher import teacher_needed_for_group
    from trainer.algorithm import group_advantages
    from trainer.batch import build_batch

    bus = Bus.from_url(redis_url, BusSettings(prefix=prefix, block_ms=50, retry_backoff_s=0.01))
    reward = spec(fns=[{"fn": "task"}, {"fn": f"{user_pkg[1]}.rewards:broken", "weight": 0.2}])
    stop = asyncio.Event()
    consumer = asyncio.create_task(worker.consume(
        bus, user_pool, stop, in_stream=f"{prefix}:rollouts", out_stream=f"{prefix}:verified",
        group="verifier", consumer="w", timeout_s=3.0, concurrency=2, reward=reward))
    good = group(0, [r"\boxed{2}", r"\boxed{3}", r"\boxed{2}", "none"], "2")
    bad = group(1, [r"\boxed{2}", r"boom \boxed{2}"], "2")
    after = group(2, [r"\boxed{5}", r"\boxed{4}"], "4")
    for g in (good, bad, after):
        await bus.publish(f"{prefix}:rollouts", g)
    got: list[VerifiedGroup] = []

    async def keep(m: VerifiedGroup) -> None:
        got.append(m)

    await asyncio.wait_for(bus.consume(f"{prefix}:verified", "t", "t", keep, VerifiedGroup, asyncio.Event(),
                                       max_messages=2), timeout=60)
    for _ in range(200):
        dead = await bus.dead_letters(f"{prefix}:rollouts")
        if dead:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await consumer
    await bus.close()

    by_prompt = {g.task.prompt_id: g for g in got}
    assert set(by_prompt) == {"p0", "p2"}  # the failing group is not passed on; the next one is
    assert len(dead) == 1 and dead[0]["attempts"] == "1"  # a user bug is not retried
    assert "missing_key_in_user_code" in dead[0]["error"] and "Traceback" in dead[0]["error"]
    assert "response 1" in dead[0]["error"]

    g0 = by_prompt["p0"]
    assert g0.rewards == pytest.approx([1.1, 0.1, 1.1, 0.1])
    assert [v.correct for v in g0.verifications] == [True, False, True, False]
    # RLRT's teacher gate follows `correct`, not reward == 1
    g0.task.teacher.scope = "correct_mixed"
    assert teacher_needed_for_group(g0) == [True, False, True, False]
    # the trainer keeps the float rewards, and they are what the advantages see
    scored = ScoredGroup.model_validate({**dict(g0), "teacher": [None] * 4})
    batch = build_batch([scored], version=0, pad_id=0)
    assert batch.rewards.tolist() == pytest.approx([1.1, 0.1, 1.1, 0.1])
    assert batch.correct.tolist() == [True, False, True, False]
    adv = group_advantages(batch.rewards, batch.group_ids).advantages
    assert adv[0] > 0 > adv[1] and adv[0] == pytest.approx(-adv[1])


# --------------------------------------------------------------------------- the real service


def _rlrt() -> list[str]:
    # The console script, as a user runs it: its sys.path does not hold the working directory,
    # so this also proves the workers find the user's package there.
    script = Path(sys.executable).parent / "rlrt"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "rlrt.cli"]


def _service(root: Path, redis_url: str, prefix: str, reward: dict) -> tuple[subprocess.Popen, str, Path]:
    from rlrt.processes import free_port

    port = free_port()
    cfg = root / f"run-{prefix}.yaml"
    cfg.write_text(yaml.safe_dump({
        "bus": {"redis_url": redis_url, "prefix": prefix, "block_ms": 50},
        "verifier": {"port": port, "workers": 1, "consumer": "v-test", "default_timeout_s": 1.0},
        "reward": reward,
    }))
    log = root / f"verifier-{prefix}.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([*_rlrt(), "serve", "verifier", "--config", cfg.name], cwd=root, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


async def test_rlrt_serve_verifier_grades_with_the_users_module(
        redis_url: str, prefix: str, user_pkg: tuple[Path, str]) -> None:
    import httpx

    root, name = user_pkg
    proc, url, log = _service(root, redis_url, prefix,
                              {"fns": [{"fn": "task"}, {"fn": f"{name}.rewards:shortness", "weight": 0.5},
                                       {"fn": f"{name}.rewards:from_row"}, {"fn": f"{name}.slow:score"}]})
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(1200):
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    if (await client.get(url + "/readyz", timeout=2)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        bus = Bus.from_url(redis_url, BusSettings(prefix=prefix, block_ms=50))
        texts = [r"\boxed{2}", "x" * 100]
        await bus.publish(f"{prefix}:rollouts", group(0, texts, "2", row={"difficulty": 0.8}))
        got: list[VerifiedGroup] = []

        async def keep(m: VerifiedGroup) -> None:
            got.append(m)

        await asyncio.wait_for(bus.consume(f"{prefix}:verified", "t", "t", keep, VerifiedGroup,
                                           asyncio.Event(), max_messages=1), timeout=120)
        # REST: the plug-ins on request (what evaluation asks for), the task checker otherwise
        async with httpx.AsyncClient(timeout=60) as client:
            rest = (await client.post(url + "/v1/verify/batch", json={"items": [
                {"response": r"\boxed{2}", "reference": "2", "reward": True,
                 "row": {"prompt_id": "p9", "difficulty": 0.5}},
                {"response": r"\boxed{2}", "reference": "2"}]})).json()["results"]
            # a job keeps the request's plug-ins and row through Redis
            job = (await client.post(url + "/v1/jobs", json={"items": [
                {"response": r"\boxed{2}", "reference": "2", "reward": True,
                 "row": {"prompt_id": "p9", "difficulty": 0.5}}]})).json()["job_id"]
            for _ in range(600):
                state = (await client.get(f"{url}/v1/jobs/{job}")).json()
                if state["status"] == "done":
                    break
                await asyncio.sleep(0.1)
        # evaluation (rlrt/evaluate.py) through a stand-in rollout, with and without the plug-ins
        evals = {flag: await _evaluate_with_standin(bus, prefix, url, flag) for flag in (True, False)}
        await bus.close()
    finally:
        _stop(proc)
    # from_row: the dataset column "difficulty" (0.8) travelled in the PromptTask; "p0" is not
    # in either response, so half of it. slow: 0.25, its 2 s import paid before the 1 s deadlines
    assert got[0].rewards == pytest.approx([1.0 + 0.5 * (1 - len(texts[0]) / 100) + 0.4 + 0.25, 0.65])
    assert [v.correct for v in got[0].verifications] == [True, False]
    assert rest[0]["reward"] == pytest.approx(1.0 + 0.5 * (1 - 9 / 100) + 0.25 + 0.25) and rest[0]["correct"]
    assert rest[1]["reward"] == 1.0 and rest[1]["correct"]
    assert state["results"][0]["reward"] == pytest.approx(rest[0]["reward"])
    # the stand-in answers "\boxed{2}" (right) and "e1 \boxed{3}" (wrong, but names the prompt)
    right, wrong = 1.0 + 0.5 * (1 - 9 / 100) + 0.5 + 0.25, 0.5 * (1 - 12 / 100) + 1.0 + 0.25
    assert evals[True]["avg@2"] == 0.5 and evals[False]["avg@2"] == 0.5  # math-verify's flag gates
    assert evals[True]["reward_mean"] == pytest.approx((right + wrong) / 2)
    assert evals[False]["reward_mean"] == 0.5


async def _evaluate_with_standin(bus: Bus, prefix: str, url: str, reward: bool) -> dict:
    """rlrt.evaluate.evaluate against the real verifier; a stand-in rollout answers every
    prompt with two fixed responses."""
    from support.tokenizer import char_tokenizer

    from rlrt.evaluate import evaluate
    from tasks.base import Row

    async def answer(t: PromptTask) -> None:
        resp = [Response(token_ids=np.arange(3, dtype=np.int32), logprobs=np.zeros(3, np.float32),
                         finish_reason="stop", text=x) for x in (r"\boxed{2}", r"e1 \boxed{3}")]
        await bus.publish(t.reply_to, RolloutGroup(run_id=t.run_id, task=t, responses=resp,
                                                   engine_version=0, parent_id=t.msg_id))

    stop = asyncio.Event()
    standin = asyncio.create_task(bus.consume(f"{prefix}:eval-prompts", "rollout", "r", answer,
                                              PromptTask, stop))
    try:
        rows = [Row(prompt_id="e1", prompt="1+1?", answer="2", solution=None, task="math",
                    fields={"difficulty": 1.0})]
        return await evaluate(rows, tokenizer=char_tokenizer(), bus=bus, prompts_stream=f"{prefix}:eval-prompts",
                              verifier_url=url, k=2, timeout_s=60, reward=reward)
    finally:
        stop.set()
        await standin


def test_rlrt_serve_verifier_refuses_a_missing_reward_module(
        redis_url: str, prefix: str, user_pkg: tuple[Path, str]) -> None:
    proc, _, log = _service(user_pkg[0], redis_url, prefix, {"fn": "no_such_pkg_xyz.rewards:f"})
    try:
        assert proc.wait(120) != 0
    finally:
        _stop(proc)
    assert "module 'no_such_pkg_xyz.rewards' not found" in log.read_text()


async def test_dataset_columns_reach_the_reward_row(redis_url: str, prefix: str, tmp_path: Path) -> None:
    """A JSONL row's extra columns travel in the trainer's PromptTask to the reward's `row`."""
    import json

    from support.tokenizer import char_tokenizer

    from protocol.messages import SamplingParams, TeacherRequest
    from trainer.config import DataConfig
    from trainer.data import PromptSource
    from trainer.driver import Driver, DriverState
    from trainer.inbox import Inbox

    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"id": "q0", "prompt": "1+1?", "answer": "2", "difficulty": 0.8,
                             "tags": ["easy"], "blob": None}) + "\n")
    source = PromptSource(DataConfig(source="jsonl", path=[str(f)], shuffle=False, task="math"),
                          char_tokenizer(), max_prompt_tokens=60, seed=0)
    bus = Bus.from_url(redis_url, BusSettings(prefix=prefix))
    state = DriverState()
    driver = Driver(bus=bus, prompts_stream=bus.cfg.stream("prompts"), source=source,
                    inbox=Inbox(bus.r, f"{prefix}:trainer:{state.nonce}"), run_id="t",
                    prompts_per_step=1, group_size=2, max_staleness=0, zero_variance="keep",
                    backfill_max=0, sampling=SamplingParams(max_new_tokens=4),
                    teacher=TeacherRequest(), wait_timeout_s=10, publish_timeout_s=5, state=state)
    await driver.top_up(0)
    got: list[PromptTask] = []

    async def keep(t: PromptTask) -> None:
        got.append(t)

    await asyncio.wait_for(bus.consume(bus.cfg.stream("prompts"), "rollout", "w", keep, PromptTask,
                                       asyncio.Event(), max_messages=1), timeout=10)
    await bus.close()
    row = prompt_row(got[0])
    assert row["difficulty"] == 0.8 and row["tags"] == ["easy"] and row["blob"] is None
    assert row["prompt_id"] == "q0" and row["answer"] == "2" and row["meta"]["row"] == 0
    assert "id" not in row and "fields" not in row["meta"]


def test_rest_reward_request_without_plug_ins_is_422(user_pool: VerifyPool) -> None:
    import httpx
    from support.verifier_live import live_verifier

    from services.verifier.config import VerifierConfig

    with live_verifier(VerifierConfig(workers=1), user_pool) as live:
        r = httpx.post(live.url + "/v1/verify", json={"response": "x", "reference": "1", "reward": True})
        ok = httpx.post(live.url + "/v1/verify", json={"response": r"\boxed{1}", "reference": "1"})
    assert r.status_code == 422 and "no reward plug-ins" in r.text
    assert ok.status_code == 200 and ok.json()["correct"]


def test_rlrt_train_refuses_a_missing_reward_module_before_starting(
        tmp_path: Path, user_pkg: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from rlrt.launch import LaunchError, LocalRun

    def cfg(reward: dict) -> Path:
        p = tmp_path / "run.yaml"
        p.write_text(yaml.safe_dump({"model": str(tmp_path / "m"), "reward": reward,
                                     "run": {"dir": str(tmp_path / "run"), "eval_prompts": 0}}))
        return p

    with pytest.raises(LaunchError, match="module 'no_such_pkg_xyz' not found"):
        LocalRun(cfg({"fn": "no_such_pkg_xyz:f"}))
    monkeypatch.chdir(user_pkg[0])  # the user's project directory, where `rlrt train` runs
    run = LocalRun(cfg({"fns": [{"fn": "task"}, {"fn": f"{user_pkg[1]}.rewards:exact"}]}))
    assert run.cfg["reward"].enabled

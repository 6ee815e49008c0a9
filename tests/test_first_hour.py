"""Issue 27, "the first hour with your own task": each mistake of the issue's table surfaces as
one clear line within seconds (no hang), with real parts: a user's reward module on disk called
in a spawned process, real files through `datasets`, real Redis for the dead-letter stop, a real
tokenizer, a real child process for Ctrl-C.

(Unknown top-level keys and a second `rlrt train` on one run dir are covered by the config and
the resume tests.)"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support.tokenizer import char_tokenizer

from protocol.bus import Bus, PermanentError
from protocol.config import BusSettings
from protocol.messages import PromptTask, SamplingParams, TeacherRequest
from rlrt.preflight import PreflightError, check_rendering, check_rewards, first_rows
from rlrt.run_config import EvalSet
from rlrt.trainer_stop import grace_s, stop_trainer
from tasks.data import DataConfig, DataError
from tasks.rewards import RewardSettings
from trainer.data import PromptSource
from trainer.driver import Driver, DriverError, DriverState
from trainer.inbox import Inbox

ROWS = [{"question": f"What is {i} + {i}?", "answer": str(2 * i), "id": f"q{i}"} for i in range(6)]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------- the data


def test_wrong_field_names_the_columns_at_once(tmp_path: Path) -> None:
    cfg = DataConfig(path=str(jsonl(tmp_path / "d.jsonl", ROWS)), prompt_field="questoin")
    t0 = time.monotonic()
    with pytest.raises(PreflightError) as e:
        first_rows(cfg, seed=0)
    msg = one_line(e.value)
    assert "data.prompt_field 'questoin' is not a column (did you mean 'question'?)" in msg
    assert "Its columns: question, answer, id" in msg
    # The trainer says the same before drawing a row (no warning per skipped row first).
    with pytest.raises(DataError, match="Its columns: question, answer, id"):
        PromptSource(cfg, char_tokenizer(), max_prompt_tokens=200, seed=0)
    assert time.monotonic() - t0 < 10


def test_empty_and_missing_files_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PreflightError) as e:
        first_rows(DataConfig(path=str(tmp_path / "empty.jsonl")), seed=0)
    assert "is empty" in one_line(e.value)
    with pytest.raises(PreflightError) as e:
        first_rows(DataConfig(path=str(tmp_path / "nope.jsonl")), seed=0)
    assert "nope.jsonl does not exist" in one_line(e.value)


def test_an_eval_set_with_its_own_file_inherits_the_field_names(tmp_path: Path) -> None:
    run = DataConfig(path=str(jsonl(tmp_path / "train.jsonl", ROWS)), prompt_field="question",
                     system_prompt="Be brief.")
    es = EvalSet(name="test", data={"path": str(jsonl(tmp_path / "test.jsonl", ROWS[:2]))})
    cfg = es.data_config(run)
    assert (cfg.prompt_field, cfg.system_prompt) == ("question", "Be brief.")
    assert [r.prompt for r in first_rows(cfg, seed=0)] == ["What is 0 + 0?", "What is 1 + 1?"]
    own = EvalSet(name="own", data={"path": str(tmp_path / "test.jsonl"), "prompt_field": "id"})
    assert own.data_config(run).prompt_field == "id"  # a set's own mapping wins


# --------------------------------------------------------------------------- rendering


def test_a_model_without_a_chat_template_gets_the_choice(tmp_path: Path) -> None:
    tok = char_tokenizer()
    tok.chat_template = None  # a base model
    cfg = DataConfig(path=str(jsonl(tmp_path / "d.jsonl", ROWS)), prompt_field="question")
    rows = first_rows(cfg, seed=0)
    with pytest.raises(PreflightError) as e:
        check_rendering(tok, cfg, rows)
    assert "has no chat template" in one_line(e.value)
    assert "data.chat_template: raw" in str(e.value) and "chatml" in str(e.value)
    for choice in ("raw", "chatml"):  # either choice renders
        check_rendering(tok, cfg.model_copy(update={"chat_template": choice}), rows)


def test_raw_prompts_for_a_base_model(tmp_path: Path) -> None:
    """data.chat_template: raw -> the system prompt, a blank line, the text, with BOS & co."""
    tok = char_tokenizer()
    tok.chat_template = None
    cfg = DataConfig(path=str(jsonl(tmp_path / "d.jsonl", ROWS)), prompt_field="question",
                     chat_template="raw", system_prompt="Answer with a number.")
    drawn = PromptSource(cfg, tok, max_prompt_tokens=200, seed=0).draw(0)
    text = f"Answer with a number.\n\n{drawn.row.prompt}"
    assert drawn.prompt_ids == tok(text, add_special_tokens=True)["input_ids"]
    assert tok.decode(drawn.prompt_ids) == text


def test_conversational_prompts_keep_their_turns_for_student_and_teacher(tmp_path: Path) -> None:
    """TRL's conversational format: the prompt column holds the turns; the student's prompt is
    the whole conversation, and the teacher's context keeps the earlier turns."""
    from protocol.messages import Response, Verification, VerifiedGroup
    from tasks.teacher import render_teacher_prompt, teacher_context_for_group

    turns = [{"role": "system", "content": "You are terse."},
             {"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"},
             {"role": "user", "content": "Now double it."}]
    path = jsonl(tmp_path / "chat.jsonl", [{"prompt": turns, "answer": "10"}])
    tok = char_tokenizer()
    src = PromptSource(DataConfig(path=str(path)), tok, max_prompt_tokens=250, seed=0)
    drawn = src.draw(0)
    assert drawn.row.prompt == "Now double it."
    expected = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert tok.decode(drawn.prompt_ids) == expected

    import numpy as np

    driver = Driver(bus=None, prompts_stream="p", inbox=None, source=src,  # type: ignore[arg-type]
                    run_id="r", prompts_per_step=1, group_size=2, max_staleness=0,
                    zero_variance="keep", backfill_max=0, sampling=SamplingParams(),
                    teacher=TeacherRequest(scope="correct_mixed"), wait_timeout_s=1,
                    publish_timeout_s=1, dead_streams=[])
    task = driver.make_task(0, 0)
    assert task.prompt_history == turns[:-1]
    resp = [Response(token_ids=np.array([7, 8], np.int32), logprobs=np.zeros(2, np.float32),
                     finish_reason="stop", text=t) for t in ("10", "The answer is 10")]
    group = VerifiedGroup(run_id="r", task=task, responses=resp, engine_version=0,
                          verifications=[Verification(reward=1.0, correct=True)] * 2)
    ctx = teacher_context_for_group(group, 0, tok)
    assert ctx is not None
    teacher_turns = [*turns[:-1], {"role": "user", "content": render_teacher_prompt(
        "Now double it.", "The answer is 10")}]
    assert tok.decode(ctx.input_ids[:ctx.response_start]) == tok.apply_chat_template(
        teacher_turns, tokenize=False, add_generation_prompt=True)
    assert ctx.input_ids[ctx.response_start:] == [7, 8]


# --------------------------------------------------------------------------- reward functions


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "myrewards.py").write_text(textwrap.dedent("""
        def partial(response, reference, row):
            return 0.5

        def as_text(response, reference, row):
            return "1.0"

        def buggy(response, reference, row):
            return row["difficulty"] * 2
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("fn, expected", [
    ("myrewards:as_text", "reward function myrewards:as_text returned a reward of type str, "
                          "not a number (called on data row 'q0')"),
    ("myrewards:buggy", "reward function myrewards:buggy raised KeyError: 'difficulty' "
                        "(myrewards.py:9) (called on data row 'q0')"),
    ("myrewards:parital", "reward function myrewards:parital: myrewards has no function "
                          "'parital' (did you mean 'partial'?)"),
    ("myrewards.py:as_text", "returned a reward of type str"),
])
def test_a_broken_reward_function_is_one_line_before_anything_starts(
        user_dir: Path, fn: str, expected: str) -> None:
    cfg = DataConfig(path=str(jsonl(user_dir / "d.jsonl", ROWS)), prompt_field="question")
    spec = RewardSettings.model_validate({"fns": [{"fn": "task"}, {"fn": fn}]}).spec()
    t0 = time.monotonic()
    with pytest.raises(PreflightError) as e:
        check_rewards(spec, first_rows(cfg, seed=0))
    assert expected in one_line(e.value)
    assert time.monotonic() - t0 < 10


def test_a_good_reward_function_passes(user_dir: Path) -> None:
    cfg = DataConfig(path=str(jsonl(user_dir / "d.jsonl", ROWS)), prompt_field="question")
    check_rewards(RewardSettings.model_validate({"fn": "myrewards:partial"}).spec(),
                  first_rows(cfg, seed=0))


# --------------------------------------------------------------------------- dead letters


@pytest.fixture
async def bus(redis_url: str, prefix: str):
    b = Bus.from_url(redis_url, BusSettings(prefix=prefix, max_deliveries=1))
    yield b
    await b.close()


def driver_for(bus: Bus, tolerance: float) -> Driver:
    src = PromptSource(DataConfig(source="countdown", num_prompts=40), char_tokenizer(),
                       max_prompt_tokens=200, seed=0)
    state = DriverState()
    return Driver(bus=bus, prompts_stream=bus.cfg.stream("prompts"),
                  inbox=Inbox(bus.r, f"{bus.cfg.prefix}:trainer:{state.nonce}"), source=src,
                  run_id="t", prompts_per_step=2, group_size=2, max_staleness=0,
                  zero_variance="keep", backfill_max=0, sampling=SamplingParams(max_new_tokens=4),
                  teacher=TeacherRequest(), wait_timeout_s=900, publish_timeout_s=5, state=state,
                  dead_tolerance=tolerance, dead_check_s=0.2)


async def fail_prompts(bus: Bus, n: int) -> None:
    """A service whose user code fails on every message: the bus dead-letters them (as the
    verifier does with a reward function's traceback)."""
    async def handler(t: PromptTask) -> None:
        raise PermanentError("RewardFunctionFailed: reward function r:f failed on response 0:\n"
                             "Traceback (most recent call last):\n  File \"r.py\", line 3\n"
                             "TypeError: returned a reward of type str, not a number")

    await asyncio.wait_for(bus.consume(bus.cfg.stream("prompts"), "rollout", "w", handler,
                                       PromptTask, asyncio.Event(), max_messages=n), 10)


async def test_a_dead_lettered_group_stops_the_run_within_seconds(bus: Bus) -> None:
    d = driver_for(bus, tolerance=0.0)
    await d.top_up(0)
    await fail_prompts(bus, 1)
    t0 = time.monotonic()
    with pytest.raises(DriverError) as e:
        await d.collect(0)  # wait_timeout_s is 900: only the dead letter can end this
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert "the rollout dead-lettered a group of this run" in msg
    assert "reward function r:f failed" in msg and "TypeError: returned a reward of type str" in msg
    assert "logs/rollout.log" in msg and f"XRANGE {bus.cfg.prefix}:prompts:dead" in msg


async def test_within_the_tolerance_a_lost_group_is_replaced(bus: Bus) -> None:
    d = driver_for(bus, tolerance=0.5)
    await d.top_up(0)
    assert d.state.admitted == 2
    await fail_prompts(bus, 1)
    assert await d.check_dead_letters(force=True) == 1
    assert d.state.totals["dead_lettered"] == 1 and len(d.state.inflight) == 1
    await d.top_up(0)
    assert d.state.admitted == 3  # the replacement
    await fail_prompts(bus, 2)  # 2 more of 3: beyond half, the second of them stops the run
    with pytest.raises(DriverError, match="2 of 3 groups lost"):
        await d.check_dead_letters(force=True)


# --------------------------------------------------------------------------- Ctrl-C


FAKE_TRAINER = """
import json, pathlib, signal, sys, time
root = pathlib.Path(sys.argv[1])
def stop(*_):
    time.sleep(float(sys.argv[2]))  # finishing a step longer than a fixed grace would allow
    (root / "step-00000003").mkdir(parents=True)
    (root / "latest.json").write_text(json.dumps({"tag": "step-00000003", "step": 3}))
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def test_ctrl_c_waits_for_the_step_and_says_what_was_saved(tmp_path: Path) -> None:
    from rlrt.processes import Child

    metrics = tmp_path / "metrics.jsonl"
    assert grace_s(metrics) is None  # no step measured yet: wait as long as the step takes
    metrics.write_text(json.dumps({"step": 0, "time_step_s": 400.0, "time_ckpt_s": 20}) + "\n")
    assert grace_s(metrics) == 3 * 420 + 30  # a 7-minute step gets its time, not 120 s

    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    child = Child("trainer", [sys.executable, str(script), str(tmp_path / "ckpt"), "1.5"], {},
                  log_path=tmp_path / "trainer.log")
    child.start()
    deadline = time.monotonic() + 20
    while "ready" not in (tmp_path / "trainer.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lines: list[str] = []
    # A grace floor below the step's own time: only the measured step time keeps it alive.
    said = stop_trainer(child, metrics_jsonl=metrics, checkpoint_root=tmp_path / "ckpt",
                        log=lines.append, min_grace_s=0.1)
    assert child.proc is not None and child.proc.returncode == 0
    assert said == f"saved: checkpoint at step 3 (written now) in {tmp_path / 'ckpt' / 'step-00000003'}"
    assert "finishes its current step and writes a checkpoint" in lines[0]

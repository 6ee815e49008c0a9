"""One Task abstraction: built-in and dotted-path tasks, the one prompt rendering shared by
training, evaluation and the teacher (system prompt and chat-template arguments included), and
the verifier accepting exactly the run's own tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.tokenizer import char_tokenizer

from protocol.messages import TeacherRequest
from services.verifier import core
from tasks import TASKS, UnknownTask, get_task, task_class
from tasks.base import Task, render_prompt
from tasks.data import DataConfig, load_rows
from tasks.teacher import Demonstration, build_teacher_context, render_teacher_prompt
from trainer.data import PromptSource

CONTAINS = "support.inspect_task:ContainsTask"


def test_builtin_and_dotted_tasks() -> None:
    assert set(TASKS) == {"countdown", "math"}
    task = get_task(CONTAINS)
    assert isinstance(task, Task) and task.verify("x7y", "7").correct
    assert get_task(CONTAINS) is task  # one shared instance per name
    with pytest.raises(UnknownTask, match="unknown task 'nope'"):
        task_class("nope")
    with pytest.raises(UnknownTask, match="cannot be imported"):
        task_class("no_such_module:Task")
    with pytest.raises(UnknownTask, match="not a tasks.base.Task"):
        task_class("json:loads")


def test_a_dotted_task_generates_its_own_rows() -> None:
    rows = load_rows(DataConfig(task="support.tiny_tasks:Echo"), seed=3, n=4)
    assert [(r.prompt, r.answer, r.task) for r in rows] == \
        [(f"echo {i}", str(i), "support.tiny_tasks:Echo") for i in range(3, 7)]


def test_training_evaluation_and_teacher_render_alike() -> None:
    """System prompt and chat-template arguments reach every rendering; the teacher's context
    differs from the student's prompt only in its user turn."""
    tok = char_tokenizer()
    cfg = DataConfig(task="countdown", num_prompts=4, system_prompt="Think in steps.",
                     chat_template_kwargs={"enable_thinking": False})
    src = PromptSource(cfg, tok, max_prompt_tokens=400, seed=0)
    drawn = src.draw(0)
    expected = render_prompt(tok, drawn.row.prompt, system_prompt="Think in steps.",
                             chat_template_kwargs={"enable_thinking": False})
    assert drawn.prompt_ids == expected
    assert "Think in steps." in tok.decode(drawn.prompt_ids)

    req = TeacherRequest(system_prompt=cfg.system_prompt, chat_template_kwargs=cfg.chat_template_kwargs)
    demo = Demonstration(text="9+7=16\nAnswer: 16", mode="sibling", index=1)
    ctx = build_teacher_context(tok, drawn.row.prompt, demo, [5, 6], template=req.template,
                                chat_template_kwargs=req.chat_template_kwargs,
                                system_prompt=req.system_prompt)
    teacher_user = render_teacher_prompt(drawn.row.prompt, demo.text)
    assert ctx.input_ids[:ctx.response_start] == render_prompt(
        tok, teacher_user, system_prompt="Think in steps.",
        chat_template_kwargs={"enable_thinking": False})
    assert "Think in steps." in tok.decode(ctx.input_ids[:ctx.response_start])
    assert ctx.input_ids[ctx.response_start:] == [5, 6]


def test_rows_own_task_column_wins(tmp_path: Path) -> None:
    f = tmp_path / "mixed.jsonl"
    f.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n"
                 + json.dumps({"prompt": "b", "answer": "2", "task": CONTAINS}) + "\n")
    assert [r.task for r in load_rows(DataConfig(path=[str(f)]), seed=0)] == ["math", CONTAINS]


def test_verifier_accepts_only_the_runs_tasks() -> None:
    assert core.is_known("math") and core.is_known("countdown")
    assert not core.is_known(CONTAINS)  # a request may not make the verifier import a module
    core.allow_tasks([CONTAINS, "countdown"])
    try:
        assert core.is_known(CONTAINS)
        assert core.check(CONTAINS, "it is 7", "7").correct
    finally:
        core._RUN_TASKS.discard(CONTAINS)
    with pytest.raises(UnknownTask):
        core.allow_tasks(["no_such_module:Task"])

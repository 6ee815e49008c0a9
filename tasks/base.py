"""What a task is: where its rows come from, how a prompt becomes token ids, how a response is
graded. Shared by the trainer (training rows), `rlrt eval` / `rlrt inspect` (evaluation rows),
the teacher (its context is rendered by the same `render_prompt`) and the verifier (grading).

A task is a `Task` subclass. Built-in ones are listed in `tasks.BUILTIN`; any other is
named by dotted path in the config (`data: {task: "mypkg.tasks:MyTask"}`), so adding one never
means editing this package. A *generator* task (Countdown) makes its own rows; any task can
also read rows from files or a hub dataset through the `data` section (tasks/data.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel

Status = Literal["ok", "timeout", "parse_error", "error"]
# Splits a generator task can produce. Files and hub datasets use their own split names.
GENERATED_SPLITS = ("train", "heldout")


class CheckResult(BaseModel):
    """Verdict for one response. `reward` is 1.0 for correct, 0.0 otherwise."""

    correct: bool
    reward: float
    status: Status = "ok"
    parsed_response: str | None = None
    parsed_reference: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class Row:
    """One usable prompt, whatever its source: what a PromptTask and an evaluation item carry."""

    prompt_id: str
    prompt: str
    answer: str
    solution: str | None
    task: str
    # The source row's other columns (plain JSON-like values): reward functions receive them in
    # their `row` (tasks/rewards.py). Not part of the row's identity.
    fields: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


def chat_messages(prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": prompt}]


def render_prompt(tokenizer: Any, prompt: str, *, system_prompt: str | None = None,
                  chat_template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """THE prompt rendering of the system (training, evaluation, teacher contexts, inspect):
    the chat template with the generation prompt, then tokens without added specials (the
    template already holds BOS and friends; adding them again would shift every position)."""
    text = tokenizer.apply_chat_template(
        chat_messages(prompt, system_prompt), tokenize=False, add_generation_prompt=True,
        **dict(chat_template_kwargs or {}),
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class Task:
    """One verifiable task. Subclasses set `name` and override what they offer:

    - `generate(split, n, seed)`: rows of a generator task (dicts with `id`, `prompt`,
      `answer`, optional `solution`); None for a task whose rows come from files.
    - `verify(response, reference)`: the grade of one response (run by the verifier, inside
      its killable pool). `reward` may be partial (0..1); `correct` gates RLRT's teacher.
    """

    name: ClassVar[str] = ""
    # knobs: task-specific generator settings from `data.knobs` (e.g. Countdown's difficulty).
    def __init__(self, knobs: Mapping[str, Any] | None = None) -> None:
        self.knobs = dict(knobs or {})

    def generate(self, split: str, n: int, seed: int) -> list[dict[str, Any]] | None:
        return None

    def verify(self, response: str, reference: str) -> CheckResult:
        raise NotImplementedError(f"task {self.name!r} has no checker")

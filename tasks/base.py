"""What a task is: where its rows come from, how a prompt becomes token ids, how a response is
graded. Shared by the trainer (training rows), `rlrt eval` / `rlrt inspect` (evaluation rows),
the teacher (its context is rendered by the same `render_prompt`) and the verifier (grading).

A task is a `Task` subclass. Built-in ones are listed in `tasks.BUILTIN`; any other is
named by dotted path in the config (`data: {task: "mypkg.tasks:MyTask"}`), so adding one never
means editing this package. A *generator* task (Countdown) makes its own rows; any task can
also read rows from files or a hub dataset through the `data` section (tasks/data.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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


Message = Mapping[str, str]  # one chat turn: {"role": ..., "content": ...}
ROLES = ("system", "user", "assistant")
# `data.chat_template` value that renders without any template: the prompt text as it is.
RAW = "raw"
# Named templates a model without one can be given (`data.chat_template: chatml`).
NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
}


class RenderError(ValueError):
    """A prompt cannot be rendered the way the data section asks (one line, naming the fix)."""


@dataclass(frozen=True)
class Row:
    """One usable prompt, whatever its source: what a PromptTask and an evaluation item carry."""

    prompt_id: str
    prompt: str  # the question: the last user turn's text when the row is a conversation
    answer: str
    solution: str | None
    task: str
    # The source row's other columns (plain JSON-like values): reward functions receive them in
    # their `row` (tasks/rewards.py). Not part of the row's identity.
    fields: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # A conversational row (TRL's format: the prompt column holds [{role, content}, ...]): the
    # whole conversation, ending with the user turn `prompt` is the text of. None = one turn.
    messages: tuple[Message, ...] | None = field(default=None, compare=False, hash=False)


def as_messages(value: Any) -> tuple[Message, ...] | str:
    """A prompt column's message list as turns ending with a user turn, or why it is not one
    ('bad_messages')."""
    if not isinstance(value, (list, tuple)) or not value:
        return "bad_messages"
    turns = []
    for m in value:
        if not (isinstance(m, Mapping) and m.get("role") in ROLES
                and isinstance(m.get("content"), str)):
            return "bad_messages"
        turns.append({"role": str(m["role"]), "content": str(m["content"])})
    if turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        return "bad_messages"
    return tuple(turns)


def chat_messages(prompt: str, system_prompt: str | None = None,
                  history: Sequence[Message] | None = None) -> list[dict[str, str]]:
    """The turns rendered for `prompt`: the conversation's earlier turns (`history`, which may
    hold its own system turn) or else the data section's system prompt, then the user turn."""
    if history:
        earlier = [dict(m) for m in history]
        if system_prompt and earlier[0]["role"] != "system":
            earlier.insert(0, {"role": "system", "content": system_prompt})
        return [*earlier, {"role": "user", "content": prompt}]
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": prompt}]


def resolve_template(chat_template: str | None) -> str | None:
    """`data.chat_template` -> the Jinja text to render with: a named template, the text of a
    .jinja file, a literal template; None = the tokenizer's own (RAW is handled by the caller)."""
    if chat_template is None or chat_template == RAW:
        return None
    if chat_template in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[chat_template]
    if "{" not in chat_template:
        path = Path(chat_template)
        if not path.is_file():
            raise RenderError(f"data.chat_template {chat_template!r} is not a named template "
                              f"({', '.join(NAMED_TEMPLATES)}, {RAW}), a Jinja file or a "
                              "template text")
        return path.read_text()
    return chat_template


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def no_template_error(tokenizer: Any) -> RenderError:
    name = getattr(tokenizer, "name_or_path", "") or "the model"
    return RenderError(
        f"{name} has no chat template (a base model?): set data.chat_template: {RAW} to train "
        f"on the prompt text as it is (base models), or a template for it to use: "
        f"{', '.join(NAMED_TEMPLATES)}, a .jinja file or the template's text")


def render_prompt(tokenizer: Any, prompt: str, *, system_prompt: str | None = None,
                  chat_template_kwargs: Mapping[str, Any] | None = None,
                  history: Sequence[Message] | None = None,
                  chat_template: str | None = None) -> list[int]:
    """THE prompt rendering of the system (training, evaluation, teacher contexts, inspect).

    - Chat (default): the turns (`history`, the conversation's earlier turns, or the system
      prompt; then the user turn `prompt`) through the chat template -- the tokenizer's own, or
      `chat_template` (a name in NAMED_TEMPLATES, a .jinja file, a template text) -- with the
      generation prompt, then tokens without added specials (the template already holds BOS
      and friends; adding them again would shift every position).
    - `chat_template="raw"` (base models): the system prompt, a blank line, then the prompt
      text as it is, tokenized *with* the tokenizer's specials (BOS): nothing else adds them.
    """
    if chat_template == RAW:
        if history:
            raise RenderError("a conversational prompt (a list of turns) needs a chat "
                              f"template; data.chat_template: {RAW} renders plain text only")
        text = f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    template = resolve_template(chat_template)
    if template is None and not has_chat_template(tokenizer):
        raise no_template_error(tokenizer)
    text = tokenizer.apply_chat_template(
        chat_messages(prompt, system_prompt, history), tokenize=False,
        add_generation_prompt=True, **({"chat_template": template} if template else {}),
        **dict(chat_template_kwargs or {}),
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_row(tokenizer: Any, row: Row, *, system_prompt: str | None = None,
               chat_template_kwargs: Mapping[str, Any] | None = None,
               chat_template: str | None = None) -> list[int]:
    """`render_prompt` of a Row: its conversation's earlier turns, if it has any."""
    return render_prompt(tokenizer, row.prompt, system_prompt=system_prompt,
                         chat_template_kwargs=chat_template_kwargs,
                         history=row.messages[:-1] if row.messages else None,
                         chat_template=chat_template)


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

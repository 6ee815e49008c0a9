"""The teacher contract, shared by the teacher service (which scores) and the trainer (which
checks it got what it needs). See docs/algorithm.md (the presets' `context` column).

Two questions, answered the same way on both sides:
1. `teacher_needed`: which responses of a verified group need teacher log-probs q_t?
2. `build_teacher_context`: what token sequence does the teacher score? It is
   chat_template(earlier turns, user: template(prompt, demonstration)) + the student's
   response tokens unchanged (a conversational prompt keeps its earlier turns), so q_t of
   response token t sits at position `response_start + t`.

Pure Python (no torch, no transformers import): the tokenizer is duck-typed, anything with
`apply_chat_template(..., tokenize=False)` and `__call__(text, add_special_tokens=False)`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from protocol.estimators import Scope, get_adv_est
from protocol.messages import ScoredGroup, TeacherRequest, VerifiedGroup
from tasks.base import Message, render_prompt

ContextMode = Literal["sibling", "reference_solution", "reference_answer"]

DEFAULT_TEMPLATE = (
    "{prompt}\n\nCorrect solution:\n\n{demonstration}\n\nCorrectly solve the original question.\n"
)


# --------------------------------------------------------------------------- who needs a score


def zero_advantage(rewards: Sequence[float], estimator: str = "grpo") -> list[bool]:
    """Which responses have advantage 0 under `estimator`: the registry's test
    (protocol/estimators.py), the one place that decides it for the trainer too."""
    return get_adv_est(estimator).zero_advantage(rewards)


def has_demonstration(
    correct: Sequence[bool],
    index: int,
    context_mode: ContextMode = "sibling",
    *,
    has_solution: bool = False,
    has_answer: bool = True,
    fallback_to_solution: bool = True,
) -> bool:
    """Whether response `index` has a teacher context c under `context_mode`: a *different*
    correct sibling (or, with the fallback, the reference solution), the reference solution,
    or the reference answer."""
    if context_mode == "sibling":
        sibling = any(ok for j, ok in enumerate(correct) if j != index)
        return sibling or (fallback_to_solution and has_solution)
    if context_mode == "reference_solution":
        return has_solution
    if context_mode == "reference_answer":
        return has_answer
    raise ValueError(f"unknown context_mode {context_mode!r}")


def in_scope(correct: Sequence[bool], rewards: Sequence[float], scope: Scope,
             estimator: str = "grpo") -> list[bool]:
    """Which responses the scope asks a teacher score for, before asking whether a
    demonstration exists.
    - none: nothing (grpo, dr_grpo, grpo_entropy)
    - correct_mixed: correct responses with A != 0, i.e. of mixed groups (rlrt,
      teacher_upweight); a correct response of an all-correct group has A = 0 and needs none
    - nonzero_adv: every response with A != 0 (rlrt_all, rlsd)
    - all: every response (opsd, which uses no reward)
    """
    if len(correct) != len(rewards):
        raise ValueError(f"{len(correct)} correct flags for {len(rewards)} rewards")
    zero = zero_advantage(rewards, estimator)
    if scope == "none":
        return [False] * len(rewards)
    if scope == "correct_mixed":
        return [ok and not z for ok, z in zip(correct, zero, strict=True)]
    if scope == "nonzero_adv":
        return [not z for z in zero]
    if scope == "all":
        return [True] * len(rewards)
    raise ValueError(f"unknown teacher scope {scope!r}")


def teacher_needed(
    correct: Sequence[bool],
    rewards: Sequence[float],
    scope: Scope,
    context_mode: ContextMode = "sibling",
    *,
    has_solution: bool = False,
    has_answer: bool = True,
    fallback_to_solution: bool = True,
    estimator: str = "grpo",
) -> list[bool]:
    """Exactly which responses of one group need teacher log-probs: in the scope AND with a
    demonstration. A response in scope without one is trained as plain GRPO (w_t = 1).

    For `rlrt` (scope correct_mixed, sibling mode): the correct responses of a mixed group that
    have another correct sibling, or the reference solution when the group has a single correct
    response and the dataset has a solution."""
    wanted = in_scope(correct, rewards, scope, estimator)
    return [
        want
        and has_demonstration(
            correct,
            i,
            context_mode,
            has_solution=has_solution,
            has_answer=has_answer,
            fallback_to_solution=fallback_to_solution,
        )
        for i, want in enumerate(wanted)
    ]


def teacher_needed_for_group(group: VerifiedGroup) -> list[bool]:
    """`teacher_needed` for a verified group, with the scope and context mode the trainer put
    into the group's `PromptTask.teacher`."""
    req = group.task.teacher
    return teacher_needed(
        [v.correct for v in group.verifications],
        group.rewards,
        req.scope,
        req.context_mode,
        has_solution=bool(group.task.solution),
        has_answer=bool(group.task.answer),
        fallback_to_solution=req.fallback_to_solution,
        estimator=req.estimator,
    )


def missing_teacher_scores(group: ScoredGroup) -> list[int]:
    """Indices of responses the contract says need a teacher score but arrived without one
    (the trainer trains them as plain GRPO and counts them; a non-empty list on every group
    means the teacher service and the trainer disagree)."""
    needed = teacher_needed_for_group(group)
    return [
        i
        for i, (need, t) in enumerate(zip(needed, group.teacher, strict=True))
        if need and t is None
    ]


# --------------------------------------------------------------------------- the demonstration


@dataclass(frozen=True)
class Demonstration:
    """The privileged context c for one response."""

    text: str
    mode: ContextMode  # what it actually is (a sibling may have fallen back to the solution)
    index: int | None  # which sibling, when mode == "sibling"


_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def strip_think(text: str) -> str:
    """Remove reasoning blocks, so the teacher sees the worked solution, not the search.
    Handles closed blocks, a response that starts inside one (Qwen3 thinking templates put
    `<think>` in the prompt, so only `</think>` appears) and a block cut off by the length cap."""
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text.strip()


def pick_sibling(correct: Sequence[bool], index: int, seed: int = 0, key: str = "") -> int | None:
    """A *different* correct sibling of response `index`, chosen uniformly but reproducibly:
    the same (seed, key, index) always gives the same sibling, in any process (a string seed
    is hashed with SHA-512 by `random.Random`, unlike `hash()`). `key` is the group id."""
    others = [j for j, ok in enumerate(correct) if ok and j != index]
    if not others:
        return None
    return random.Random(f"{seed}:{key}:{index}").choice(others)


def pick_demonstration(
    texts: Sequence[str],
    correct: Sequence[bool],
    index: int,
    context_mode: ContextMode = "sibling",
    *,
    solution: str | None = None,
    answer: str | None = None,
    fallback_to_solution: bool = True,
    strip_think_blocks: bool = True,
    seed: int = 0,
    key: str = "",
) -> Demonstration | None:
    """The demonstration for response `index`, or None when there is none (then w_t = 1).
    sibling: another correct response (think blocks stripped), falling back to the reference
    solution; reference_solution: the dataset's solution; reference_answer: the final answer."""
    if context_mode == "sibling":
        j = pick_sibling(correct, index, seed, key)
        if j is not None:
            text = strip_think(texts[j]) if strip_think_blocks else texts[j]
            return Demonstration(text=text, mode="sibling", index=j)
        if fallback_to_solution and solution:
            return Demonstration(text=solution, mode="reference_solution", index=None)
        return None
    if context_mode == "reference_solution":
        return Demonstration(solution, "reference_solution", None) if solution else None
    if context_mode == "reference_answer":
        return Demonstration(answer, "reference_answer", None) if answer else None
    raise ValueError(f"unknown context_mode {context_mode!r}")


# --------------------------------------------------------------------------- the token sequence


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class TeacherContext:
    """What the teacher scores: `input_ids` = context + response; q_t of response token t is
    the log-prob at position `response_start + t` (predicted from position response_start+t-1)."""

    input_ids: list[int]
    response_start: int
    demonstration: Demonstration


def render_teacher_prompt(prompt: str, demonstration: str, template: str | None = None) -> str:
    """The user message of the teacher: the spec's template unless one is given. Plain
    `str.replace`, not `str.format`, because math text is full of `{` and `}`."""
    template = DEFAULT_TEMPLATE if template is None else template
    return template.replace("{prompt}", prompt).replace("{demonstration}", demonstration)


def build_teacher_context(
    tokenizer: ChatTokenizer,
    prompt: str,
    demonstration: Demonstration,
    response_ids: Sequence[int],
    *,
    template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    system_prompt: str | None = None,
    history: Sequence[Message] | None = None,
    chat_template: str | None = None,
) -> TeacherContext:
    """Render the teacher prompt through the tokenizer's chat template (with the generation
    prompt, exactly like the student's prompt) and append the response tokens unchanged.
    The response is never re-tokenized from text: the teacher must score the very tokens the
    student sampled, or q_t and s_t would refer to different tokens."""
    # The student's own rendering (tasks/base.py), system prompt, a conversation's earlier
    # turns and the template choice included: only the last user turn differs.
    context = render_prompt(tokenizer, render_teacher_prompt(prompt, demonstration.text, template),
                            system_prompt=system_prompt, chat_template_kwargs=chat_template_kwargs,
                            history=history, chat_template=chat_template)
    return TeacherContext(
        input_ids=context + [int(t) for t in response_ids],
        response_start=len(context),
        demonstration=demonstration,
    )


class _ResponseTexts(Sequence[str]):
    """Response texts, decoded from tokens only when the rollout left `text` empty and only
    for the sibling actually picked (decoding all G responses would be wasted work)."""

    def __init__(self, group: VerifiedGroup, tokenizer: Any) -> None:
        self._responses = group.responses
        self._tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self._responses)

    def __getitem__(self, j: int) -> str:  # type: ignore[override]
        r = self._responses[j]
        return r.text or self._tokenizer.decode(r.token_ids.tolist(), skip_special_tokens=True)


def teacher_context_for_group(
    group: VerifiedGroup,
    index: int,
    tokenizer: ChatTokenizer,
    request: TeacherRequest | None = None,
) -> TeacherContext | None:
    """The teacher context of response `index` of a verified group, following the group's
    `TeacherRequest` (or `request`). None when the response has no demonstration. A sibling's
    text is its decoded tokens when the rollout left `text` empty."""
    req = request or group.task.teacher
    demo = pick_demonstration(
        _ResponseTexts(group, tokenizer),
        [v.correct for v in group.verifications],
        index,
        req.context_mode,
        solution=group.task.solution,
        answer=group.task.answer,
        fallback_to_solution=req.fallback_to_solution,
        strip_think_blocks=req.strip_think,
        seed=req.seed,
        key=group.task.group_id,
    )
    if demo is None:
        return None
    return build_teacher_context(
        tokenizer,
        group.task.prompt_text,
        demo,
        group.responses[index].token_ids.tolist(),
        template=req.template,
        chat_template_kwargs=req.chat_template_kwargs,
        system_prompt=req.system_prompt,
        history=group.task.prompt_history,
        chat_template=req.chat_template,
    )

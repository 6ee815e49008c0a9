"""Math answers: pull the final answer out of a response and compare it with the reference
through math-verify (symbolic equivalence, gold first).

Everything here is synchronous and may take unbounded time or memory on hostile input
(sympy on `10^{10^{10^{10}}}`): it must only run inside a pool worker (services.verifier.pool),
which owns the deadline and the memory cap. math-verify's own `signal.alarm` timeouts are
switched off (`parsing_timeout=None`, `timeout_seconds=None`): they break off the main thread
and would fight with the pool's own timer.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from tasks.base import CheckResult

# math-verify warns once per process that its timeouts are off; that is deliberate here.
logging.getLogger("math_verify").setLevel(logging.ERROR)

# A real final answer is short. Longer "answers" are garbage or attacks, and sympy's cost on
# them is unbounded, so they are refused before parsing.
MAX_ANSWER_CHARS = 1024
# Echoed back to clients for debugging only; never let it blow up a response.
MAX_ECHO_CHARS = 256

_BOXED_ONLY = [LatexExtractionConfig(boxed_match_priority=0)]
_LATEX_OR_EXPR = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Literal braces `\{ \}` (set notation) are not group delimiters, so they are matched first and
# skipped.
_BRACE = re.compile(r"\\[{}]|[{}]")
# "The final answer is X", "Answer: X", GSM8K's "#### X". The last such line wins.
_ANSWER_LINE = re.compile(
    r"(?:\banswer\b\s*(?:is\b\s*)?[:：]?|^\s*####)\s*(?P<ans>[^\n]+)",
    re.IGNORECASE | re.MULTILINE,
)


def _closing_braces(text: str) -> dict[int, int]:
    """Index of each group-opening `{` -> index of its matching `}`, in one linear pass (a
    5,000-deep nest must not cost more than a flat string)."""
    stack: list[int] = []
    pairs: dict[int, int] = {}
    for m in _BRACE.finditer(text):
        tok = m.group()
        if tok == "{":
            stack.append(m.start())
        elif tok == "}" and stack:
            pairs[stack.pop()] = m.start()
    return pairs


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`), or None. A truncated
    trailing box (no closing brace) is skipped in favour of the one before it."""
    starts = [m.end() - 1 for m in _BOX_START.finditer(text)]
    if not starts:
        return None
    pairs = _closing_braces(text)
    for open_at in reversed(starts):
        close_at = pairs.get(open_at)
        if close_at is not None:
            return text[open_at + 1 : close_at]
    return None


def final_answer_line(text: str) -> str | None:
    """Text after the last "answer is / answer: / ####" anchor, or None."""
    last = None
    for last in _ANSWER_LINE.finditer(text):  # noqa: B007 - we want the final match
        pass
    return last.group("ans").strip() if last else None


def extract_answer(response: str) -> tuple[str | None, str]:
    """(answer text, how it was found): the final `\\boxed{}` wins, else the final-answer line."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed, "boxed"
    line = final_answer_line(response)
    if line is not None:
        return line, "answer_line"
    return None, "none"


def _echo(s: str) -> str:
    return s if len(s) <= MAX_ECHO_CHARS else s[:MAX_ECHO_CHARS] + "…"


def _parse_boxed(content: str) -> list:
    return parse("\\boxed{" + content + "}", _BOXED_ONLY, parsing_timeout=None)


@lru_cache(maxsize=4096)
def parse_gold(reference: str) -> tuple:
    """Parsed reference. Cached: every response of a rollout group shares one reference, so the
    gold is parsed once per group per worker instead of once per response."""
    ref = reference.strip()
    inner = last_boxed(ref)
    parsed = _parse_boxed(inner if inner is not None else ref)
    if not parsed:
        parsed = parse(ref, _LATEX_OR_EXPR, parsing_timeout=None)
    return tuple(parsed)


def _parse_pred(answer: str, how: str) -> list:
    if how == "boxed":
        return _parse_boxed(answer)
    # An answer line is prose ("$\frac12$. I hope it is correct."): let math-verify find the
    # expression in it.
    return parse(answer, _LATEX_OR_EXPR, parsing_timeout=None)


def _shown(parsed: list | tuple, fallback: str) -> str:
    # math-verify returns [sympy_obj, matched_text]; show the text, never str(sympy_obj), whose
    # printing can itself hang on huge expressions.
    texts = [p for p in parsed if isinstance(p, str)]
    return _echo(texts[-1] if texts else fallback)


def check_math(response: str, reference: str) -> CheckResult:
    """Grade one response against a reference answer. Never raises for bad input; may run long
    (the caller enforces the deadline)."""
    if len(reference) > MAX_ANSWER_CHARS:
        return CheckResult(
            correct=False, reward=0.0, status="parse_error",
            detail=f"reference longer than {MAX_ANSWER_CHARS} characters",
        )
    gold = parse_gold(reference)
    if not gold:
        return CheckResult(
            correct=False, reward=0.0, status="parse_error",
            parsed_reference=None, detail="reference could not be parsed",
        )
    shown_ref = _shown(gold, reference)
    answer, how = extract_answer(response)
    if answer is None:
        return CheckResult(
            correct=False, reward=0.0, status="parse_error", parsed_reference=shown_ref,
            detail="no final answer found (no \\boxed{} and no 'answer:' line)",
        )
    if len(answer) > MAX_ANSWER_CHARS:
        return CheckResult(
            correct=False, reward=0.0, status="parse_error", parsed_reference=shown_ref,
            detail=f"final answer longer than {MAX_ANSWER_CHARS} characters",
        )
    pred = _parse_pred(answer, how)
    if not pred:
        return CheckResult(
            correct=False, reward=0.0, status="parse_error", parsed_reference=shown_ref,
            parsed_response=_echo(answer), detail=f"could not parse the {how} answer",
        )
    ok = verify(list(gold), pred, timeout_seconds=None)
    return CheckResult(
        correct=ok, reward=1.0 if ok else 0.0, status="ok",
        parsed_response=_shown(pred, answer), parsed_reference=shown_ref, detail=how,
    )

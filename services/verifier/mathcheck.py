"""Math answers: take the final answer out of a response under an extraction policy
(tasks.math.MathPolicy; where to look is extract.py) and compare it with the reference through
math-verify (symbolic equivalence, gold first).

Everything here is synchronous and may take unbounded time or memory on hostile input
(sympy on `10^{10^{10^{10}}}`): it must only run inside a pool worker (services.verifier.pool),
which owns the deadline and the memory cap. math-verify's own `signal.alarm` timeouts are
switched off (`parsing_timeout=None`, `timeout_seconds=None`): they break off the main thread
and would fight with the pool's own timer.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from sympy import FiniteSet

from services.verifier.extract import (
    boxed_answers,
    dapo_answer_line,
    final_answer_after,
    final_answer_line,
)
from tasks.base import CheckResult
from tasks.math import DEFAULT_POLICY, POLICIES

# math-verify warns once per process that its timeouts are off; that is deliberate here.
logging.getLogger("math_verify").setLevel(logging.ERROR)

# A real final answer is short. Longer "answers" are garbage or attacks, and sympy's cost on
# them is unbounded, so they are refused before parsing.
MAX_ANSWER_CHARS = 1024
# Echoed back to clients for debugging only; never let it blow up a response.
MAX_ECHO_CHARS = 256

_BOXED_ONLY = [LatexExtractionConfig(boxed_match_priority=0)]
_LATEX_OR_EXPR = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
# math-verify's own default extraction (`parse(text)`): boxes after "final answer is", LaTeX
# anywhere, then plain expressions; the rightmost match of the best kind wins.
_MATH_VERIFY = [LatexExtractionConfig(), ExprExtractionConfig()]


class _Refused(Exception):
    """An answer that is not parsed at all (too long): a parse_error with this detail."""


def _echo(s: str) -> str:
    return s if len(s) <= MAX_ECHO_CHARS else s[:MAX_ECHO_CHARS] + "…"


def _short(answer: str, what: str) -> str:
    if len(answer) > MAX_ANSWER_CHARS:
        raise _Refused(f"{what} longer than {MAX_ANSWER_CHARS} characters")
    return answer


def _parse_boxed(content: str) -> list:
    return parse("\\boxed{" + _short(content, "final answer") + "}", _BOXED_ONLY, parsing_timeout=None)


def _parse_prose(text: str) -> list:
    # An answer line is prose ("$\frac12$. I hope it is correct."): let math-verify find the
    # expression in it.
    return parse(_short(text, "final answer"), _LATEX_OR_EXPR, parsing_timeout=None)


def _value(parsed: list) -> object | None:
    return next((p for p in parsed if not isinstance(p, str)), None)


def _parse_answers(contents: list[str]) -> list:
    """One box: its answer. Several (the answers of a multi-solution problem): the set of their
    answers, sets flattened ({1,2} and 3 -> {1,2,3}), as math-verify builds it; if one of
    them does not parse, the last box alone (what a single-box reading would give)."""
    if len(contents) == 1:
        return _parse_boxed(contents[0])
    _short(", ".join(contents), "final answer")
    parsed = [_parse_boxed(c) for c in contents]
    values = [_value(p) for p in parsed]
    if any(v is None for v in values):
        return parsed[-1]
    elements: list = []
    for v in values:
        elements.extend(v.args if isinstance(v, FiniteSet) else [v])
    return [FiniteSet(*elements), " and ".join(_shown(p, c) for p, c in zip(parsed, contents, strict=True))]


@lru_cache(maxsize=4096)
def parse_gold(reference: str) -> tuple:
    """Parsed reference. A bare answer ("0.5", "$[0,1)$") is read whole; a worked solution by
    its last \\boxed{} (several joined boxes: their set), or else as math-verify reads one.
    Cached: every response of a rollout group shares one reference, so the gold is parsed once
    per group per worker instead of once per response. Raises _Refused for a reference whose
    answer is too long to parse."""
    ref = reference.strip()
    answers, _ = boxed_answers(ref)
    if answers:
        return tuple(_parse_answers(answers))
    if len(ref) <= MAX_ANSWER_CHARS:
        return tuple(_parse_boxed(ref) or parse(ref, _LATEX_OR_EXPR, parsing_timeout=None))
    # A long reference without a box is a worked solution: math-verify's own extraction finds
    # its conclusion ("The final answer is $28\%$. I hope it is correct.").
    return tuple(parse(ref, _MATH_VERIFY, parsing_timeout=None))


def _extract(response: str, policy: str) -> tuple[list | None, str, str]:
    """(parsed answer or None when there is none, how it was found, the raw answer text)."""
    if policy == "math_verify":
        return parse(response, _MATH_VERIFY, parsing_timeout=None) or None, "math_verify", response
    if policy == "dapo":
        line = dapo_answer_line(response)
        return (None, "dapo", "") if line is None else (_parse_prose(line), "dapo", line)
    answers, end = boxed_answers(response)
    if answers:
        # A "final answer" stated after the last box is the answer (the boxes were steps).
        later = final_answer_after(response, end)
        if later is not None and len(later) <= MAX_ANSWER_CHARS:
            pred = _parse_prose(later)
            if _value(pred) is not None:
                return pred, "final_answer_line", later
        how = "boxed" if len(answers) == 1 else f"boxed x{len(answers)}"
        return _parse_answers(answers), how, ", ".join(answers)
    line = final_answer_line(response)
    return (None, "none", "") if line is None else (_parse_prose(line), "answer_line", line)


_MISSING = {
    "boxed": "no final answer found (no \\boxed{} and no 'answer:' line)",
    "math_verify": "no final answer found (math-verify extracted nothing)",
    "dapo": "no final answer found (no 'Answer:' line at the end of the response)",
}


def _shown(parsed: list | tuple, fallback: str) -> str:
    # math-verify returns [sympy_obj, matched_text]; show the text, never str(sympy_obj), whose
    # printing can itself hang on huge expressions.
    texts = [p for p in parsed if isinstance(p, str)]
    return _echo(texts[-1] if texts else fallback)


def _error(detail: str, **kw: str | None) -> CheckResult:
    return CheckResult(correct=False, reward=0.0, status="parse_error", detail=detail, **kw)


def check_math(response: str, reference: str, policy: str = DEFAULT_POLICY) -> CheckResult:
    """Grade one response against a reference under extraction `policy` (tasks.math.POLICIES).
    Never raises for bad input; may run long (the caller enforces the deadline)."""
    if policy not in POLICIES:  # the API and the config validate it; this is a caller's bug
        raise ValueError(f"unknown extraction policy {policy!r}; known: {', '.join(POLICIES)}")
    try:
        gold = parse_gold(reference)
    except _Refused as e:
        return _error(str(e))
    if not gold:
        return _error("reference could not be parsed", parsed_reference=None)
    shown_ref = _shown(gold, reference)
    try:
        pred, how, answer = _extract(response, policy)
    except _Refused as e:
        return _error(str(e), parsed_reference=shown_ref)
    if pred is None:
        return _error(_MISSING[policy], parsed_reference=shown_ref)
    if not pred:
        return _error(f"could not parse the {how} answer", parsed_reference=shown_ref,
                      parsed_response=_echo(answer))
    ok = verify(list(gold), pred, timeout_seconds=None)
    return CheckResult(
        correct=ok, reward=1.0 if ok else 0.0, status="ok",
        parsed_response=_shown(pred, answer), parsed_reference=shown_ref, detail=how,
    )

"""The verification core on real math-verify: a table of equivalence cases with the verdict a
careful human grader would give, plus the answer-extraction rules."""

from __future__ import annotations

import pytest

from services.verifier.extract import final_answer_line, last_boxed
from services.verifier.mathcheck import check_math

B = r"\boxed"

# (response, reference, expected correct). Responses are graded on their final \boxed{} (or,
# without one, the final "answer" line); the reference is a bare answer.
CASES: list[tuple[str, str, bool]] = [
    # integers, fractions, decimals
    (rf"So {B}{{12}}.", "12", True),
    (rf"{B}{{13}}", "12", False),
    (rf"{B}{{-3}}", "-3", True),
    (rf"{B}{{3}}", "-3", False),
    (rf"{B}{{\frac{{1}}{{2}}}}", "0.5", True),
    (rf"{B}{{0.5}}", r"\frac{1}{2}", True),
    (rf"{B}{{1/2}}", r"\frac12", True),
    (rf"{B}{{\dfrac{{3}}{{4}}}}", "0.75", True),
    (rf"{B}{{\tfrac{{3}}{{4}}}}", "3/4", True),
    (rf"{B}{{\frac{{2}}{{4}}}}", r"\frac{1}{2}", True),
    (rf"{B}{{0.3333333}}", r"\frac{1}{3}", True),
    (rf"{B}{{0.33}}", r"\frac{1}{3}", False),
    (rf"{B}{{1.000}}", "1", True),
    (rf"{B}{{1,000}}", "1000", True),
    (rf"{B}{{1001}}", "1000", False),
    (rf"{B}{{\frac{{7}}{{3}}}}", r"2\frac{1}{3}", True),
    # percentages
    (rf"{B}{{10\%}}", "0.1", True),
    (rf"{B}{{0.1}}", r"10\%", True),
    (rf"{B}{{25\%}}", r"\frac{1}{4}", True),
    (rf"{B}{{20\%}}", "0.25", False),
    # radicals, pi, expressions
    (rf"{B}{{\sqrt{{2}}/2}}", r"\frac{1}{\sqrt{2}}", True),
    (rf"{B}{{\frac{{\sqrt{{3}}}}{{2}}}}", r"\frac{\sqrt3}{2}", True),
    (rf"{B}{{\sqrt{{3}}}}", r"\sqrt{2}", False),
    (rf"{B}{{2\pi}}", r"2\pi", True),
    (rf"{B}{{6.28}}", r"2\pi", False),
    (rf"{B}{{(x+1)^2}}", "x^2+2x+1", True),
    (rf"{B}{{x^2+1}}", "x^2+2x+1", False),
    (rf"{B}{{2^{{10}}}}", "1024", True),
    (rf"{B}{{\infty}}", r"\infty", True),
    # equations as answers
    (rf"{B}{{x=5}}", "5", True),
    (rf"{B}{{5}}", "x=5", True),
    (rf"{B}{{x=6}}", "5", False),
    # intervals
    (rf"{B}{{[0,1)}}", "[0,1)", True),
    (rf"{B}{{(0,1]}}", "[0,1)", False),
    (rf"{B}{{(-\infty, 3]}}", r"(-\infty,3]", True),
    (rf"{B}{{\left[ 2, 5 \right)}}", "[2,5)", True),
    (rf"{B}{{[2,5]}}", "[2,5)", False),
    (rf"{B}{{(1,2) \cup (3,4)}}", r"(3,4)\cup(1,2)", True),
    # sets in any order; tuples in order only
    (rf"{B}{{\{{1,2,3\}}}}", r"\{3,2,1\}", True),
    (rf"{B}{{\{{1,2\}}}}", r"\{1,2,3\}", False),
    (rf"{B}{{2, 3}}", "3, 2", True),
    (rf"{B}{{(1,2,3)}}", "(1,2,3)", True),
    (rf"{B}{{(3,2,1)}}", "(1,2,3)", False),
    (rf"{B}{{\left( 3, -1 \right)}}", "(3,-1)", True),
    (rf"{B}{{(-1,3)}}", "(3,-1)", False),
    # LaTeX dressing
    (rf"{B}{{90^\circ}}", "90", True),
    (rf"{B}{{90^{{\circ}}}}", r"90^\circ", True),
    (rf"{B}{{45^\circ}}", "90", False),
    (rf"{B}{{\text{{Monday}}}}", "Monday", True),
    (rf"{B}{{\text{{Tuesday}}}}", "Monday", False),
    (rf"{B}{{5\text{{ cm}}}}", "5", True),
    (rf"{B}{{\$5}}", "5", True),
    (rf"{B}{{\text{{(A)}}}}", "A", True),
    (rf"{B}{{B}}", "A", False),
    (r"\fbox{7}", "7", True),
    (rf"$${B}{{\left(\frac{{1}}{{2}}\right)}}$$", "0.5", True),
    # several \boxed: the last one counts
    (rf"First {B}{{3}}, no wait, {B}{{5}}", "5", True),
    (rf"First {B}{{5}}, no wait, {B}{{3}}", "5", False),
    (rf"{B}{{{B}{{4}}}}", "4", True),
    (rf"{B}{{6}} and a truncated {B}{{7", "6", True),
    # no \boxed: the final answer line
    ("The answer is 12.", "12", True),
    ("Answer: $\\frac{1}{2}$", "0.5", True),
    ("Work...\n#### 72", "72", True),
    ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "1/2", True),
    ("The answer is 11.", "12", False),
    ("I computed 12 somewhere but never committed to it", "12", False),
    ("", "12", False),
    # reference given boxed, too
    (rf"{B}{{12}}", rf"{B}{{12}}", True),
]


@pytest.mark.parametrize(("response", "reference", "expected"), CASES)
def test_equivalence_table(response: str, reference: str, expected: bool) -> None:
    r = check_math(response, reference)
    assert r.correct is expected, (r.status, r.parsed_response, r.parsed_reference, r.detail)
    assert r.reward == (1.0 if expected else 0.0)
    assert r.status in ("ok", "parse_error")


def test_table_is_big_and_balanced() -> None:
    assert len(CASES) >= 60
    assert sum(c[2] for c in CASES) >= 25 and sum(not c[2] for c in CASES) >= 20


def test_missing_answer_is_a_parse_error_not_a_wrong_answer() -> None:
    r = check_math("I computed 12 somewhere but never committed to it", "12")
    assert (r.status, r.correct) == ("parse_error", False)
    assert "no final answer" in r.detail


def test_unparseable_reference_is_reported() -> None:
    r = check_math(rf"{B}{{1}}", "")
    assert r.status == "parse_error" and "reference" in r.detail


def test_overlong_answer_is_refused_before_sympy() -> None:
    r = check_math(B + "{" + "1+" * 2000 + "1}", "4001")
    assert r.status == "parse_error" and "longer than" in r.detail


def test_last_boxed_handles_escaped_braces_and_deep_nesting() -> None:
    assert last_boxed(r"x \boxed{\{1,2\}} y") == r"\{1,2\}"
    deep = "{" * 5000 + "1" + "}" * 5000
    assert last_boxed(rf"\boxed{{{deep}}}") == deep
    assert last_boxed(r"\boxed{1} \boxed{2") == "1"
    assert last_boxed("no box") is None


def test_answer_line_takes_the_last_anchor() -> None:
    assert final_answer_line("answer: 3\nthen\nFinal answer: 4") == "4"
    assert final_answer_line("the answers are many") is None
    r = check_math("answer: 3 \\boxed{9}", "9")  # a box beats an answer line before it
    assert (r.correct, r.detail) == (True, "boxed")

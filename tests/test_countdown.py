"""Countdown task: generator, split, exact checker, solver and solution diversity."""

from __future__ import annotations

import pytest

from tasks import countdown as cd
from tasks import get_task

REF = "numbers=3,5,7,9;target=24"


# --- checker table ---------------------------------------------------------------------------

CORRECT = [
    "9+7=16\n16+5=21\n21+3=24\nAnswer: 24",
    "3+5=8\n9+7=16\n16+8=24\nAnswer: 24",  # same sum, other order and grouping
    "5*3=15\n15+9=24\nAnswer: 24",  # a different path, fewer numbers
    "7-5=2\n9+3=12\n12*2=24\nAnswer: 24",  # another different path
    "  9 + 7 = 16\n\n16+5=21\n21+3=24\nAnswer:24\n",  # spaces and blank lines are fine
]

WRONG = [  # (response, status, words the reason must contain)
    ("9+7=15\n15+9=24\nAnswer: 24", "ok", "wrong arithmetic"),
    ("9+9=18\n18+5=23\nAnswer: 23", "ok", "already used"),  # a given number used twice
    ("7+5=12\n12+12=24\nAnswer: 24", "ok", "already used"),  # a result used twice
    ("8*3=24\nAnswer: 24", "ok", "unknown"),
    ("5-7=2\nAnswer: 2", "ok", "not a positive integer"),
    ("9/7=1\nAnswer: 1", "ok", "not a positive integer"),  # division must be exact
    ("9+7=16\n16+5=21\nAnswer: 21", "ok", "!= target"),
    ("Answer: 24", "ok", "not reached"),  # the answer must come out of the steps
    ("9 plus 7 = 16\n16+5=21\n21+3=24\nAnswer: 24", "parse_error", "malformed"),
    ("5-7=-2\nAnswer: 24", "parse_error", "malformed"),
    ("9+7=16\n16+5=21\n21+3=24", "parse_error", "no 'Answer"),
    ("9+7=16\n16+5=21\n21+3=24\nAnswer: 24\n3+3=6", "parse_error", "after the answer"),
    ("", "parse_error", "empty"),
    ("9+7=16\n16+5=21\n21+3=" + "9" * 5000 + "\nAnswer: 24", "parse_error", "malformed"),
    ("\u0669+7=16\nAnswer: 16", "parse_error", "malformed"),  # an Arabic-Indic 9
]


@pytest.mark.parametrize("response", CORRECT)
def test_checker_accepts_valid_solutions(response):
    r = cd.verify(response, REF)
    assert (r.correct, r.reward, r.status) == (True, 1.0, "ok"), r.detail


@pytest.mark.parametrize("response,status,reason", WRONG)
def test_checker_rejects_with_reason(response, status, reason):
    r = cd.verify(response, REF)
    assert (r.correct, r.reward, r.status) == (False, 0.0, status)
    assert reason in r.detail


def test_checker_bad_reference_is_an_error():
    assert cd.verify("Answer: 1", "24").status == "error"


def test_registered_in_task_registry():
    task = get_task("countdown")
    assert isinstance(task, cd.CountdownTask)
    assert task.verify(CORRECT[0], REF).correct


# --- generator and split ---------------------------------------------------------------------


def test_generate_is_deterministic_under_seed():
    a, b, c = cd.generate(200, seed=1), cd.generate(200, seed=1), cd.generate(200, seed=2)
    assert a == b
    assert [p.key() for p in a] != [p.key() for p in c]


def test_generate_stops_when_knobs_run_out():
    # 2 numbers from 1-3: only a handful of distinct problems exist
    with pytest.raises(ValueError, match="distinct problems"):
        cd.generate(1000, seed=0, num_numbers=2, max_number=3, min_target=1, patience=2000)


def test_generate_respects_knobs():
    ps = cd.generate(300, seed=0, num_numbers=5, max_number=7, min_target=20, max_target=60)
    assert len({p.key() for p in ps}) == 300
    for p in ps:
        assert len(p.numbers) == 5 and all(1 <= x <= 7 for x in p.numbers)
        assert 20 <= p.target <= 60 and p.target not in p.numbers


def test_every_reference_solution_verifies():
    for p in cd.generate(500, seed=3):
        r = cd.verify(p.solution_text(), p.reference())
        assert r.correct, (p, r.detail)
        assert str(p.target) in p.prompt_text() and all(str(x) in p.prompt_text() for x in p.numbers)


def test_splits_never_overlap():
    ps = cd.generate(2000, seed=0)
    train, held = cd.split(ps)
    assert {p.key() for p in train}.isdisjoint(p.key() for p in held)
    assert len(train) + len(held) == len(ps) and 0.05 < len(held) / len(ps) < 0.15
    # datasets drawn with different seeds still never share a problem
    tr = cd.dataset("train", 1000, seed=5)
    ho = cd.dataset("heldout", 200, seed=6)
    assert len(tr) == 1000 and len(ho) == 200
    assert {p.key() for p in tr}.isdisjoint(p.key() for p in ho)
    assert all(cd.split_of(p) == "heldout" for p in ho)


# --- solver and diversity --------------------------------------------------------------------


def test_solver_merges_regroupings_and_keeps_real_alternatives():
    # 6 from 1,2,3: 1+2+3 (in any grouping, one path) and 2*3; 1*2*3 multiplies by 1: skipped
    sols = cd.solve((1, 2, 3), 6)
    assert len(sols) == 2
    assert {tuple(str(s) for s in sol) for sol in sols} >= {("3*2=6",)}


def test_solver_solutions_all_verify_and_differ():
    for p in cd.generate(100, seed=4):
        sols = cd.solve(p.numbers, p.target)
        assert sols, p
        forms = {cd.canonical_form(s, p.numbers) for s in sols}
        assert len(forms) == len(sols)
        assert cd.canonical_form(p.steps, p.numbers) in forms  # the reference is among them
        for s in sols:
            assert cd.verify(cd.render_solution(s, p.target), p.reference()).correct


def test_solve_many_matches_solve():
    ps = cd.generate(300, seed=7)
    assert cd.solve_many(ps) == [cd.solve(p.numbers, p.target) for p in ps]


def test_solution_diversity_default_knobs_and_small_problems():
    share = cd.solution_diversity(cd.generate(400, seed=0))
    assert share >= 0.30
    # the reason for 4 numbers: with 3 numbers from 1-20 few problems have a second path
    small = cd.generate(400, seed=0, num_numbers=3, max_number=20, min_target=1, max_target=1000)
    assert cd.solution_diversity(small) < 0.2

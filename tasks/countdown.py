"""Countdown: reach a target from given numbers with + - * /, each number used at most once.

Why this task: it is exactly checkable, and most problems have several genuinely different
solutions, which is where RLRT's signal lives (a correct student that diverges from the
teacher's demonstration). A response is a few steps, then the answer:

    9-5=4
    4*7=28
    Answer: 28

Every intermediate value must be a positive integer (so division is exact); a step may use
any given number or earlier result, each at most once. The verifier's `reference` is
"numbers=3,5,7,9;target=24": the checker needs nothing else, since any valid path is correct.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

from tasks.base import CheckResult, Task

OPS = "+-*/"


class Step(NamedTuple):
    """One line `a op b = result`, e.g. "5+7=12"."""

    a: int
    op: str
    b: int
    result: int

    def __str__(self) -> str:
        return f"{self.a}{self.op}{self.b}={self.result}"


def apply_op(a: int, op: str, b: int) -> int | None:
    """Result of `a op b`, or None when it is not a positive integer (the task's rule)."""
    if op == "+":
        return a + b
    if op == "*":
        return a * b
    if op == "-":
        return a - b if a > b else None
    if op == "/":
        return a // b if b != 0 and a % b == 0 else None
    raise ValueError(f"unknown op {op!r}")


@dataclass(frozen=True)
class Problem:
    numbers: tuple[int, ...]
    target: int
    steps: tuple[Step, ...]  # the reference solution (one per problem)

    def key(self) -> str:
        """Canonical identity: the same numbers in any order with the same target are one
        problem, so the train/held-out split is decided on this."""
        return ",".join(map(str, sorted(self.numbers))) + f"->{self.target}"

    def prompt_text(self) -> str:
        # Short on purpose: every prompt token costs SFT/RL time on 2 cores. The rules (+ - * /,
        # each number at most once, positive integers) are the task's, learnt from the data.
        return f"Make {self.target} from {' '.join(map(str, self.numbers))}."

    def reference(self) -> str:
        return f"numbers={','.join(map(str, self.numbers))};target={self.target}"

    def solution_text(self) -> str:
        return render_solution(self.steps, self.target)


def render_solution(steps: tuple[Step, ...] | list[Step], target: int) -> str:
    """The response format: one step per line, then "Answer: N"."""
    return "\n".join([*map(str, steps), f"Answer: {target}"])


# ---------------------------------------------------------------------------------------------
# Exact checker
# ---------------------------------------------------------------------------------------------

# ASCII digits only, at most 9 of them: int() would also take other scripts' digits, and a
# response of thousands of digits must be a parse error, not an exception in the verifier.
_NUM = r"([0-9]{1,9})"
_STEP_RE = re.compile(rf"^{_NUM}\s*([-+*/])\s*{_NUM}\s*=\s*{_NUM}$")
_ANSWER_RE = re.compile(rf"^Answer:\s*{_NUM}$")
_REF_RE = re.compile(r"^numbers=([0-9]{1,9}(?:,[0-9]{1,9})*);target=([0-9]{1,9})$")


def parse_reference(reference: str) -> tuple[list[int], int]:
    m = _REF_RE.match(reference.strip())
    if not m:
        raise ValueError(f"bad countdown reference {reference!r}")
    return [int(x) for x in m.group(1).split(",")], int(m.group(2))


def verify(response: str, reference: str) -> CheckResult:
    """Grade one response. Unparseable text (a malformed line, no answer line, text after the
    answer) -> status "parse_error"; a parsed but wrong solution (bad arithmetic, a number not
    available, wrong final value) -> status "ok", reward 0; `detail` always says why."""
    try:
        numbers, target = parse_reference(reference)
    except ValueError as e:
        return CheckResult(correct=False, reward=0.0, status="error", detail=str(e))

    def fail(detail: str, status: Literal["ok", "parse_error"] = "ok", parsed=None) -> CheckResult:
        return CheckResult(
            correct=False, reward=0.0, status=status, detail=detail,
            parsed_response=parsed, parsed_reference=str(target),
        )

    lines = [ln.strip() for ln in response.strip().splitlines() if ln.strip()]
    if not lines:
        return fail("empty response", "parse_error")
    answer_idx = next((i for i, ln in enumerate(lines) if _ANSWER_RE.match(ln)), None)
    if answer_idx is None:
        return fail("no 'Answer: N' line", "parse_error")
    if answer_idx != len(lines) - 1:
        return fail(f"text after the answer: {lines[answer_idx + 1]!r}", "parse_error")
    steps: list[Step] = []
    for ln in lines[:answer_idx]:
        m = _STEP_RE.match(ln)
        if not m:
            return fail(f"malformed step {ln!r}", "parse_error")
        a, op, b, r = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        steps.append(Step(a, op, b, r))
    answer = int(_ANSWER_RE.match(lines[answer_idx]).group(1))

    # Semantic checks, in order, against a pool of what is still unused.
    pool, seen = Counter(numbers), set(numbers)
    for s in steps:
        true = apply_op(s.a, s.op, s.b)
        if true is None:
            return fail(f"{s}: {s.a}{s.op}{s.b} is not a positive integer", parsed=str(answer))
        if true != s.result:
            return fail(f"{s}: wrong arithmetic, {s.a}{s.op}{s.b}={true}", parsed=str(answer))
        for x in (s.a, s.b):  # 5+5 needs two 5s: decrement once per operand
            if pool[x] <= 0:
                why = "already used" if x in seen else "unknown"
                return fail(f"{s}: number {x} {why}", parsed=str(answer))
            pool[x] -= 1
        pool[s.result] += 1
        seen.add(s.result)
    if answer != target:
        return fail(f"answer {answer} != target {target}", parsed=str(answer))
    if pool[answer] <= 0:
        return fail(f"answer {answer} was not reached by the steps", parsed=str(answer))
    return CheckResult(
        correct=True, reward=1.0, status="ok", detail="correct",
        parsed_response=str(answer), parsed_reference=str(target),
    )


# ---------------------------------------------------------------------------------------------
# Solver: every genuinely different solution
# ---------------------------------------------------------------------------------------------
# Two solutions are "the same path" when they differ only by reordering lines, swapping the
# operands of + or *, or regrouping (a+b)+c vs a+(b+c), a-(b-c) vs (a+c)-b, ... So an
# expression's canonical form flattens chains of +/- into (added terms, subtracted terms) and
# chains of * and / into (numerator, denominator), each sorted. Leaves are ("n", value).

Canon = tuple


def _terms(c: Canon, kind: str) -> tuple[tuple, tuple]:
    return (c[1], c[2]) if c[0] == kind else ((c,), ())


def _combine(op: str, ca: Canon, cb: Canon) -> Canon:
    kind = "+" if op in "+-" else "*"
    pa, na = _terms(ca, kind)
    pb, nb = _terms(cb, kind)
    pos, neg = (pa + pb, na + nb) if op in "+*" else (pa + nb, na + pb)
    return (kind, tuple(sorted(pos)), tuple(sorted(neg)))


def canonical_form(steps: tuple[Step, ...] | list[Step], numbers: tuple[int, ...]) -> Canon:
    """Canonical form of a valid solution's final value (steps assumed valid: see `verify`).
    Where a value is available twice, a step takes the most recently produced one."""
    pool: dict[int, list[Canon]] = {}
    for v in numbers:
        pool.setdefault(v, []).append(("n", v))
    for s in steps:
        ca, cb = pool[s.a].pop(), pool[s.b].pop()
        pool.setdefault(s.result, []).append(_combine(s.op, ca, cb))
    return pool[steps[-1].result][-1]


# Forms of one sub-multiset: value -> {canonical form: steps of one representative}.
Forms = dict[int, dict[Canon, tuple[Step, ...]]]


def _merge(out: Forms, fa: dict, fb: dict, va: int, op: str, vb: int, r: int) -> None:
    slot = out.setdefault(r, {})
    for ca, sa in fa.items():
        for cb, sb in fb.items():
            c = _combine(op, ca, cb)
            if c not in slot:  # the larger operand's subtree first: one fixed rendering
                slot[c] = sa + sb + (Step(va, op, vb, r),)


def _pairs(va: int, vb: int, ops: str):
    """(left, op, right, result) for the legal, non-trivial ops on two values. Multiplying or
    dividing by 1 is legal in a response but is skipped here: it would count as a "different"
    solution while adding nothing."""
    a, b = (va, vb) if va >= vb else (vb, va)
    for op in ops:
        if op in "*/" and b == 1:
            continue
        r = apply_op(a, op, b)
        if r is not None:
            yield a, op, b, r


def _splits(mask: int):
    """Unordered splits of `mask` into two non-empty parts (the part with the lowest bit first)."""
    low = mask & -mask
    sub = (mask - 1) & mask
    while sub:
        if sub & low:
            yield sub, mask ^ sub
        sub = (sub - 1) & mask


def _all_forms(numbers: tuple[int, ...], ops: str, targets: set[int] | None = None) -> list[Forms]:
    """Forms of every sub-multiset (by bit mask). With `targets`, the full set (the costliest,
    and only ever needed for the final step) keeps just the targets' forms."""
    n = len(numbers)
    full = (1 << n) - 1
    table: list[Forms] = [{} for _ in range(1 << n)]
    for mask in range(1, 1 << n):
        if mask & (mask - 1) == 0:
            v = numbers[mask.bit_length() - 1]
            table[mask] = {v: {("n", v): ()}}
            continue
        out: Forms = {}
        for left, right in _splits(mask):
            for va, fa in table[left].items():
                for vb, fb in table[right].items():
                    for a, op, b, r in _pairs(va, vb, ops):
                        if targets is not None and mask == full and r not in targets:
                            continue
                        big, small = (fa, fb) if a == va else (fb, fa)
                        _merge(out, big, small, a, op, b, r)
        table[mask] = out
    return table


def _distinct(table: list[Forms], numbers: tuple[int, ...], target: int) -> list[tuple[Step, ...]]:
    # Zero steps (target is a given number) is no solution. With repeated values the text is
    # ambiguous ("4+3=7, 7-2=5, 7*5=35": which 7 is the given one?), so two different trees
    # can print the same; keep one per canonical form *as read back from the text*.
    candidates = [steps for forms in table[1:] for steps in forms.get(target, {}).values() if steps]
    found: dict[Canon, tuple[Step, ...]] = {}
    for steps in sorted(candidates, key=lambda s: (len(s), [str(x) for x in s])):
        found.setdefault(canonical_form(steps, numbers), steps)
    return list(found.values())


def solve(numbers: tuple[int, ...] | list[int], target: int, *, ops: str = OPS) -> list[tuple[Step, ...]]:
    """One representative per genuinely different solution (any subset of the numbers), in a
    fixed order (fewest steps first, then by text). Depends on the numbers as a multiset."""
    numbers = tuple(sorted(numbers))
    return _distinct(_all_forms(numbers, ops, {target}), numbers, target)


def solve_many(problems: list[Problem], *, ops: str = OPS) -> list[list[tuple[Step, ...]]]:
    """`solve` for each problem, sharing the work between problems with the same numbers (with
    4 numbers from 1-12 there are only 1365 multisets, so large datasets repeat them a lot)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault(tuple(sorted(p.numbers)), []).append(i)
    out: list[list[tuple[Step, ...]]] = [[] for _ in problems]
    for numbers, idx in groups.items():
        table = _all_forms(numbers, ops, {problems[i].target for i in idx})
        for i in idx:
            out[i] = _distinct(table, numbers, problems[i].target)
    return out


def solution_diversity(problems: list[Problem], *, ops: str = OPS) -> float:
    """Share of problems with at least two genuinely different solutions."""
    if not problems:
        return 0.0
    return sum(len(s) >= 2 for s in solve_many(problems, ops=ops)) / len(problems)


# ---------------------------------------------------------------------------------------------
# Generator and split
# ---------------------------------------------------------------------------------------------


def _sample(rng: random.Random, num_numbers: int, max_number: int, min_target: int,
            max_target: int, ops: str, min_used: int) -> Problem | None:
    """Draw numbers, then combine k of them (k uniform in [min_used, num_numbers]) in random
    pairs with random legal ops: that path is the reference solution and its result the
    target. None if the draw is rejected."""
    numbers = tuple(rng.randint(1, max_number) for _ in range(num_numbers))
    used = rng.sample(numbers, rng.randint(min(min_used, num_numbers), num_numbers))
    pool: list[tuple[int, tuple[Step, ...]]] = [(v, ()) for v in used]
    while len(pool) > 1:
        i, j = sorted(rng.sample(range(len(pool)), 2), reverse=True)
        (va, sa), (vb, sb) = pool.pop(i), pool.pop(j)
        choices = list(_pairs(va, vb, ops))
        if not choices:
            return None
        a, op, b, r = rng.choice(choices)
        first, second = (sa, sb) if a == va else (sb, sa)
        pool.append((r, first + second + (Step(a, op, b, r),)))
    target, steps = pool[0]
    if not (min_target <= target <= max_target) or target in numbers:
        return None
    return Problem(numbers, target, steps)


def stream(seed: int, *, num_numbers: int = 4, max_number: int = 9, min_target: int = 10,
           max_target: int = 50, min_used: int = 2, ops: str = OPS,
           patience: int = 20_000) -> Iterator[Problem]:
    """Distinct problems, forever, deterministic in `seed` and the knobs. The defaults (about
    13.6k distinct problems, 4 numbers so that most have several different solutions) are what
    `rlrt bootstrap` trains on and what RL uses unless told otherwise. Difficulty knobs:
    more or larger numbers and a wider target range are harder; a target built from fewer
    numbers (`min_used` < num_numbers) is easier; `ops` restricts the operators.
    Raises once `patience` draws in a row found nothing new (the knobs' problems ran out)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    stale = 0
    while stale < patience:
        p = _sample(rng, num_numbers, max_number, min_target, max_target, ops, min_used)
        if p is None or p.key() in seen:
            stale += 1
            continue
        stale = 0
        seen.add(p.key())
        yield p
    raise ValueError(f"these knobs admit only about {len(seen)} distinct problems")


def generate(n: int, seed: int, **knobs) -> list[Problem]:
    """The first `n` problems of `stream(seed, **knobs)`."""
    return list(itertools.islice(stream(seed, **knobs), n))


Split = Literal["train", "heldout"]


def split_of(problem: Problem, heldout_fraction: float = 0.1) -> Split:
    """Decided by a hash of the canonical problem alone, so a problem lands on the same side
    whatever seed or call produced it: the splits can never overlap."""
    h = int.from_bytes(hashlib.sha256(problem.key().encode()).digest()[:8], "big")
    return "heldout" if h / 2**64 < heldout_fraction else "train"


def split(problems: list[Problem], heldout_fraction: float = 0.1) -> tuple[list[Problem], list[Problem]]:
    """(train, heldout) partition of `problems`."""
    train = [p for p in problems if split_of(p, heldout_fraction) == "train"]
    heldout = [p for p in problems if split_of(p, heldout_fraction) == "heldout"]
    return train, heldout


def dataset(which: Split, n: int, seed: int, *, heldout_fraction: float = 0.1,
            **knobs) -> list[Problem]:
    """The first `n` problems of `stream(seed, **knobs)` that fall in split `which`."""
    side = (p for p in stream(seed, **knobs) if split_of(p, heldout_fraction) == which)
    return list(itertools.islice(side, n))


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


class CountdownTask(Task):
    """Countdown as a generator task. `knobs` are `stream`'s difficulty arguments (and
    `heldout_fraction`); "train" and "heldout" never share a problem (see `split_of`)."""

    name = "countdown"

    def generate(self, split: str, n: int, seed: int) -> list[dict]:
        if split not in ("train", "heldout"):
            raise ValueError(f"countdown has splits 'train' and 'heldout', not {split!r}")
        return [{"id": f"countdown:{p.key()}", "prompt": p.prompt_text(),
                 "answer": p.reference(), "solution": p.solution_text()}
                for p in dataset(split, n, seed, **self.knobs)]  # type: ignore[arg-type]

    def verify(self, response: str, reference: str) -> CheckResult:
        return verify(response, reference)

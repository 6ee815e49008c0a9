"""TEST HARNESS: Math-Verify's own published test cases, read from the pinned version's sdist
(scripts/fetch-upstream.sh unpacks its tests/ under .upstream/math_verify/; override the folder
with RLRT_UPSTREAM_DIR). Its tests are pytest files of `@pytest.mark.parametrize("gold, pred,
expected", [...])` functions; the (gold, prediction, expected) tuples are read from them with
`ast` (never imported: they import `tests.test_all`, which is our own `tests` package here),
so the cases are upstream's, never copies in this repository.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.upstream import UPSTREAM

# The files of the suite that grade (gold, prediction) pairs; the others test timeouts, error
# raising and configuration objects, not answers.
FILES = ("test_all.py", "test_boxed.py", "test_numina_cases.py", "test_open_thoughts.py",
         "test_strict.py")


@dataclass(frozen=True)
class Case:
    where: str  # "<file>::<test function>[<index>]"
    gold: str
    pred: str
    expected: bool
    options: dict[str, Any] = field(default_factory=dict, hash=False)  # precision, strict, ...

    @property
    def subset(self) -> str:
        """'boxed' when the prediction holds a \\boxed{}, else 'free' (free-form)."""
        return "boxed" if "\\boxed" in self.pred else "free"


def tests_dir() -> Path:
    d = UPSTREAM / "math_verify"
    if not (d / "VERSION").exists():
        pytest.skip(f"Math-Verify's test suite not fetched into {d}: run "
                    "`bash scripts/fetch-upstream.sh math_verify`")
    return d / "tests"


def version() -> str:
    return (tests_dir().parent / "VERSION").read_text().strip()


def _value(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        # A few cases are f-strings of `math` calls (test_float_precision): evaluate them
        # with `math` and nothing else in scope.
        return eval(compile(ast.Expression(node), "<case>", "eval"), {"__builtins__": {}, "math": math})


def _cases(path: Path) -> list[Case]:
    out: list[Case] = []
    for fn in ast.parse(path.read_text(), filename=str(path)).body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        for dec in fn.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                    and dec.func.attr == "parametrize"):
                continue
            names = [n.strip() for n in ast.literal_eval(dec.args[0]).split(",")]
            assert isinstance(dec.args[1], ast.List), f"{path.name}::{fn.name}: cases not a list"
            for i, node in enumerate(dec.args[1].elts):
                row = dict(zip(names, _value(node), strict=True))
                gold, pred, expected = row.pop("gold"), row.pop("pred"), row.pop("expected")
                out.append(Case(f"{path.name}::{fn.name}[{i}]", gold, pred, bool(expected), row))
    return out


def load() -> list[Case]:
    """Every (gold, prediction, expected) case of FILES, in file order."""
    d = tests_dir()
    cases = [c for f in FILES for c in _cases(d / f)]
    assert len(cases) > 200, f"only {len(cases)} cases in {d}: has the suite's layout changed?"
    return cases

"""Math-Verify's own published test suite (the pinned version's sdist, fetched by
`bash scripts/fetch-upstream.sh math_verify`; skipped without it) through our verifier's REST
API, once per extraction policy, against math-verify's default `verify(parse(gold),
parse(pred))` on the same cases.

The figures are the agreement table of docs/verifier.md (between the `conformance` markers):
the test fails when the table there is not what it measured (RLRT_UPDATE_DOCS=1 rewrites it).
Goals (issue 25): `boxed` agrees on every case whose prediction holds a \\boxed{}; `boxed`
and `dapo` never say "correct" where the suite says wrong; `math_verify` is within 2 cases of
math-verify's default on every subset.

Cases are graded as the suite states them; the few that pass math-verify options our API has
no knob for (precision=2, strict=False, allow_set_relation_comp=True) count against every
column alike.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from support import mathverify_suite
from support.mathverify_suite import Case
from support.verifier_live import live_verifier

from services.verifier.config import VerifierConfig
from services.verifier.pool import VerifyPool
from tasks.math import POLICIES

DOC = Path(__file__).resolve().parents[1] / "docs" / "verifier.md"
BEGIN, END = "<!-- conformance:begin -->", "<!-- conformance:end -->"
SUBSETS = {"boxed": "predictions with `\\boxed`", "free": "free-form predictions"}


@dataclass
class Tally:
    n: int = 0
    agree: int = 0
    false_correct: int = 0

    def add(self, said: bool, expected: bool) -> None:
        self.n += 1
        self.agree += said == expected
        self.false_correct += said and not expected


def math_verify_default(c: Case) -> bool:
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return bool(verify(parse(c.gold), parse(c.pred)))


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    return mathverify_suite.load()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    cfg = VerifierConfig(workers=2, default_timeout_s=20.0, max_timeout_s=30.0, request_budget_s=600.0,
                         consumer=f"conf-{uuid.uuid4().hex[:6]}")
    with VerifyPool(2, kill_grace_s=1.0, memory_mb=1024) as pool, live_verifier(cfg, pool) as live, \
            httpx.Client(base_url=live.url, timeout=900) as c:
        yield c


def grade(client: httpx.Client, cases: list[Case], policy: str) -> list[dict]:
    items = [{"response": c.pred, "reference": c.gold, "policy": policy} for c in cases]
    r = client.post("/v1/verify/batch", json={"items": items})
    assert r.status_code == 200, r.text[:2000]
    results = r.json()["results"]
    # A timeout or a crashed check would make a figure a fact about this machine, not about
    # the policy.
    bad = [(c.where, x["status"], x["detail"]) for c, x in zip(cases, results, strict=True)
           if x["status"] not in ("ok", "parse_error")]
    assert not bad, bad[:10]
    return results


def table(cases: list[Case], said: dict[str, list[bool]]) -> str:
    """The markdown agreement table: per subset, math-verify's default and each policy."""
    tallies: dict[tuple[str, str], Tally] = {}
    for i, c in enumerate(cases):
        for subset in (c.subset, "all"):
            for who, verdicts in said.items():
                tallies.setdefault((subset, who), Tally()).add(verdicts[i], c.expected)
    head = ("| subset | math-verify's default | `boxed` (default) | `math_verify` | `dapo` |\n"
            "|---|---|---|---|---|\n")
    rows = []
    for subset, label in [*SUBSETS.items(), ("all", "all cases")]:
        cells = []
        for who in ("default", *POLICIES):
            t = tallies[(subset, who)]
            cells.append(f"{t.agree}/{t.n} ({t.false_correct} false correct)")
        rows.append(f"| {label} ({tallies[(subset, 'default')].n}) | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def test_math_verify_suite_under_each_policy(cases: list[Case], client: httpx.Client) -> None:
    said = {"default": [math_verify_default(c) for c in cases]}
    for policy in POLICIES:
        said[policy] = [x["correct"] for x in grade(client, cases, policy)]

    def tally(who: str, subset: str | None = None) -> Tally:
        t = Tally()
        for c, v in zip(cases, said[who], strict=True):
            if subset in (None, c.subset):
                t.add(v, c.expected)
        return t

    boxed = tally("boxed", "boxed")
    assert boxed.agree == boxed.n >= 95, [c.where for c, v in zip(cases, said["boxed"], strict=True)
                                          if c.subset == "boxed" and v != c.expected]
    for policy in ("boxed", "dapo"):
        assert tally(policy).false_correct == 0, [c.where for c, v in zip(cases, said[policy], strict=True)
                                                  if v and not c.expected]
    for subset in SUBSETS:
        assert abs(tally("math_verify", subset).agree - tally("default", subset).agree) <= 2, subset

    measured = (f"Math-Verify {mathverify_suite.version()}'s published suite ({', '.join(mathverify_suite.FILES)}; "
                f"{len(cases)} cases), each graded through `POST /v1/verify/batch` with `policy` set; "
                f"cells: cases where the verdict equals the suite's expected one (and how many of "
                f"the others are a false \"correct\").\n\n" + table(cases, said))
    text = DOC.read_text()
    block = re.compile(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), re.DOTALL)
    found = block.search(text)
    assert found, f"docs/verifier.md has no {BEGIN} ... {END} block"
    if found.group(1) != measured:
        if os.environ.get("RLRT_UPDATE_DOCS") == "1":
            DOC.write_text(text[: found.start(1)] + measured + text[found.end(1):])
        else:
            pytest.fail("docs/verifier.md's conformance table differs from what was measured "
                        "(RLRT_UPDATE_DOCS=1 rewrites it):\n" + measured)


def test_cases_are_read_from_the_suite(cases: list[Case]) -> None:
    # The reader must find the suite's cases, both verdicts, and both subsets, or every figure
    # above is about nothing.
    assert len(cases) >= 250
    assert {c.subset for c in cases} == {"boxed", "free"}
    assert sum(c.expected for c in cases) > 150 and sum(not c.expected for c in cases) > 30
    assert any(c.where.startswith("test_open_thoughts.py::") for c in cases)

"""Hostile inputs against a live server: each is answered within its deadline plus a small
margin, and the server stays healthy and correct afterwards."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from support.verifier_live import Live, live_verifier

from services.verifier.config import VerifierConfig
from services.verifier.pool import VerifyPool

DEADLINE = 1.0
GRACE = 0.3
MARGIN = 1.5  # HTTP + scheduling on a loaded 2-core machine


def random_latex(n_bytes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocab = [r"\frac{", "}", "{", "^", "_", r"\sqrt{", r"\boxed{", "$", "$$", r"\left(", r"\right)", "(", ")",
             "[", "]", r"\{", r"\}", "x", "y", "=", "+", "-", r"\cdot", r"\int", r"\sum_{", r"\infty", "!",
             "10", "9", "7", ",", " ", "\n", r"\text{", r"\dfrac{", r"\circ", "%", r"\%", "answer: "]
    out: list[str] = []
    size = 0
    while size < n_bytes:
        tok = rng.choice(vocab) if rng.random() < 0.8 else str(rng.randint(0, 10**6))
        out.append(tok)
        size += len(tok)
    return "".join(out)[:n_bytes]


HOSTILE: dict[str, tuple[str, str]] = {
    "tower of powers": (r"\boxed{10^{10^{10^{10}}}}", "1"),
    "factorial of a huge number": (r"\boxed{(10^{10})!}", "1"),
    "factorial, plain": (r"The answer is 100000000000!", "1"),
    "power in the reference": (r"\boxed{1}", "9^{9^{9^{9}}}"),
    "5,000-deep braces": (r"\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "1"),
    "5,000-deep braces, unclosed": ("{" * 5000 + r"\boxed{" * 5000, "1"),
    "5,000-deep parentheses on the answer line": ("Answer: " + "(" * 5000 + "1" + ")" * 5000, "1"),
    "300-deep fractions": (r"\boxed{" + r"\frac{1}{" * 300 + "2" + "}" * 300 + "}", "1"),
    "60 KiB of random LaTeX": (random_latex(60 * 1024), "1"),
    "60 KiB of random LaTeX, boxed at the end": (random_latex(60 * 1024 - 20, seed=1) + r" \boxed{7}", "7"),
    "NUL and control characters": ("\x00\x01\x02\x1b[31m\\boxed{1\x00}\x7f\x08\r\x0c", "1"),
    "control characters in the reference": (r"\boxed{1}", "1\x00\x1f"),
    "only NULs": ("\x00" * 4096, "\x00"),
}


@pytest.fixture(scope="module")
def live(redis_server) -> Iterator[Live]:
    cfg = VerifierConfig(workers=2, default_timeout_s=DEADLINE, kill_grace_s=GRACE,
                         consumer=f"adv-{uuid.uuid4().hex[:6]}")
    with VerifyPool(2, kill_grace_s=GRACE, memory_mb=1024) as pool, live_verifier(cfg, pool) as lv:
        yield lv


@pytest.fixture
def client(live: Live) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=30) as c:
        yield c


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_answered_in_time(client: httpx.Client, live: Live, name: str) -> None:
    response, reference = HOSTILE[name]
    t0 = time.monotonic()
    r = client.post("/v1/verify", json={"response": response, "reference": reference, "timeout_s": DEADLINE})
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] in ("ok", "timeout", "parse_error", "error")
    assert elapsed < DEADLINE + GRACE + MARGIN, (name, elapsed, body)
    if body["status"] != "ok":
        assert body["reward"] == 0.0 and body["correct"] is False
    # Healthy afterwards: both workers alive (a killed one is replaced), a plain item passes.
    assert client.get("/healthz").status_code == 200
    ok = client.post("/v1/verify", json={"response": r"\boxed{\frac{2}{4}}", "reference": "0.5"}).json()
    assert ok["correct"] is True


def test_hostile_inputs_grade_as_expected(client: httpx.Client) -> None:
    """Not just 'answered': the tower is never 'correct', the late box is found."""
    tower = client.post("/v1/verify", json={"response": HOSTILE["tower of powers"][0], "reference": "1"}).json()
    assert tower["status"] == "timeout"
    late = client.post("/v1/verify", json={"response": HOSTILE["60 KiB of random LaTeX, boxed at the end"][0],
                                           "reference": "7"}).json()
    assert late["correct"] is True
    nul = client.post("/v1/verify", json={"response": HOSTILE["NUL and control characters"][0], "reference": "1"})
    assert nul.status_code == 200


@pytest.mark.parametrize("raw", [
    b'{"response": "\\ud800\\boxed{1}", "reference": "1"}',          # lone high surrogate
    b'{"response": "\\boxed{1}", "reference": "\\udfff"}',           # lone low surrogate
    b'{"response": "\\udc00\\ud800", "reference": "1"}',             # reversed pair
    b'{"response": "\xff\xfe\\boxed{1}", "reference": "1"}',         # not UTF-8 at all
    b'{"response": "\\u0000", "reference": "1", "timeout_s": 1e999}',  # infinite deadline
])
def test_broken_json_text_is_refused_cleanly(client: httpx.Client, raw: bytes) -> None:
    r = client.post("/v1/verify", content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    r.json()  # the error body itself is valid JSON
    assert client.get("/healthz").status_code == 200


def test_batch_of_hostile_inputs_keeps_order_and_pool(client: httpx.Client, live: Live) -> None:
    names = list(HOSTILE)
    items = [{"response": HOSTILE[n][0], "reference": HOSTILE[n][1], "timeout_s": DEADLINE} for n in names]
    items.append({"response": r"\boxed{42}", "reference": "42"})
    r = client.post("/v1/verify/batch", json={"items": items})
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == len(items) and results[-1]["correct"] is True
    deadline = time.monotonic() + 10
    while live.pool.stats().alive < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert live.pool.stats().alive == 2

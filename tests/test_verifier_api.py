"""The REST API on a real uvicorn server (127.0.0.1), real pool, real Redis for jobs."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from support.polling import wait_until
from support.verifier_live import Live, live_verifier

from services.verifier.config import VerifierConfig
from services.verifier.pool import VerifyPool

HUGE = r"\boxed{10^{10^{10^{10}}}}"


def config(**kw: object) -> VerifierConfig:
    base = dict(workers=2, default_timeout_s=5.0, max_timeout_s=10.0, kill_grace_s=0.3, max_batch=64,
                max_request_bytes=1024 * 1024, job_chunk=8, consumer=f"api-{uuid.uuid4().hex[:6]}")
    return VerifierConfig(**{**base, **kw})


POOL_OPTIONS = {"memory_mb": 1024}  # for conftest.py's `pool`


@pytest.fixture(scope="module")
def live(pool: VerifyPool, redis_server) -> Iterator[Live]:
    with live_verifier(config(), pool, redis_url=redis_server.url, prefix=f"api{uuid.uuid4().hex[:8]}") as lv:
        yield lv


@pytest.fixture
def client(live: Live) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=30) as c:
        yield c


def item(resp: str, ref: str, **kw: object) -> dict:
    return {"response": resp, "reference": ref, **kw}


# ---------------------------------------------------------------- happy paths
def test_verify_one(client: httpx.Client) -> None:
    r = client.post("/v1/verify", json=item(r"so \boxed{\dfrac{1}{2}}", "0.5"))
    assert r.status_code == 200
    body = r.json()
    assert body["correct"] is True and body["reward"] == 1.0 and body["status"] == "ok"
    assert body["parsed_response"] == r"\frac{1}{2}" and body["latency_ms"] > 0
    wrong = client.post("/v1/verify", json=item(r"\boxed{3}", "4")).json()
    assert (wrong["correct"], wrong["reward"], wrong["status"]) == (False, 0.0, "ok")


def test_verify_synthetic_task(client: httpx.Client) -> None:
    ref = "numbers=3,5,7,9;target=24"
    good = client.post("/v1/verify", json=item("7+9=16\n16+5=21\n21+3=24\nAnswer: 24", ref, task="countdown"))
    assert good.status_code == 200 and good.json()["correct"] is True
    reused = client.post("/v1/verify", json=item("9-7=2\n5*3=15\n15+9=24\nAnswer: 24", ref, task="countdown"))
    assert (reused.json()["correct"], reused.json()["status"]) == (False, "ok")  # 9 used twice


def test_batch_keeps_input_order(client: httpx.Client) -> None:
    items = [item(rf"\boxed{{{i}}}", str(i if i % 4 else i + 1)) for i in range(40)]
    r = client.post("/v1/verify/batch", json={"items": items})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["correct"] for x in results] == [i % 4 != 0 for i in range(40)]
    assert [x["parsed_response"] for x in results] == [str(i) for i in range(40)]


def test_docs_and_schema(client: httpx.Client) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/verify", "/v1/verify/batch", "/v1/jobs", "/v1/jobs/{job_id}"} <= set(paths)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(("body", "where"), [
    (item("x", "1", task="chess"), "task"),
    (item("x", "1", timeout_s=-1), "timeout_s"),
    (item("x", "1", timeout_s=11), "timeout_s"),
    (item("x", "1", color="red"), "color"),
    ({"response": "x"}, "reference"),
    ({"response": 5, "reference": "1"}, "response"),
])
def test_422_names_the_field(client: httpx.Client, body: dict, where: str) -> None:
    r = client.post("/v1/verify", json=body)
    assert r.status_code == 422
    locs = [e["loc"] for e in r.json()["detail"]]
    assert any(loc[-1] == where for loc in locs), locs


def test_422_on_batches(client: httpx.Client) -> None:
    assert client.post("/v1/verify/batch", json={"items": []}).status_code == 422
    too_many = client.post("/v1/verify/batch", json={"items": [item("x", "1")] * 65})
    assert too_many.status_code == 422 and "at most 64" in too_many.text
    bad = client.post("/v1/verify/batch", json={"items": [item("x", "1"), item("x", "1", task="nope")]})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"][:4] == ["body", "items", 1, "task"]


def test_unpaired_surrogate_is_a_422_not_a_crash(client: httpx.Client) -> None:
    raw = b'{"response": "\\boxed{1} \\ud800", "reference": "1"}'
    r = client.post("/v1/verify", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "surrogate" in r.text
    assert client.post("/v1/verify", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422


def test_413_per_item_and_per_request(client: httpx.Client) -> None:
    big = "x" * (64 * 1024 + 1)
    r = client.post("/v1/verify", json=item(big, "1"))
    assert r.status_code == 413 and "response" in r.text
    r = client.post("/v1/verify/batch", json={"items": [item("y", "1"), item("1", big)]})
    assert r.status_code == 413 and "items.1.reference" in r.text
    # Multi-byte text counts in UTF-8 bytes: 20,000 x 4 bytes is over 64 KiB.
    assert client.post("/v1/verify", json=item("😀" * 20_000, "1")).status_code == 413
    huge_body = {"items": [item("z" * 60_000, "1")] * 20}  # ~1.2 MB > 1 MiB request limit
    assert client.post("/v1/verify/batch", json=huge_body).status_code == 413


# ---------------------------------------------------------------- jobs
def wait_job(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 60) -> dict:
    def reached() -> dict | None:
        body = client.get(f"/v1/jobs/{job_id}").json()
        return body if body["status"] in statuses else None

    return wait_until(reached, timeout, f"job {job_id} to reach {statuses}")


def test_job_lifecycle(client: httpx.Client) -> None:
    items = [item(rf"\boxed{{{i}}}", str(i if i % 5 else -1)) for i in range(30)]
    r = client.post("/v1/jobs", json={"items": items})
    assert r.status_code == 202
    job_id = r.json()["job_id"]
    body = wait_job(client, job_id, {"done", "failed"})
    assert body["status"] == "done"
    assert body["progress"] == {"done": 30, "total": 30}
    assert [x["correct"] for x in body["results"]] == [i % 5 != 0 for i in range(30)]
    # Cancelling a finished job changes nothing.
    assert client.delete(f"/v1/jobs/{job_id}").json()["status"] == "done"


def test_job_cancel(client: httpx.Client) -> None:
    items = [item(HUGE, "1", timeout_s=1)] * 40  # ~20 s of work on 2 workers
    job_id = client.post("/v1/jobs", json={"items": items}).json()["job_id"]
    wait_job(client, job_id, {"running"})
    r = client.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    body = client.get(f"/v1/jobs/{job_id}").json()
    assert body["status"] == "cancelled" and body["results"] is None
    assert body["progress"]["done"] < 40
    # The runner drops the job's queued items: the pool is free again well before the
    # 20 s the job would have taken.
    t0 = time.monotonic()
    assert client.post("/v1/verify/batch", json={"items": [item(r"\boxed{1}", "1")] * 4}).json()["results"][0]["correct"]
    assert time.monotonic() - t0 < 5


def test_unknown_job(client: httpx.Client) -> None:
    assert client.get(f"/v1/jobs/{uuid.uuid4().hex}").status_code == 404
    assert client.delete(f"/v1/jobs/{uuid.uuid4().hex}").status_code == 404
    assert client.get("/v1/jobs/not-an-id").status_code == 422


# ---------------------------------------------------------------- admission, auth, metrics
def test_429_with_retry_after_when_the_queue_is_full(redis_server) -> None:
    with VerifyPool(1, max_queue=2, kill_grace_s=0.3) as small, \
            live_verifier(config(workers=1), small) as lv, httpx.Client(base_url=lv.url, timeout=30) as c:
        blocker = threading.Thread(target=c.post, args=("/v1/verify",), kwargs={"json": item(HUGE, "1", timeout_s=2)})
        blocker.start()
        deadline = time.monotonic() + 10
        while not small.busy_pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        r = c.post("/v1/verify/batch", json={"items": [item(r"\boxed{1}", "1")] * 3})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        blocker.join()
        # Room again: the same request now passes.
        assert c.post("/v1/verify/batch", json={"items": [item(r"\boxed{1}", "1")] * 2}).status_code == 200


def test_bearer_token(pool: VerifyPool) -> None:
    with live_verifier(config(token="s3cret"), pool) as lv, httpx.Client(base_url=lv.url) as c:
        body = item(r"\boxed{1}", "1")
        assert c.post("/v1/verify", json=body).status_code == 401
        assert c.post("/v1/verify", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.post("/v1/verify", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_metrics(client: httpx.Client) -> None:
    client.post("/v1/verify", json=item(r"\boxed{1}", "1"))
    text = client.get("/metrics").text
    for name in ("rlrt_verifier_items_total", "rlrt_verifier_item_seconds_bucket", "rlrt_verifier_pool_restarts_total",
                 "rlrt_verifier_pool_queue_depth", "rlrt_verifier_pool_timeouts_total", "rlrt_http_request_seconds_bucket"):
        assert name in text, name
    assert client.get("/readyz").json()["ready"] is True

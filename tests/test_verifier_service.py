"""The whole service as `rlrt serve verifier` runs it (a child process on 127.0.0.1):
2,000 requests from 32 concurrent clients, and jobs that survive a crash of the service.

Both start real service processes and are marked slow (minutes on a busy 2-core machine); a
160-request (32 clients x 5) version of the load test runs by default."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.polling import wait_until
from support.verifier_live import VerifierProcess

N_CLIENTS = 32


@pytest.fixture
def service(tmp_path: Path, redis_url: str, prefix: str) -> Iterator[VerifierProcess]:
    proc = VerifierProcess(tmp_path, redis_url, prefix, workers=2, kill_grace_s=0.3).start()
    try:
        yield proc
    finally:
        proc.kill()


def request_for(i: int) -> tuple[dict, bool]:
    """A mixed, self-checking workload: request i and the verdict it must get."""
    kind = i % 5
    if kind == 0:
        return {"response": rf"so \boxed{{\frac{{{i}}}{{2}}}}", "reference": str(i / 2)}, True
    if kind == 1:
        return {"response": rf"\boxed{{{i}}}", "reference": str(i + 1)}, False
    if kind == 2:
        return {"response": f"The answer is {i}.", "reference": str(i)}, True
    if kind == 3:
        return {"response": f"{i}+1={i + 1}\nAnswer: {i + 1}", "reference": f"numbers={i},1;target={i + 1}",
                "task": "countdown"}, True
    return {"response": rf"\boxed{{\{{{i},{i + 2}\}}}}", "reference": rf"\{{{i + 2},{i}\}}"}, True


async def _hammer(url: str, n_requests: int) -> tuple[dict[int, dict], int]:
    results: dict[int, dict] = {}
    throttled = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)

    async def client() -> None:
        nonlocal throttled
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            while not queue.empty():
                i = queue.get_nowait()
                body, _ = request_for(i)
                while True:
                    r = await c.post("/v1/verify", json=body)
                    if r.status_code != 429:
                        break
                    throttled += 1  # declared back-pressure: honour Retry-After, then retry
                    assert int(r.headers["retry-after"]) >= 1
                    await asyncio.sleep(int(r.headers["retry-after"]))
                assert r.status_code == 200, (i, r.status_code, r.text)
                results[i] = r.json()

    await asyncio.gather(*(client() for _ in range(N_CLIENTS)))
    return results, throttled


@pytest.mark.parametrize("n_requests", [160, pytest.param(2000, marks=pytest.mark.slow)])
def test_many_requests_from_32_clients(service: VerifierProcess, n_requests: int) -> None:
    results, throttled = asyncio.run(_hammer(service.url, n_requests))
    assert sorted(results) == list(range(n_requests)), "every request answered exactly once"
    wrong = [(i, r) for i, r in results.items() if r["correct"] is not request_for(i)[1] or r["status"] != "ok"]
    assert not wrong, wrong[:5]
    metrics = httpx.get(service.url + "/metrics").text
    served = sum(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith('rlrt_verifier_items_total{path="http"'))
    assert served == n_requests
    assert httpx.get(service.url + "/readyz").status_code == 200


def _wait_job(url: str, job_id: str, pred, timeout: float = 120) -> dict:
    def reached() -> dict | None:
        body = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        return body if pred(body) else None

    return wait_until(reached, timeout, f"job {job_id} to move on")


@pytest.mark.slow
def test_job_survives_a_crash_of_the_service(tmp_path: Path, redis_url: str, prefix: str) -> None:
    # Slow items (each hits its 0.5 s deadline) so the crash lands mid-job.
    slow = {"response": r"\boxed{10^{10^{10^{10}}}}", "reference": "1", "timeout_s": 0.5}
    items = [slow] * 24 + [{"response": rf"\boxed{{{i}}}", "reference": str(i)} for i in range(16)]
    first = VerifierProcess(tmp_path, redis_url, prefix, workers=2, job_chunk=4, kill_grace_s=0.3).start()
    try:
        job_id = httpx.post(first.url + "/v1/jobs", json={"items": items}, timeout=30).json()["job_id"]
        mid = _wait_job(first.url, job_id, lambda b: b["progress"]["done"] >= 4)
        assert mid["status"] == "running" and mid["progress"]["done"] < len(items)
    finally:
        first.kill()  # SIGKILL: no graceful anything
    second = VerifierProcess(tmp_path, redis_url, prefix, workers=2, job_chunk=4, kill_grace_s=0.3)
    second.port, second.url = first.port, first.url  # same address, same consumer name
    second.start()
    try:
        done = _wait_job(second.url, job_id, lambda b: b["status"] in ("done", "failed", "cancelled"))
        assert done["status"] == "done" and done["progress"] == {"done": 40, "total": 40}
        statuses = [r["status"] for r in done["results"]]
        assert statuses[:24] == ["timeout"] * 24
        assert [r["correct"] for r in done["results"][24:]] == [True] * 16
        # A graceful stop (SIGTERM) exits cleanly.
        assert second.terminate() == 0
    finally:
        second.kill()

"""The shared service skeleton on a real uvicorn server: ops endpoints, bearer token, 413,
and a graceful SIGTERM that finishes the in-flight message."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from support.polling import answers, wait_until

from protocol.bus import Bus
from protocol.config import BusSettings
from protocol.messages import WeightUpdate
from rlrt.processes import free_port

REPO = Path(__file__).resolve().parents[1]




@pytest.fixture
def demo(redis_url: str, prefix: str, tmp_path: Path):
    port = free_port()
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-m", "support.demo_service", redis_url, prefix,
                             str(port), str(marker)], cwd=REPO,
                            env={**os.environ,
                                 "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(base + "/healthz"), 60, f"{base} to come up", proc=proc)
        yield base, proc, marker
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ops_endpoints_token_and_body_limit(demo) -> None:
    base, _, _ = demo
    assert httpx.get(base + "/healthz").json()["status"] == "ok"
    assert httpx.get(base + "/readyz").status_code == 200
    assert httpx.post(base + "/v1/pause").status_code == 401
    assert httpx.post(base + "/v1/pause", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.post(base + "/v1/pause", headers={"Authorization": "Bearer s3cret"}).json() == {"paused": True}
    assert httpx.post(base + "/v1/echo", json={"a": "x" * 100}).status_code == 200
    assert httpx.post(base + "/v1/echo", json={"a": "x" * 5000}).status_code == 413

    def chunks():  # no Content-Length: the limit must hold on the streamed body too
        for _ in range(10):
            yield b" " * 200

    r = httpx.post(base + "/v1/echo", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.post(base + "/v1/echo", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    metrics = httpx.get(base + "/metrics").text
    assert 'rlrt_http_requests_total{code="401",route="/v1/pause",service="demo"}' in metrics


async def test_sigterm_finishes_in_flight_message(demo, redis_url: str, prefix: str) -> None:
    base, proc, marker = demo
    bus = Bus.from_url(redis_url, BusSettings(prefix=prefix))
    await bus.publish(f"{prefix}:in", WeightUpdate(run_id="r", version=1, location="x"))
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0
    assert len(await bus.r.xrange(f"{prefix}:out")) == 1  # the in-flight handler completed
    assert await bus.pending(f"{prefix}:in", "g") == 0
    await bus.close()

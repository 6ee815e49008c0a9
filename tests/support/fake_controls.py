"""What both fakes share: a call log, test-only knobs under /_fake, and the misbehaviours a
real engine server shows (refusing, hanging past the client's timeout, broken JSON)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


class Knobs:
    """Test-controlled behaviour. `mode` applies to the inference endpoint only:
    ok | refuse (503) | hang (never answers until the mode changes) | malformed (200 with a
    truncated JSON body)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.busy_flushes = 0  # SGLang: /flush_cache answers 400 this many more times
        self.fail_weight_load: bool | int = False  # disk loads fail: True = all, N = the next N
        self.fail_bucket_at: int | None = None  # the k-th (0-based) NCCL bucket call fails
        self.nan_positions: list[int] = []  # vLLM: prompt positions whose log-prob is NaN
        self.abort_next = 0  # SGLang: the next N /generate calls come back aborted (as by a pause)
        self.calls: list[dict[str, Any]] = []
        self.bucket_calls = 0

    def load_fails(self) -> bool:
        """Whether this disk load is to fail (consumes one of a counted budget)."""
        if self.fail_weight_load is True or self.fail_weight_load is False:
            return bool(self.fail_weight_load)
        if self.fail_weight_load > 0:
            self.fail_weight_load -= 1
            return True
        return False

    def set(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            if not hasattr(self, k) or k in ("calls", "set"):
                raise KeyError(k)
            setattr(self, k, v)


def install_fake_controls(app: FastAPI, knobs: Knobs) -> None:
    @app.middleware("http")
    async def record(request: Request, call_next):  # type: ignore[no-untyped-def]
        if not request.url.path.startswith("/_fake"):
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            knobs.calls.append({"method": request.method, "path": request.url.path,
                                "query": dict(request.query_params), "body": body})
        return await call_next(request)

    @app.post("/_fake/config")
    async def config(values: dict[str, Any]) -> dict:
        try:
            knobs.set(values)
        except KeyError as e:
            return JSONResponse({"error": f"unknown knob {e}"}, 400)
        return {"ok": True}

    @app.get("/_fake/calls")
    async def calls() -> list:
        return knobs.calls

    @app.post("/_fake/reset_calls")
    async def reset_calls() -> dict:
        knobs.calls.clear()
        return {"ok": True}


async def misbehave(knobs: Knobs) -> Response | None:
    """Apply the inference-endpoint mode. None = behave normally."""
    if knobs.mode == "refuse":
        return Response("Service Unavailable", status_code=503)
    if knobs.mode == "malformed":
        return Response(b'{"text": "trunc', status_code=200, media_type="application/json")
    if knobs.mode == "hang":
        while knobs.mode == "hang":  # held until a test changes the mode
            await asyncio.sleep(0.02)
        # The client gave up long ago: answer without doing the work, so released requests
        # do not compete with the ones that follow.
        return Response("released after hanging", status_code=503)
    return None


def json_with_nan(content: Any, status_code: int = 200) -> Response:
    """JSON that may contain NaN/Infinity literals, as Python servers emit them."""
    return Response(json.dumps(content, allow_nan=True), status_code=status_code,
                    media_type="application/json")


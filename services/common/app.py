"""The FastAPI skeleton every service shares: health, readiness, Prometheus metrics, a bearer
token for control endpoints, and a request-body size limit (413) that holds even for chunked
uploads."""

from __future__ import annotations

import hmac
import inspect
import time
from collections.abc import Awaitable, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter("rlrt_http_requests_total", "HTTP requests", ["service", "route", "code"])
LATENCY = Histogram("rlrt_http_request_seconds", "HTTP request latency", ["service", "route"],
                    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

Ready = Callable[[], bool | dict | Awaitable[bool | dict]]


class BodyLimit:
    """ASGI middleware: refuse bodies above `max_bytes` with 413 before the app parses them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                if v.isdigit() and int(v) > self.max_bytes:
                    await self._reject(send)
                    return
                # The server enforces the declared length, so the body cannot exceed it.
                await self.app(scope, receive, send)
                return
        # No Content-Length (chunked upload): read it here, bounded, then replay it.
        chunks: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            chunk = msg.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        resp = JSONResponse({"detail": f"request body exceeds {self.max_bytes} bytes"}, 413)
        await send({"type": "http.response.start", "status": 413, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})


async def require_token(request: Request) -> None:
    """Dependency for control endpoints: `Authorization: Bearer <token>` when a token is set."""
    token = getattr(request.app.state, "token", None)
    if not token:
        return
    got = request.headers.get("authorization", "")
    scheme, _, value = got.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


ControlAuth = Depends(require_token)


def create_app(name: str, *, token: str | None = None, max_body_bytes: int = 16 * 1024 * 1024,
               ready: Ready | None = None, version: str = "0.1.0") -> FastAPI:
    """A FastAPI app with /healthz, /readyz and /metrics. Add routes to it; mark control
    routes with `dependencies=[ControlAuth]`."""
    app = FastAPI(title=f"rlrt {name}", version=version)
    app.state.token = token
    app.state.service = name

    @app.middleware("http")
    async def _metrics(request: Request, call_next):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        LATENCY.labels(name, path).observe(time.perf_counter() - start)
        REQUESTS.labels(name, path, str(response.status_code)).inc()
        return response

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI's default 422 echoes every bad input back: an input holding a lone surrogate
        # then cannot be encoded (the 422 becomes a 500) and a huge input comes back whole.
        # Where and why is what a client needs.
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        """Liveness: the process serves HTTP."""
        return {"status": "ok", "service": name}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> Response:
        """Readiness: the service can do its work (model loaded, Redis reachable, ...)."""
        ok, extra = True, {}
        if ready is not None:
            res = ready()
            res = await res if inspect.isawaitable(res) else res
            # A dict is {"ready": bool, **details} (e.g. "redis": false while the REST path
            # still serves).
            ok, extra = (bool(res.get("ready")), res) if isinstance(res, dict) else (bool(res), {})
        return JSONResponse({**extra, "ready": ok, "service": name},
                            status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        """Prometheus metrics of this process."""
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app

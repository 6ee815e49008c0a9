"""The FastAPI skeleton every service shares: health, readiness, Prometheus metrics, a bearer
token for control endpoints, a request-body size limit (413) that holds even for chunked
uploads, a deadline on receiving the body (408), and error bodies that never echo inputs.

Security defaults (docs/deploy.md, "Security defaults"): a service without a token serves only
on a loopback address (`check_exposure`, called by `serve`)."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from protocol.config import PLACEHOLDER_SECRETS, secret_value

log = logging.getLogger("rlrt.http")

REQUESTS = Counter("rlrt_http_requests_total", "HTTP requests", ["service", "route", "code"])
LATENCY = Histogram("rlrt_http_request_seconds", "HTTP request latency", ["service", "route"],
                    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

Ready = Callable[[], bool | dict | Awaitable[bool | dict]]

# Error bodies stay small whatever the input: a 1 MB field name or value must not come back.
MAX_ERRORS = 20
MAX_ERROR_TEXT = 200


def clip(text: object, limit: int = MAX_ERROR_TEXT) -> str:
    """`text` cut to `limit` characters (with how much was cut), for error bodies and logs."""
    s = str(text)
    return s if len(s) <= limit else f"{s[:limit]}... ({len(s) - limit} more characters)"


def bounded_errors(errors: list[Any] | tuple[Any, ...]) -> list[dict[str, Any]]:
    """A validation error list as a 422 body: where, why and the error type of at most
    MAX_ERRORS errors, each part clipped; never the input (FastAPI's default echoes it, so an
    input with a lone surrogate turns the 422 into a 500 and a huge one comes back whole)."""
    out = [{"loc": [p if isinstance(p, int) else clip(p, 64) for p in e.get("loc", ())],
            "msg": clip(e.get("msg", "")), "type": clip(e.get("type", ""), 64)}
           for e in errors[:MAX_ERRORS]]
    if len(errors) > MAX_ERRORS:
        out.append({"loc": [], "msg": f"... and {len(errors) - MAX_ERRORS} more errors",
                    "type": "too_many_errors"})
    return out


class BodyLimit:
    """ASGI middleware: refuse bodies above `max_bytes` with 413 before the app parses them,
    and drop a body that has not fully arrived `timeout_s` after the request began with 408
    (a client that sends half a body would otherwise hold a connection and its buffers for
    ever). The body is read here, bounded, and replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.max_bytes:
                await self._reject(send, 413, f"request body exceeds {self.max_bytes} bytes")
                return
        chunks: list[bytes] = []
        seen = 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                msg = await asyncio.wait_for(receive(), max(left, 0.0))
            except TimeoutError:
                await self._reject(send, 408, f"request body not received within {self.timeout_s:g} s")
                return
            if msg["type"] != "http.request":
                return  # the client went away: nobody to answer
            chunk = msg.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:  # chunked upload (no Content-Length) past the limit
                await self._reject(send, 413, f"request body exceeds {self.max_bytes} bytes")
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

    async def _reject(self, send: Send, status: int, detail: str) -> None:
        # The unread rest of the body (if any) makes the server close the connection after this.
        resp = JSONResponse({"detail": detail}, status)
        await send({"type": "http.response.start", "status": status, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})


class UnsafeBind(RuntimeError):
    """A service was asked to serve its control endpoints beyond loopback without a token."""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; 0.0.0.0, :: and every other address are not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def check_exposure(app: FastAPI, host: str) -> None:
    """Refuse to serve without a token on a non-loopback address (anyone who could reach the
    port could pause the service or swap its weights), and say at start-up which it is."""
    name = app.state.service
    if app.state.token:
        log.info("%s: /v1/* requires a bearer token", name)
        return
    if not is_loopback(host):
        raise UnsafeBind(
            f"{name}: refusing to serve /v1/* on {host} without a token: set {name}.token "
            f"(env RLRT_{name.upper()}__TOKEN) or bind a loopback address (127.0.0.1)")
    log.warning("%s: no token; /v1/* is open to every local process on %s (loopback only)",
                name, host)


async def require_token(request: Request) -> None:
    """Dependency for control endpoints: `Authorization: Bearer <token>` when a token is set
    (a service without one serves only on loopback: `check_exposure`)."""
    token = getattr(request.app.state, "token", None)
    if not token:
        return
    got = request.headers.get("authorization", "")
    scheme, _, value = got.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


ControlAuth = Depends(require_token)


def create_app(name: str, *, token: SecretStr | str | None = None,
               max_body_bytes: int = 16 * 1024 * 1024, body_timeout_s: float = 30.0,
               ready: Ready | None = None, version: str = "0.1.0") -> FastAPI:
    """A FastAPI app with /healthz, /readyz and /metrics. Add routes to it; mark control
    routes with `dependencies=[ControlAuth]`."""
    plain = secret_value(token) or None
    if plain is not None and plain.strip().lower() in PLACEHOLDER_SECRETS:
        raise ValueError(f"{name}: the token is still the placeholder of deploy/rlrt.env.example")
    app = FastAPI(title=f"rlrt {name}", version=version)
    app.state.token = plain
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

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout_s=body_timeout_s)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse({"detail": bounded_errors(exc.errors())}, status_code=422)

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

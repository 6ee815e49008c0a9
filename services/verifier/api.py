"""The verifier's REST API (FastAPI; OpenAPI at /docs). Routes only: the checking happens in
the pool, the job state in jobs.JobStore.

Each /v1/verify(/batch) request is one pool request: it gets a fair share of the workers,
at most `request_budget_s` in total, and is cancelled (queued items dropped, a running one
killed) as soon as its client disconnects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common import create_app, require_token
from services.common.app import Ready, bounded_errors
from services.verifier import metrics
from services.verifier.config import VerifierConfig
from services.verifier.jobs import JOB_ID_PATTERN, JobStore
from services.verifier.pool import Item, PoolClosed, QueueFull, Verdict, VerifyPool
from services.verifier.schemas import (
    BatchRequest,
    BatchResult,
    JobCreated,
    JobRequest,
    JobState,
    VerifyRequest,
    VerifyResult,
)
from tasks import rewards

T = TypeVar("T")

_ERRORS = {
    413: {"description": "an item or the whole request is above the configured size limit"},
    422: {"description": "invalid input; `detail` lists each bad field with the reason"},
    429: {"description": "the verification queue is full; retry after `Retry-After` seconds"},
}
_JOB_ERRORS = {404: {"description": "no such job (never existed or expired)"},
               503: {"description": "the job store (Redis) is unavailable"}}


class _AsciiJSON(JSONResponse):
    """JSON with non-ASCII escaped: always encodable, whatever text a message quotes."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _invalid(loc: tuple, msg: str, kind: str = "value_error") -> RequestValidationError:
    # Same shape as FastAPI's own 422s, so clients parse one format.
    return RequestValidationError([{"loc": ("body", *loc), "msg": msg, "type": kind}])


def to_items(cfg: VerifierConfig, reqs: Sequence[VerifyRequest], loc: tuple = (),
             reward: rewards.Spec | None = None) -> list[Item]:
    """Apply the size and deadline limits (413/422), resolve default deadlines and math
    extraction policies, and attach the reward plug-ins (`reward`) to the items that ask for them."""
    items = []
    for i, r in enumerate(reqs):
        where = (*loc, i) if loc else ()
        for field in ("response", "reference"):
            text: str = getattr(r, field)
            # Cheap bound first: a str of n code points takes at most 4n UTF-8 bytes.
            if len(text) * 4 > cfg.max_item_bytes and len(text.encode()) > cfg.max_item_bytes:
                name = ".".join(str(p) for p in (*where, field))
                metrics.REJECTED.labels("item_too_large").inc()
                raise HTTPException(413, f"{name} is above the {cfg.max_item_bytes}-byte limit per item")
        if r.timeout_s is not None and r.timeout_s > cfg.max_timeout_s:
            raise _invalid((*where, "timeout_s"), f"must be <= {cfg.max_timeout_s:g} (max_timeout_s)",
                           "less_than_equal")
        if r.reward and reward is None:
            raise _invalid((*where, "reward"), "this verifier has no reward plug-ins (no `reward:` "
                           "section in its config)")
        items.append(Item(task=r.task, response=r.response, reference=r.reference,
                          timeout_s=r.timeout_s or cfg.default_timeout_s,
                          reward=reward if r.reward else None, row=(r.row or {}) if r.reward else None,
                          policy=cfg.math_policy_for(r.task, r.row, r.policy)))
    return items


async def _auth(request: Request) -> None:
    # The shared `require_token` is async, so the check stays on the event loop.
    await require_token(request)


def _result(v: Verdict) -> VerifyResult:
    r = VerifyResult.model_validate(v.model_dump())
    if v.reward_error:  # the exception's own line; the whole traceback is the bus worker's
        last = v.reward_error.strip().splitlines()[-1]
        r.detail = f"{r.detail}: {last[:300]}"
    return r


# A job-store call waits at most this long for Redis, then answers 503 (the bus itself would
# keep retrying for bus.reconnect_timeout_s: right for workers, too long for an HTTP client).
JOB_STORE_WAIT_S = 5.0


async def _store(call: Awaitable[T]) -> T:
    try:
        return await asyncio.wait_for(call, JOB_STORE_WAIT_S)
    except asyncio.TimeoutError:
        raise RedisTimeoutError(f"no answer from Redis within {JOB_STORE_WAIT_S:g} s") from None


class ClientGone(Exception):
    """The client disconnected before its verdicts were ready (its work was cancelled)."""


async def _disconnected(request: Request) -> None:
    """Return when the client hangs up. The body was read already, so the next ASGI message
    is the disconnect. (Starlette's `is_disconnected()` polls with a cancelled scope, which
    never sees it through the metrics middleware.)"""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except RuntimeError:  # an ASGI stack that cannot tell: never report a disconnect
        await asyncio.Event().wait()


async def run_for_client(request: Request, pool: VerifyPool, items: list[Item],
                         budget_s: float) -> list[Verdict]:
    """Verify `items` as one pool request, cancelled the moment the client goes away."""
    work = asyncio.ensure_future(pool.run(items, budget_s=budget_s))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        raise ClientGone()
    finally:
        gone.cancel()
        work.cancel()  # pool.run cancels its request: nothing keeps running for nobody


def build_app(cfg: VerifierConfig, pool: VerifyPool, jobs: JobStore | None = None,
              ready: Ready | None = None, reward: rewards.Spec | None = None) -> FastAPI:
    """The verifier app: common health/metrics/limits plus the /v1 routes. `reward`: the
    run's reward plug-ins, for requests that set `reward: true`."""
    app = create_app("verifier", token=cfg.token, max_body_bytes=cfg.max_request_bytes,
                     body_timeout_s=cfg.body_timeout_s,
                     ready=ready or (lambda: pool.ready))
    metrics.track(pool)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_auth)], tags=["verify"])

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Location, reason and type, each clipped (services/common/app.py): never the input.
        return _AsciiJSON({"detail": bounded_errors(exc.errors())}, 422)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        metrics.REJECTED.labels("queue_full").inc()
        return JSONResponse({"detail": str(exc)}, 429, headers={"Retry-After": str(max(1, round(exc.retry_after_s)))})

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        metrics.REJECTED.labels("client_gone").inc()
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(PoolClosed)
    async def _closed(request: Request, exc: PoolClosed) -> JSONResponse:
        return JSONResponse({"detail": "verifier is shutting down"}, 503, headers={"Retry-After": "5"})

    @app.exception_handler(RedisError)
    async def _redis_down(request: Request, exc: RedisError) -> JSONResponse:
        return JSONResponse({"detail": f"job store unavailable: {type(exc).__name__}"}, 503,
                            headers={"Retry-After": "5"})

    @v1.post("/verify", response_model=VerifyResult, responses=_ERRORS)
    async def verify_one(req: VerifyRequest, request: Request) -> VerifyResult:
        """Grade one response. Answers within the item's deadline (plus a small margin)."""
        (verdict,) = await run_for_client(request, pool, to_items(cfg, [req], reward=reward),
                                           cfg.request_budget_s)
        metrics.observe("http", [verdict])
        return _result(verdict)

    @v1.post("/verify/batch", response_model=BatchResult, responses=_ERRORS)
    async def verify_batch(req: BatchRequest, request: Request) -> BatchResult:
        """Grade up to `max_batch` items in parallel; results come back in input order."""
        if len(req.items) > cfg.max_batch:
            raise _invalid(("items",), f"at most {cfg.max_batch} items per batch (got {len(req.items)}); "
                           "use /v1/jobs for more", "too_long")
        verdicts = await run_for_client(request, pool, to_items(cfg, req.items, ("items",), reward),
                                        cfg.request_budget_s)
        metrics.observe("http", verdicts)
        return BatchResult(results=[_result(v) for v in verdicts])

    if jobs is not None:
        job_id_param = Path(pattern=JOB_ID_PATTERN, description="32 hex digits, as returned by POST /v1/jobs")

        @v1.post("/jobs", status_code=202, response_model=JobCreated, responses={**_ERRORS, **_JOB_ERRORS},
                 tags=["jobs"])
        async def create_job(req: JobRequest) -> JobCreated:
            """Queue a verification job (kept in Redis for `job_ttl_s`; survives restarts)."""
            if len(req.items) > cfg.max_job_items:
                raise _invalid(("items",), f"at most {cfg.max_job_items} items per job", "too_long")
            items = to_items(cfg, req.items, ("items",), reward)
            job_id = await _store(jobs.create([i.__dict__ for i in items]))
            return JobCreated(job_id=job_id)

        @v1.get("/jobs/{job_id}", response_model=JobState, responses=_JOB_ERRORS, tags=["jobs"])
        async def get_job(job_id: str = job_id_param) -> JobState:
            """Status and progress; `results` (in input order) once the job is done."""
            state = await _store(jobs.get(job_id))
            if state is None:
                raise HTTPException(404, f"no job {job_id}")
            return state

        @v1.delete("/jobs/{job_id}", response_model=JobState, responses=_JOB_ERRORS, tags=["jobs"])
        async def cancel_job(job_id: str = job_id_param) -> JobState:
            """Cancel a queued or running job (items already verified keep their results).
            A finished job is returned unchanged."""
            state = await _store(jobs.cancel(job_id))
            if state is None:
                raise HTTPException(404, f"no job {job_id}")
            return state

    app.include_router(v1)
    return app

"""The control API both engine services mount (rollout and teacher), bearer token required:

    POST /v1/weights  {version, format: safetensors_dir|nccl, location, sha256, meta, canary}
                      (protocol.messages.WeightUpdate, checked as WeightUpdateRequest)
    POST /v1/pause    POST /v1/resume    GET /v1/version

Status codes of /v1/weights (the trainer acts on them):
- 200 `{"version", "previous", "seconds"}`: the new weights serve.
- 409 refused -- hash mismatch, missing files, stale version, bad nccl metadata, a failed
  load the engine undid: the old version keeps serving (`version` in the body says which;
  `consistent: false` means the engine could not undo a partial update and serves nothing
  until the next successful update).
- 502 the engine server failed (timeout, 5xx); 503 the engine is not up yet; 422/413 bad body.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from protocol.messages import WeightUpdateRequest
from protocol.trace import span
from services.common import ControlAuth
from services.common.app import clip
from services.engines.base import (
    Engine,
    EngineClosed,
    EngineError,
    InvalidRequest,
    WeightUpdateError,
)
from services.engines.canary_check import canary_fields

log = logging.getLogger("rlrt.control")


class EngineSlot:
    """The service's engine, which may still be starting (a remote server not up yet, a model
    still loading). Control calls answer 503 and workers wait until it is there."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.error: str | None = None
        self._ready = asyncio.Event()

    def set(self, engine: Engine) -> None:
        self.engine = engine
        self.error = None
        self._ready.set()

    async def wait(self, stop: asyncio.Event) -> Engine | None:
        """The engine, or None if `stop` is set first."""
        waiter = asyncio.ensure_future(self._ready.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()
        return self.engine if self._ready.is_set() else None


def _unavailable(slot: EngineSlot) -> JSONResponse:
    return JSONResponse({"detail": f"engine not ready: {slot.error or 'starting'}"}, 503)


def control_router(slot: EngineSlot, name: str = "engine") -> APIRouter:
    """`name`: the service's row of the step timeline (protocol/trace.py), where each weight
    load is a "load" span: work of the step, not idle."""
    router = APIRouter(prefix="/v1", dependencies=[ControlAuth], tags=["control"])
    lock = asyncio.Lock()  # one weight update at a time; later ones queue behind it

    @router.post("/weights")
    async def weights(req: WeightUpdateRequest) -> JSONResponse:
        """Load new weights atomically, or keep the old ones and say why."""
        engine = slot.engine
        if engine is None:
            return _unavailable(slot)
        async with lock:
            previous = engine.version
            # A resumed trainer goes back to its checkpoint's version and says so explicitly.
            if req.version < previous and not req.meta.get("allow_rollback"):
                return JSONResponse({"detail": f"stale update: version {req.version} < serving "
                                     f"{previous}", "version": previous}, 409)
            start = time.perf_counter()
            try:
                with span(name, "load"):
                    version = await engine.update_weights(req)
            except EngineClosed as e:
                return JSONResponse({"detail": clip(e, 1000)}, 503)
            except (WeightUpdateError, InvalidRequest) as e:
                verdict = canary_fields(e)  # a weight canary mismatch: say by how much
                log.warning("weight update to v%d refused: %s", req.version, clip(e, 2000))
                return JSONResponse({"detail": clip(e, 1000), "version": engine.version,
                                     "consistent": getattr(engine, "consistent", True),
                                     **verdict}, 409)
            except EngineError as e:
                log.error("weight update to v%d failed upstream: %s", req.version, clip(e, 2000))
                return JSONResponse({"detail": clip(e, 1000), "version": engine.version,
                                     "consistent": getattr(engine, "consistent", True)}, 502)
        seconds = round(time.perf_counter() - start, 3)
        log.info("weights v%d -> v%d in %.2fs (%s)", previous, version, seconds, req.format)
        return JSONResponse({"version": version, "previous": previous, "seconds": seconds})

    @router.post("/pause")
    async def pause() -> JSONResponse:
        """Stop starting new generate/score work (running work finishes) until /v1/resume."""
        if slot.engine is None:
            return _unavailable(slot)
        await slot.engine.pause()
        return JSONResponse({"paused": True, "version": slot.engine.version})

    @router.post("/resume")
    async def resume() -> JSONResponse:
        if slot.engine is None:
            return _unavailable(slot)
        await slot.engine.resume()
        return JSONResponse({"paused": False, "version": slot.engine.version})

    @router.get("/version")
    async def version() -> JSONResponse:
        """The serving version and the engine's state (paused, consistent, NCCL group...)."""
        if slot.engine is None:
            return JSONResponse({"version": None, "ready": False, "error": slot.error}, 503)
        health = await slot.engine.health()
        return JSONResponse({"version": slot.engine.version, "ready": bool(health.get("ok")),
                             "paused": bool(health.get("paused")), "engine": health})

    return router

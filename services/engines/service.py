"""The process both engine services share: HTTP (health, metrics, control API) + one bus
worker, around one engine.

Start-up order does not matter: the HTTP server answers at once (/readyz = 503), the engine is
built in the background and retried while its server (SGLang/vLLM container) is not up yet,
and the worker starts consuming only when the engine is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from pydantic import SecretStr

from protocol.bus import Bus
from protocol.config import BusSettings, redact_url
from services.common import create_app, serve
from services.engines.base import Engine, UpstreamError
from services.engines.config import EngineConfig, EngineServiceConfig
from services.engines.control_api import EngineSlot, control_router
from services.engines.factory import make_engine

log = logging.getLogger("rlrt.service")
ConsumeFn = Callable[[Bus, Engine, asyncio.Event], Awaitable[object]]


async def build_engine(slot: EngineSlot, cfg: EngineConfig, stop: asyncio.Event,
                       retry_s: float = 5.0) -> Engine | None:
    """make_engine, retried while the server does not answer (UpstreamError). Anything else
    (a bad model path, a bad config) is fatal and propagates."""
    while not stop.is_set():
        try:
            engine = await make_engine(cfg)
        except UpstreamError as e:
            slot.error = str(e)
            log.warning("engine not reachable yet (%s); retrying in %.0fs", e, retry_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), retry_s)
            continue
        slot.set(engine)
        log.info("%s engine ready at version %d", cfg.kind, engine.version)
        return engine
    return None


def build_service_app(name: str, slot: EngineSlot, bus: Bus | None, *,
                      token: SecretStr | str | None, max_body_bytes: int,
                      body_timeout_s: float = 30.0):  # noqa: ANN201 - FastAPI app
    async def ready() -> bool:
        if slot.engine is None:
            return False
        try:
            ok = bool((await slot.engine.health()).get("ok"))
            # reachable(): one short PING, not a wait through the bus's reconnect budget.
            return ok and (bus is None or await bus.reachable())
        except Exception:  # readiness never raises: it answers 503
            return False

    app = create_app(name, token=token, max_body_bytes=max_body_bytes,
                     body_timeout_s=body_timeout_s, ready=ready)
    app.include_router(control_router(slot, name))
    app.state.engine_slot = slot
    return app


async def serve_engine_service(name: str, cfg: EngineServiceConfig, bus_cfg: BusSettings | None,
                               consume: ConsumeFn, stop: asyncio.Event | None = None) -> None:
    """Run the `name` service (rollout or teacher) until `stop` (or SIGTERM/SIGINT): the control
    API plus `consume(bus, engine, stop)` once the engine is up. Without Redis only the HTTP
    side runs."""
    stop = stop or asyncio.Event()
    bus_cfg = bus_cfg or BusSettings()
    engine_cfg, redis_url = cfg.engine, cfg.redis_url or bus_cfg.redis_url
    slot = EngineSlot()
    bus = Bus.from_url(redis_url, bus_cfg) if redis_url else None

    async def worker(s: asyncio.Event) -> None:
        engine = await build_engine(slot, engine_cfg, s, cfg.engine_retry_s)
        if engine is None or bus is None:
            if bus is None:
                log.warning("no Redis URL: %s serves the control API only", name)
                await s.wait()
            return
        await consume(bus, engine, s)

    async def shutdown() -> None:
        if slot.engine is not None:
            await slot.engine.close()
        if bus is not None:
            await bus.close()

    app = build_service_app(name, slot, bus, token=cfg.token, max_body_bytes=cfg.max_body_bytes,
                            body_timeout_s=cfg.body_timeout_s)
    log.info("%s on http://%s:%d (engine %s, redis %s)", name, cfg.host, cfg.port,
             engine_cfg.kind, redact_url(redis_url))
    await serve(app, cfg.host, cfg.port, [worker], stop=stop, on_shutdown=shutdown)

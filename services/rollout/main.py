"""`rlrt serve rollout`: control API + the PromptTask -> RolloutGroup worker."""

from __future__ import annotations

import asyncio

from protocol.bus import Bus
from protocol.config import BusSettings
from services.common import setup_logging
from services.engines.base import Engine
from services.engines.service import serve_engine_service
from services.rollout import worker
from services.rollout.config import RolloutConfig


async def serve_rollout(cfg: RolloutConfig, bus_cfg: BusSettings | None = None,
                        stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT)."""
    bus_cfg = bus_cfg or BusSettings()

    async def consume(bus: Bus, engine: Engine, s: asyncio.Event) -> None:
        await worker.consume(bus, engine, s, in_stream=bus_cfg.stream(cfg.in_stream),
                             out_stream=bus_cfg.stream(cfg.out_stream), group=cfg.group,
                             consumer=cfg.consumer, concurrency=cfg.concurrency)

    await serve_engine_service("rollout", cfg, bus_cfg, consume, stop)


def run_rollout(cfg: RolloutConfig, bus_cfg: BusSettings | None = None) -> None:
    """Blocking entry point of `rlrt serve rollout --config FILE [--host H] [--port P]`."""
    setup_logging()
    asyncio.run(serve_rollout(cfg, bus_cfg))

"""`rlrt serve teacher`: control API + the VerifiedGroup -> ScoredGroup worker."""

from __future__ import annotations

import asyncio
from typing import Any

from protocol.bus import Bus
from protocol.config import BusSettings, ConfigError
from services.common import setup_logging
from services.engines.base import Engine
from services.engines.service import serve_engine_service
from services.teacher import worker
from services.teacher.config import TeacherConfig


def load_tokenizer(cfg: TeacherConfig) -> Any:
    path = cfg.tokenizer_path or cfg.engine.model_path
    if not path:
        raise ConfigError("teacher needs a tokenizer: set teacher.tokenizer_path or "
                          "teacher.engine.model_path")
    from transformers import AutoTokenizer  # heavy import, only when serving

    return AutoTokenizer.from_pretrained(path)


async def serve_teacher(cfg: TeacherConfig, bus_cfg: BusSettings | None = None,
                        stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT)."""
    bus_cfg = bus_cfg or BusSettings()
    tokenizer = await asyncio.to_thread(load_tokenizer, cfg)

    async def consume(bus: Bus, engine: Engine, s: asyncio.Event) -> None:
        await worker.consume(bus, engine, tokenizer, s, in_stream=bus_cfg.stream(cfg.in_stream),
                             out_stream=bus_cfg.stream(cfg.out_stream), group=cfg.group,
                             consumer=cfg.consumer, concurrency=cfg.concurrency,
                             version_retries=cfg.version_retries)

    await serve_engine_service("teacher", cfg, bus_cfg, consume, stop)


def run_teacher(cfg: TeacherConfig, bus_cfg: BusSettings | None = None) -> None:
    """Blocking entry point of `rlrt serve teacher --config FILE [--host H] [--port P]`."""
    setup_logging()
    asyncio.run(serve_teacher(cfg, bus_cfg))

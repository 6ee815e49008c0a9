"""A minimal service built on services.common for the skeleton tests: an app with one
control route and a bus worker whose handler is slow, so SIGTERM lands mid-handler."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from fastapi import FastAPI

from protocol.bus import Bus
from protocol.config import BusSettings
from protocol.messages import WeightUpdate, derive_id
from services.common import ControlAuth, create_app, run_service


def build_app(token: str | None) -> FastAPI:
    app = create_app("demo", token=token, max_body_bytes=1024, ready=lambda: True)

    @app.post("/v1/pause", dependencies=[ControlAuth])
    async def pause() -> dict:
        return {"paused": True}

    @app.post("/v1/echo")
    async def echo(body: dict) -> dict:
        return body

    return app


def main(url: str, prefix: str, port: int, marker: str) -> None:
    bus = Bus.from_url(url, BusSettings(prefix=prefix, block_ms=50))

    async def handler(m: WeightUpdate) -> None:
        Path(marker).write_text("in handler")
        await asyncio.sleep(0.5)  # the test sends SIGTERM meanwhile; we must still finish
        await bus.publish(f"{prefix}:out", m.model_copy(update={"msg_id": derive_id(m.msg_id, "o")}))

    async def worker(stop: asyncio.Event) -> None:
        await bus.consume(f"{prefix}:in", "g", "demo", handler, WeightUpdate, stop)

    run_service(build_app("s3cret"), "127.0.0.1", port, [worker])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])

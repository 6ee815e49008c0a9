"""A consumer process for the crash tests: handles one message from `<prefix>:in`, and hangs
inside the handler (before or after publishing its output) so the test can SIGKILL it there."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from protocol.bus import Bus
from protocol.config import BusSettings
from protocol.messages import WeightUpdate, derive_id


async def main(url: str, prefix: str, marker: str, when: str) -> None:
    bus = Bus.from_url(url, BusSettings(prefix=prefix, claim_idle_ms=60_000))

    async def handler(msg: WeightUpdate) -> None:
        if when == "after_publish":
            out = msg.model_copy(update={"msg_id": derive_id(msg.msg_id, "out")})
            await bus.publish(f"{prefix}:out", out)
        Path(marker).write_text(msg.msg_id)
        await asyncio.Event().wait()  # hang here until killed

    await bus.consume(f"{prefix}:in", "g", "doomed", handler, WeightUpdate, asyncio.Event())


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))

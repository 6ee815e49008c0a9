"""Pause a CPU engine's worker inside a decode step, for tests that must act mid-generation."""

from __future__ import annotations

import asyncio
import threading


class HoldDecode:
    """Blocks the engine's worker inside its next decode forward until released, so a test
    can act while rows are provably mid-generation (no timing assumptions)."""

    def __init__(self, engine) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.handle = engine.model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, _module, args, _out) -> None:
        if args[0].shape[1] == 1 and not self.release.is_set():
            self.entered.set()
            self.release.wait(timeout=60)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 60)

    def done(self) -> None:
        self.release.set()
        self.handle.remove()

"""Handles on the fake engine servers the conftest fixtures start (`fake_sglang`,
`fake_vllm`) and on the weight directories they load (`weights_v1`, `weights_v2`)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from support.fake_sglang import FakeSGLang
from support.fake_vllm import FakeVLLM


@dataclass
class Weights:
    path: str
    sha256: str
    version: int


@dataclass
class Fake:
    """A running fake server: its URL, its object (for the model) and a client for /_fake."""

    url: str
    server: FakeSGLang | FakeVLLM

    def config(self, **knobs: object) -> None:
        httpx.post(f"{self.url}/_fake/config", json=knobs, timeout=10).raise_for_status()

    def calls(self, prefix: str = "/") -> list[dict]:
        out = httpx.get(f"{self.url}/_fake/calls", timeout=10).json()
        return [c for c in out if c["path"].startswith(prefix)]

    def paths(self) -> list[str]:
        return [c["path"] for c in self.calls() if c["path"] not in ("/health",)]

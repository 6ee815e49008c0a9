"""Settings of a local run as a whole (section `run`): where it writes, its name and seed."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from protocol.config import RLRTSettings


class RunSettings(RLRTSettings):
    section: ClassVar[str] = "run"
    model_config = SettingsConfigDict(env_prefix="RLRT_RUN__")

    name: str = Field("rlrt", description="run name (also the Redis key prefix when none is set)")
    dir: str = Field("runs/default", description="run directory: logs, metrics, checkpoints, Redis AOF")
    seed: int = Field(0, description="seed for data, sampling and initialisation")
    control_token: str | None = Field(
        None, description="bearer token for services' control endpoints; None: generated per run"
    )

"""Rollout settings: section `rollout` of the run's YAML, env `RLRT_ROLLOUT__<FIELD>`
(nested: `RLRT_ROLLOUT__ENGINE__URL`). Shared fields: services.engines.config.EngineServiceConfig."""

from __future__ import annotations

import socket
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.engines.config import EngineServiceConfig


class RolloutConfig(EngineServiceConfig):
    """Everything `rlrt serve rollout` needs besides the bus section."""

    section: ClassVar[str] = "rollout"
    model_config = SettingsConfigDict(env_prefix="RLRT_ROLLOUT__")

    port: int = Field(8310, ge=0, le=65535, description="HTTP port")
    in_stream: str = Field("prompts", description="PromptTask stream (under the bus prefix)")
    out_stream: str = Field("rollouts", description="RolloutGroup stream (under the bus prefix)")
    group: str = Field("rollout", description="consumer group shared by all rollout replicas")
    consumer: str = Field(
        default_factory=lambda: f"rollout-{socket.gethostname()}",
        description="this replica's consumer name: stable across restarts, unique per replica")

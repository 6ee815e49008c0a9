"""Rollout settings: section `rollout` of the run's YAML, env `RLRT_ROLLOUT__<FIELD>`
(nested: `RLRT_ROLLOUT__ENGINE__URL`). Shared fields: services.engines.config.EngineServiceConfig."""

from __future__ import annotations

import socket
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from protocol.topology import default_port, stage
from services.engines.config import EngineServiceConfig


class RolloutConfig(EngineServiceConfig):
    """Everything `rlrt serve rollout` needs besides the bus section."""

    section: ClassVar[str] = "rollout"
    model_config = SettingsConfigDict(env_prefix="RLRT_ROLLOUT__")

    port: int = Field(default_port("rollout"), ge=0, le=65535, description="HTTP port")
    group: str = Field(stage("rollout").group, description="consumer group shared by all rollout replicas")
    consumer: str = Field(
        default_factory=lambda: f"rollout-{socket.gethostname()}",
        description="this replica's consumer name: stable across restarts, unique per replica")

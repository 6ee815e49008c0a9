"""Rollout settings: section `rollout` of the run's YAML, env `RLRT_ROLLOUT__<FIELD>`
(nested: `RLRT_ROLLOUT__ENGINE__URL`)."""

from __future__ import annotations

import socket
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from protocol.config import RLRTSettings
from services.engines.config import EngineConfig


class RolloutConfig(RLRTSettings):
    """Everything `rlrt serve rollout` needs besides the bus section."""

    section: ClassVar[str] = "rollout"
    model_config = SettingsConfigDict(env_prefix="RLRT_ROLLOUT__")

    # --- HTTP (health, metrics, control API) ------------------------------------------------
    host: str = Field("127.0.0.1", description="bind address (loopback by default)")
    port: int = Field(8310, ge=0, le=65535, description="HTTP port")
    token: str | None = Field(None, description="bearer token required on /v1/* (control) when set")
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024,
        description="413 above this request body size (an nccl update lists every tensor)")

    # --- engine -------------------------------------------------------------------------------
    engine: EngineConfig = Field(
        default_factory=lambda: EngineConfig(kind="cpu", model_path="runs/bootstrap/model"),
        description="cpu (built-in) or a running SGLang server (GPU); see EngineConfig")
    engine_retry_s: float = Field(5.0, gt=0, description="wait between attempts to reach the engine server")

    # --- bus worker ---------------------------------------------------------------------------
    redis_url: str | None = Field(None, description="None = the bus section's redis_url")
    in_stream: str = Field("prompts", description="PromptTask stream (under the bus prefix)")
    out_stream: str = Field("rollouts", description="RolloutGroup stream (under the bus prefix)")
    group: str = Field("rollout", description="consumer group shared by all rollout replicas")
    consumer: str = Field(
        default_factory=lambda: f"rollout-{socket.gethostname()}",
        description="this replica's consumer name: stable across restarts, unique per replica")
    concurrency: int = Field(
        8, ge=1, description="PromptTasks sampled at once; the engine batches them together")

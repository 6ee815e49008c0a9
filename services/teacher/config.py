"""Teacher settings: section `teacher` of the run's YAML, env `RLRT_TEACHER__<FIELD>`
(nested: `RLRT_TEACHER__ENGINE__URL`). Shared fields: services.engines.config.EngineServiceConfig."""

from __future__ import annotations

import socket
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from protocol.topology import default_port, stage
from services.engines.config import EngineServiceConfig


class TeacherConfig(EngineServiceConfig):
    """Everything `rlrt serve teacher` needs besides the bus section."""

    section: ClassVar[str] = "teacher"
    model_config = SettingsConfigDict(env_prefix="RLRT_TEACHER__")

    port: int = Field(default_port("teacher"), ge=0, le=65535, description="HTTP port")
    tokenizer_path: str | None = Field(
        None, description="tokenizer (with chat template) that renders teacher contexts; None = "
        "engine.model_path. Must be the policy's tokenizer: contexts are scored as token ids")
    group: str = Field(stage("teacher").group, description="consumer group shared by all teacher replicas")
    consumer: str = Field(
        default_factory=lambda: f"teacher-{socket.gethostname()}",
        description="this replica's consumer name: stable across restarts, unique per replica")
    version_retries: int = Field(
        3, ge=0, description="re-score a group whose scoring overlapped a weight update this often")

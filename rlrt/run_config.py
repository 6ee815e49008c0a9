"""Settings of a local run as a whole (section `run`): where it writes, how `rlrt train`
supervises its processes, and the held-out evaluation around training."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from protocol.config import RLRTSettings


class RunSettings(RLRTSettings):
    section: ClassVar[str] = "run"
    model_config = SettingsConfigDict(env_prefix="RLRT_RUN__")

    name: str = Field("rlrt", description="run name (shown in logs and the report)")
    dir: str = Field("runs/default", description="run directory: logs, Redis AOF, report")
    seed: int = Field(0, description="seed of the bootstrap model and the held-out evaluation")
    control_token: str | None = Field(
        None, description="bearer token for the services' control endpoints; None: a fresh "
        "random token per run, given to every process of the run",
    )
    bootstrap: bool = Field(
        True, description="when trainer.model_path does not exist, build and SFT-train the tiny "
        "Countdown model there first (`rlrt bootstrap`)",
    )
    bootstrap_steps: int = Field(900, ge=1, description="SFT steps of that bootstrap")
    start_timeout_s: float = Field(300.0, gt=0, description="how long a service may take to become ready")
    max_restarts: int = Field(
        2, ge=0, description="a service process that dies is restarted (and given the current "
        "weights) at most this many times; then the run stops with a resumable checkpoint",
    )
    eval_prompts: int = Field(200, ge=0, description="held-out prompts evaluated before and after training (0 = skip)")
    eval_k: int = Field(4, ge=1, description="samples per held-out prompt (avg@k, pass@k)")
    eval_temperature: float = Field(1.0, ge=0, description="sampling temperature of that evaluation")
    eval_top_p: float = Field(1.0, gt=0, le=1, description="top-p of that evaluation")
    eval_max_new_tokens: int = Field(64, ge=1, description="response cap of that evaluation")

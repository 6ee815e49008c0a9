"""Verifier settings: section `verifier` of the run's YAML, env `RLRT_VERIFIER__<FIELD>`."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from protocol.config import RLRTSettings, Secret
from protocol.topology import StageStreams, default_port, stage
from tasks.math import POLICY_HELP, MathPolicy

# The column of a dataset row that names where the row comes from (verl's convention: its
# parquet files carry it, e.g. "math_dapo", "numina_olympiads"); math_policy_by_source keys on it.
SOURCE_FIELD = "data_source"


class VerifierConfig(StageStreams, RLRTSettings):
    """Everything `rlrt serve verifier` needs besides the bus section."""

    section: ClassVar[str] = "verifier"
    model_config = SettingsConfigDict(env_prefix="RLRT_VERIFIER__")

    # --- HTTP -------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="bind address of the REST API (loopback by default)")
    port: int = Field(default_port("verifier"), ge=0, le=65535,
                      description="REST API port (0 = any free port)")
    token: Secret | None = Field(
        None, description="bearer token required on /v1/* when set (health and metrics stay open)"
    )
    http: bool = Field(True, description="serve the REST API")

    # --- pool -------------------------------------------------------------------------------
    workers: int = Field(
        default_factory=lambda: max(1, os.cpu_count() or 1), ge=1,
        description="checker processes; one per core (checks are CPU-bound)",
    )
    default_timeout_s: float = Field(5.0, gt=0, description="per-item deadline when a request sets none")
    max_timeout_s: float = Field(60.0, gt=0, description="largest per-item deadline a request may ask for")
    kill_grace_s: float = Field(
        0.5, ge=0,
        description="after deadline + grace a worker that has not answered is killed and replaced "
        "(the in-worker timer normally answers at the deadline itself)",
    )
    memory_mb: int = Field(
        1024, ge=0,
        description="address-space allowance per item above a worker's idle size (RLIMIT_AS); 0 = no cap",
    )
    ipc_batch: int = Field(16, ge=1, le=1024, description="most items sent to a worker per round trip")
    max_items_per_worker: int = Field(
        20_000, ge=1, description="a worker is replaced after this many items (sheds sympy cache growth)"
    )
    max_worker_rss_mb: int = Field(
        512, ge=0,
        description="a worker whose resident memory is above this after a batch is replaced "
        "(sympy's caches grow with hostile input; an idle worker is ~70 MB); 0 = never",
    )
    worker_start_budget_s: float = Field(
        120.0, gt=0,
        description="a worker that cannot be (re)started for this long is a permanent fault: the "
        "service exits with the reason (its supervisor restarts it) instead of hanging the run",
    )
    request_budget_s: float = Field(
        30.0, gt=0,
        description="total time one /v1/verify or /v1/verify/batch request may take; items not "
        "checked by then answer 'timeout' (per-item deadlines alone let 38 slow items take 50 s)",
    )

    # --- math answers ---------------------------------------------------------------------------
    math_policy: MathPolicy = Field(
        "boxed", description="where a 'math' answer is taken from (the extraction policy), "
        "unless the prompt's data source or the request names another: " + POLICY_HELP,
    )
    math_policy_by_source: dict[str, MathPolicy] = Field(
        default_factory=dict,
        description=f"per data source: the value of a prompt's `{SOURCE_FIELD}` column -> its "
        "extraction policy (e.g. {math_dapo: dapo, numina_olympiads: math_verify}); a prompt "
        "whose source is not listed, or that has none, gets math_policy",
    )

    # --- admission limits ---------------------------------------------------------------------
    max_item_bytes: int = Field(64 * 1024, ge=1, description="413 above this size of one response or reference (UTF-8)")
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1, description="413 above this request body size")
    body_timeout_s: float = Field(
        30.0, gt=0, description="408 when a request body has not fully arrived this long after "
        "the request began (a half-sent body is dropped, not held open)")
    max_batch: int = Field(1024, ge=1, description="most items in one /v1/verify/batch request")
    max_job_items: int = Field(100_000, ge=1, description="most items in one /v1/jobs submission")
    max_queue: int = Field(
        4096, ge=1,
        description="HTTP requests that would push the pool's queue past this get 429 + Retry-After",
    )

    # --- jobs ---------------------------------------------------------------------------------
    job_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="a job's state and results live this long in Redis")
    job_chunk: int = Field(64, ge=1, description="items a job runner verifies (and saves) at a time")
    job_concurrency: int = Field(2, ge=1, description="jobs this process runs at once")

    # --- bus worker ---------------------------------------------------------------------------
    redis_url: str | None = Field(
        None, description="Redis for jobs and the worker; None = the bus section's redis_url"
    )
    worker: bool = Field(True, description="consume RolloutGroups from the bus")
    group: str = Field(stage("verifier").group, description="consumer group shared by all verifier replicas")
    consumer: str = Field(
        default_factory=lambda: f"verifier-{socket.gethostname()}",
        description="this replica's consumer name; keep it stable across restarts (pending work "
        "is then resumed at once instead of after the bus's claim_idle_ms) and unique per replica",
    )
    concurrency: int = Field(8, ge=1, description="RolloutGroups verified at once by the worker")

    def math_policy_for(self, task: str, row: Mapping[str, Any] | None = None,
                        requested: str | None = None) -> str | None:
        """The extraction policy of one item: the request's own, else its row's data source's,
        else math_policy; None for a task that is not "math" (its checker has no policy)."""
        if task != "math":
            return None
        if requested is not None:
            return requested
        source = (row or {}).get(SOURCE_FIELD)
        return self.math_policy_by_source.get(source, self.math_policy) if isinstance(source, str) \
            else self.math_policy

"""Engine settings, nested as `engine:` in the rollout and teacher sections
(env `RLRT_ROLLOUT__ENGINE__URL=...`, `RLRT_TEACHER__ENGINE__KIND=vllm`, ...)."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.canary import DEFAULT_TOLERANCE
from protocol.config import TINY_MODEL, RLRTSettings, Secret
from protocol.topology import StageStreams

# What a CPU host needs to start vLLM's CPU build (docs/engines.md, "A real vLLM on the CPU"):
# float32 (the CPU kernels' reference dtype), a short window so the KV cache stays small, and no
# graph compilation (minutes of start-up for no gain at this size).
VLLM_CPU_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager"]


class EngineLaunch(BaseModel):
    """`rlrt train` / `rlrt eval` start the engine server themselves, wait for it and stop it
    with the run (rlrt/engine_servers.py). Only vLLM is launched this way (SGLang needs a GPU)."""

    model_config = ConfigDict(extra="forbid")

    python: str = Field(
        ".venv-vllm/bin/python", description="interpreter of the server's own venv "
        "(`bash scripts/setup-vllm.sh` builds .venv-vllm); relative paths are from the "
        "directory `rlrt train` runs in")
    model: str | None = Field(
        None, description="model directory the server loads; None = engine.model_path, "
        "else trainer.model_path")
    host: str = Field("127.0.0.1", description="bind address of the server (loopback by default)")
    port: int = Field(0, ge=0, le=65535, description="server port; 0 = any free port")
    args: list[str] = Field(
        default_factory=lambda: list(VLLM_CPU_ARGS), description="extra command-line "
        "arguments of the server; the default fits vLLM's CPU build (on GPUs: e.g. "
        "['--dtype', 'bfloat16', '--weight-transfer-config', '{\"backend\":\"nccl\"}'])")
    env: dict[str, str] = Field(
        default_factory=lambda: {"VLLM_CPU_KVCACHE_SPACE": "1"}, description="extra environment "
        "of the server (VLLM_SERVER_DEV_MODE=1 is always set: weight updates need it); "
        "VLLM_CPU_KVCACHE_SPACE = GiB of KV cache on the CPU build")
    start_timeout_s: float = Field(
        900.0, gt=0, description="how long the server may take to answer /health "
        "(vLLM's CPU build: about 1-2 min on 2 cores)")
    worker_extension: bool = Field(
        True, description="start the server with our worker extension "
        "(services/engines/vllm_ext) and update weights through it: a plain reload_weights "
        "leaves a tied output projection stale on vLLM-CPU (docs/engines.md)")


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["cpu", "sglang", "vllm"] = Field(
        "cpu", description="cpu: the built-in engine in this process; sglang/vllm: a running "
        "server at `url` (rollout uses SGLang, teacher vLLM on GPUs; either works for either)")
    model_path: str | None = Field(
        None, description="HF model directory. cpu: the model to load. sglang/vllm: optional, "
        "read for vocab size and context window (client-side input checks) and the tokenizer")
    url: str | None = Field(None, description="base URL of the SGLang/vLLM server, e.g. http://127.0.0.1:30000")
    api_key: Secret | None = Field(
        default_factory=lambda: os.environ.get("RLRT_ENGINE_API_KEY") or None, validate_default=True,
        description="bearer token of the SGLang/vLLM server (their --api-key); sent on every "
        "call. Default: RLRT_ENGINE_API_KEY, the variable the images' server scripts read, so "
        "the server and the worker beside it share one key")
    request_timeout_s: float = Field(
        600.0, gt=0, description="one generate/score HTTP call; long generations need minutes")
    connect_timeout_s: float = Field(5.0, gt=0, description="TCP connect timeout to the server")
    weight_update_timeout_s: float = Field(
        900.0, gt=0, description="one weight-update call (a disk load, an NCCL rendezvous or bucket)")
    context_len: int | None = Field(
        None, ge=2, description="context window; None = the server's max_model_len (/v1/models) "
        "or model_path's max_position_embeddings")
    vocab_size: int | None = Field(
        None, ge=2, description="None = model_path's config.json; unknown = the server checks ids")
    verify_weights: bool = Field(
        True, description="check a weight directory's manifest and sha256 before loading it; "
        "turn off only when the directory is not visible from this service (the server loads it)")
    quarantine_wait_s: float = Field(
        300.0, gt=0, description="after a failed update left the server's weights unusable, "
        "requests wait this long for a successful update before failing (then the bus retries)")
    abort_retries: int = Field(
        3, ge=0, description="SGLang: regenerate a group aborted by a weight update's pause this often")
    flush_retries: int = Field(60, ge=1, description="SGLang: flush_cache attempts while it is busy")
    flush_interval_s: float = Field(1.0, ge=0, description="SGLang: wait between flush_cache attempts")
    logprobs_mode: Literal["processed", "raw"] = Field(
        "processed", description="what the server's sampling log-probs are (see services/engines/sglang.py)")
    served_model_name: str | None = Field(
        None, description="vLLM: the `model` field of requests; None = the server's first model")
    max_tokens_per_request: int = Field(
        16384, ge=1, description="vLLM scoring: token budget of one /v1/completions batch "
        "(prompt log-probs cost a full-vocabulary log-softmax per token)")
    engine_world_size: int = Field(
        1, ge=1, description="GPUs of the server in an NCCL update group (the trainer's group is "
        "1 + this); used only when the server does not report its own (vLLM GET "
        "/get_world_size: TP x PP x DP; SGLang GET /server_info tp_size)")
    canary_check: bool = Field(
        True, description="score a weight update's canary (the trainer's log-probs of a few fixed "
        "sequences, protocol/canary.py) after loading it, and refuse the version when any "
        "differs by more than canary_tolerance: the server reported success but serves other "
        "weights (e.g. vLLM-CPU's stale tied output projection). Updates without one are not checked")
    canary_tolerance: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_TOLERANCE), description="max |log-prob difference| "
        "per dtype; the coarser of the pushed weights' dtype and serving_dtype applies. "
        "Defaults: float32 1e-3, float16 0.25, bfloat16 1.0 (correct loads measure ~1e-5 in "
        "float32, up to 0.48 bf16 vs float32; a stale tensor is of order 1)")
    serving_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="sglang/vllm: the dtype the server computes in (its --dtype), when it "
        "is coarser than the pushed weights (picks the canary tolerance); None = the pushed "
        "weights' dtype. cpu: the engine's own dtype is used")
    vllm_reload_method: str = Field(
        "reload_weights", description="vLLM: the worker method /collective_rpc calls for a disk "
        "update. 'rlrt_reload_weights' needs the server started with our worker extension "
        "(services/engines/vllm_ext/rlrt_vllm_ext.py): it also refreshes a tied output "
        "projection, which vLLM-CPU's reload_weights leaves stale (docs/engines.md)")
    cpu: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments of the CPU engine "
        "(see services/engines/cpu.py)")
    launch: EngineLaunch | None = Field(
        None, description="vllm: `rlrt train`/`rlrt eval` start this server and fill in `url` "
        "(see EngineLaunch); None = the server is already running at `url`")
    share_rollout_server: bool = Field(
        False, description="teacher only: score on the rollout service's server instead of one "
        "of its own (RLRT's teacher is the current policy, so one server and one weight load "
        "per step serve both). The rollout service loads each pushed version; this service "
        "only waits until the server reports it. `rlrt train` fills in `url`")

    @model_validator(mode="after")
    def _complete(self) -> EngineConfig:
        if self.kind == "cpu" and not self.model_path:
            raise ValueError("engine.kind=cpu needs engine.model_path")
        if self.kind == "cpu" and (self.launch is not None or self.share_rollout_server):
            raise ValueError("engine.launch and engine.share_rollout_server need kind sglang or vllm")
        if self.kind == "sglang" and self.launch is not None:
            raise ValueError("engine.launch starts vLLM only; start SGLang yourself (engine.url)")
        # With `launch` or `share_rollout_server` the launcher sets the URL (RLRT_*__ENGINE__URL).
        if self.kind in ("sglang", "vllm") and not (self.url or self.launch
                                                    or self.share_rollout_server):
            raise ValueError(f"engine.kind={self.kind} needs engine.url (or engine.launch)")
        return self


class EngineServiceConfig(StageStreams, RLRTSettings):
    """What the rollout and teacher services share: HTTP, the engine, the bus worker.
    Subclasses set the section; their port, streams and consumer group are their row of the
    pipeline table (protocol/topology.py)."""

    # --- HTTP (health, metrics, control API) ------------------------------------------------
    host: str = Field("127.0.0.1", description="bind address (loopback by default)")
    port: int = Field(ge=0, le=65535, description="HTTP port; default: the stage's "
                      "(protocol/topology.py)")
    token: Secret | None = Field(
        None, description="bearer token required on /v1/* (control). Unset: the service starts "
        "only when `host` is a loopback address (anyone who reaches it could swap its weights)")
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024,
        description="413 above this request body size (an nccl update lists every tensor)")
    body_timeout_s: float = Field(
        30.0, gt=0, description="408 when a request body has not fully arrived this long after "
        "the request began (a half-sent body is dropped, not held open)")

    # --- engine -------------------------------------------------------------------------------
    engine: EngineConfig = Field(
        default_factory=lambda: EngineConfig(kind="cpu", model_path=TINY_MODEL),
        description="cpu (built-in; default model: where `rlrt bootstrap` writes) or a running "
        "SGLang/vLLM server (GPU); see EngineConfig")
    engine_retry_s: float = Field(5.0, gt=0, description="wait between attempts to reach the engine server")

    # --- bus worker ---------------------------------------------------------------------------
    redis_url: str | None = Field(None, description="None = the bus section's redis_url")
    group: str = Field(description="consumer group shared by all replicas of the service")
    consumer: str = Field(description="this replica's consumer name: stable across restarts, unique per replica")
    concurrency: int = Field(8, ge=1, description="messages handled at once; the engine batches them together")

"""`make_engine(cfg)`: the engine a service runs, from its `engine:` settings."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from services.engines.base import Engine, UpstreamError
from services.engines.config import EngineConfig
from services.engines.http import EngineHTTP


def model_dims(model_path: str | None) -> tuple[int | None, int | None]:
    """(vocab_size, max_position_embeddings) from an HF config.json, when there is one."""
    if not model_path:
        return None, None
    p = Path(model_path) / "config.json"
    if not p.is_file():
        return None, None
    try:
        cfg: dict[str, Any] = json.loads(p.read_text())
    except ValueError:
        return None, None
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the LM's
    vocab = cfg.get("vocab_size")
    ctx = cfg.get("max_position_embeddings")
    return (int(vocab) if vocab else None), (int(ctx) if ctx else None)


async def make_engine(cfg: EngineConfig) -> Engine:
    """Build and start the engine. Remote engines contact their server here (its version and
    context window), so a wrong URL fails at startup with a clear UpstreamError."""
    if cfg.kind == "cpu":
        from services.engines.cpu import CpuEngine  # torch + transformers: import only if used

        kw: dict[str, Any] = {"logprobs_mode": cfg.logprobs_mode, "max_model_len": cfg.context_len,
                              "canary_check": cfg.canary_check,
                              "canary_tolerance": cfg.canary_tolerance}
        kw.update(cfg.cpu)  # explicit CPU knobs win
        # Loading the model takes a while: keep the event loop (HTTP health) responsive.
        return await asyncio.to_thread(CpuEngine, cfg.model_path, **kw)  # type: ignore[arg-type]
    if not cfg.url:
        raise UpstreamError(f"engine.url is not set: `rlrt train` fills it in when it starts the "
                            f"{cfg.kind} server (engine.launch / share_rollout_server); a service "
                            "started on its own needs engine.url")
    vocab, ctx = model_dims(cfg.model_path)
    http = EngineHTTP(cfg.url or "", timeout_s=cfg.request_timeout_s,
                      connect_timeout_s=cfg.connect_timeout_s, api_key=cfg.api_key, name=cfg.kind)
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size or vocab, context_len=cfg.context_len or ctx,
        verify_weights=cfg.verify_weights, weight_timeout_s=cfg.weight_update_timeout_s,
        abort_retries=cfg.abort_retries, engine_world_size=cfg.engine_world_size,
        quarantine_wait_s=cfg.quarantine_wait_s, canary_check=cfg.canary_check,
        canary_tolerance=cfg.canary_tolerance, serving_dtype=cfg.serving_dtype)
    engine: Engine
    if cfg.kind == "sglang":
        from services.engines.sglang import SGLangEngine

        engine = SGLangEngine(http, flush_retries=cfg.flush_retries,
                              flush_interval_s=cfg.flush_interval_s,
                              logprobs_mode=cfg.logprobs_mode, **common)
    else:
        from services.engines.vllm import VLLMEngine

        engine = VLLMEngine(http, served_model_name=cfg.served_model_name,
                            max_tokens_per_request=cfg.max_tokens_per_request,
                            reload_method=cfg.vllm_reload_method,
                            follow=cfg.share_rollout_server, **common)
    try:
        await engine.start()  # type: ignore[attr-defined]
    except BaseException:
        await engine.close()
        raise
    return engine

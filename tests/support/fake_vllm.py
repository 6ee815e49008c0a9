"""A fake `vllm serve` (OpenAI server + the dev-mode RL endpoints) for what our vLLM backend
calls. Formats follow docs/engines.md ("vLLM"), vLLM 0.32's `entrypoints/openai/completion` and
`entrypoints/rl/online/api_router.py`:
- POST /v1/completions with token-id prompts (one or a batch), `max_tokens`, `n`,
  `prompt_logprobs` (null first, then `{"<id>": {"logprob", "rank", "decoded_token"}}` with the
  actual token plus top-k), `logprobs` + `return_tokens_as_token_ids` for sampled tokens.
  Errors: `{"error": {"message", "type", "param", "code"}}`; 400 for prompt_logprobs above
  --max-logprobs (20), with stream=true, too-long prompts, out-of-vocabulary ids, empty prompts.
  `nan_positions` makes chosen prompt log-probs NaN (emitted as a NaN literal).
- /pause?mode=abort|wait|keep, /resume, /is_paused, /get_world_size, /init_weight_transfer_engine,
  /shutdown_weight_transfer_engine, /start_weight_update, /update_weights, /finish_weight_update
  (the worker's session rules and refusal texts of vLLM 0.32, `v1/worker/gpu_worker.py`, as its
  API server returns them: HTTP 500 "Call to collective_rpc method failed: <text>"; a failed
  chunk ends the session), /update_weight_version, /weight_info, /reset_prefix_cache,
  /collective_rpc (method reload_weights(weights_path) loads a safetensors dir), /health,
  /server_info?config_format=json (the dev route's shape: vllm_config, vllm_env, system_env
  with `pip_packages`, the `pip list --format=freeze` lines vLLM keeps, NCCL's among them),
  /v1/models. NCCL endpoints are validated and recorded; no tensors move.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from support.fake_controls import Knobs, install_fake_controls, json_with_nan, misbehave
from support.fake_sglang import DTYPES, _load_tokenizer
from support.tiny_lm import TinyLM

MAX_LOGPROBS = 20
# vLLM 0.32 builds these dataclasses with **init_info / **update_info: another key is an
# error (distributed/weight_transfer/nccl_common.py, nccl_engine.py). `packed` is a group
# parameter (init_info), not a bucket one. tests/test_upstream_contract_vllm_nccl.py checks
# both sets against the released source.
NCCL_INIT_INFO_FIELDS = {"master_address", "master_port", "rank_offset", "world_size",
                         "nccl_unique_id_b64", "packed", "packed_buffer_size_bytes",
                         "packed_num_buffers"}
NCCL_UPDATE_INFO_FIELDS = {"names", "dtype_names", "shapes"}


def _error(message: str, code: int = 400, typ: str = "BadRequestError") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": typ, "param": None, "code": code}},
                        status_code=code)


def _worker_error(message: str) -> JSONResponse:
    """A RuntimeError of vLLM 0.32's worker as the API server returns it: the engine core
    wraps it (`v1/engine/core.py::_invoke_utility_method`) and the catch-all exception handler
    answers 500 InternalServerError (`entrypoints/serve/exception_handling`)."""
    return _error(f"Call to collective_rpc method failed: {message}", 500, "InternalServerError")


class FakeVLLM:
    def __init__(self, model_path: str | Path, *, served_model_name: str = "fake-vllm",
                 world_size: int = 1) -> None:
        self.lm = TinyLM(model_path)
        self.tokenizer = _load_tokenizer(str(model_path))
        self.served_model_name = served_model_name
        self.world_size = world_size
        self.knobs = Knobs()
        self.weight_version = "default"  # what a fresh vLLM 0.32 reports (/weight_info)
        self.paused = False
        self.transfer_init: dict[str, Any] | None = None
        # groups replaced by an init without a shutdown first: vLLM overwrites its
        # communicator reference without destroying it, leaking its GPU buffers
        self.leaked_groups = 0
        self.pip_packages = "torch==2.13.0\nnvidia-nccl-cu13==2.29.7"  # vLLM 0.32's torch pin
        self.vllm_env: dict[str, str] = {}
        self.updating = False
        self.running = 0
        self.app = self._build()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _load_half(self, path: str) -> None:
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            state.update(load_file(str(f)))
        names = sorted(state)[: max(1, len(state) // 2)]
        self.lm.apply_state({k: state[k] for k in names})

    # ------------------------------------------------------------------ completions
    def _prompt_logprobs(self, ids: list[int], k: int) -> list[dict[str, Any] | None]:
        with self.lm.lock, torch.no_grad():
            logits = self.lm.model(torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits[:-1], -1)
        out: list[dict[str, Any] | None] = [None]
        for j in range(1, len(ids)):
            row = lp[j - 1]
            tok = ids[j]
            val = float(row[tok])
            if j in self.knobs.nan_positions:
                val = float("nan")
            rank = int((row > row[tok]).sum()) + 1
            entry = {str(tok): {"logprob": val, "rank": rank, "decoded_token": self._decode([tok])}}
            if k > 0:
                top = torch.topk(row, k)
                for r, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), 1):
                    entry.setdefault(str(t), {"logprob": v, "rank": r, "decoded_token": self._decode([t])})
            out.append(entry)
        return out

    def _check(self, ids: Any, max_tokens: int) -> list[int]:
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise ValueError("prompt must be a list of token ids")
        if not ids:
            raise ValueError("You must pass at least one prompt")  # vLLM 0.32's text
        bad = [t for t in ids if t < 0 or t >= self.lm.vocab_size]
        if bad:
            raise ValueError(f"Token id {bad[0]} is out of vocabulary")
        # vLLM 0.32 (renderers/params.py, serve/utils/api_utils.py::get_max_tokens): a prompt
        # longer than the window is refused; otherwise max_tokens is cut to the room left, and
        # a prompt filling the window leaves max_tokens 0, which is refused.
        if len(ids) > self.lm.context_len:
            raise ValueError(
                f"This model's maximum context length is {self.lm.context_len} tokens. However, "
                f"your prompt contains {len(ids)} input tokens, which exceeds this limit even "
                "without any output tokens. Please reduce the length of the input prompt.")
        if self._room(ids, max_tokens) < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self._room(ids, max_tokens)}.")
        return ids

    def _room(self, ids: list[int], max_tokens: int) -> int:
        return min(max_tokens, self.lm.context_len - len(ids))

    def _choice(self, index: int, ids: list[int], body: dict[str, Any], seed: int | None) -> dict:
        max_tokens = self._room(ids, int(body.get("max_tokens") or 16))
        s = self.lm.sample(ids, max_new_tokens=max_tokens,
                           temperature=float(body.get("temperature", 1.0)),
                           top_p=float(body.get("top_p", 1.0)), top_k=int(body.get("top_k", -1)),
                           seed=seed, stop_token_ids=body.get("stop_token_ids"))
        choice: dict[str, Any] = {"index": index, "text": self._decode(s.token_ids),
                                  "logprobs": None, "finish_reason": s.finish, "stop_reason": None}
        if body.get("logprobs") is not None:
            as_ids = bool(body.get("return_tokens_as_token_ids"))
            choice["logprobs"] = {
                "tokens": [f"token_id:{t}" if as_ids else self._decode([t]) for t in s.token_ids],
                "token_logprobs": s.logprobs, "top_logprobs": None, "text_offset": []}
        if body.get("prompt_logprobs") is not None:
            choice["prompt_logprobs"] = self._prompt_logprobs(ids, int(body["prompt_logprobs"]))
        return choice

    async def completions(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error("request body is not valid JSON")
        if not isinstance(body, dict):
            return _error("request body must be an object")
        if body.get("model") not in (None, self.served_model_name):
            return _error(f"The model `{body['model']}` does not exist.", 404, "NotFoundError")
        k = body.get("prompt_logprobs")
        if k is not None and (not isinstance(k, int) or k > MAX_LOGPROBS or k < -1):
            return _error(f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                          f"{MAX_LOGPROBS}")
        # vLLM 0.32 refuses only k > 0 (or -1) when streaming; k = 0 streams
        if body.get("stream") and k is not None and (k > 0 or k == -1):
            return _error("`prompt_logprobs` are not available when `stream=True`.")
        prompt = body.get("prompt")
        prompts = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], list) \
            else [prompt]
        n = int(body.get("n") or 1)
        try:
            for p in prompts:
                self._check(p, int(body.get("max_tokens") or 16))
        except (ValueError, TypeError) as e:
            return _error(str(e))
        if (bad := await misbehave(self.knobs)) is not None:
            return bad
        while self.paused:  # paused: requests wait for /resume
            await anyio.sleep(0.01)
        seed = body.get("seed")
        self.running += 1
        try:
            choices = []
            for i, p in enumerate(prompts):
                for j in range(n):
                    s = None if seed is None else int(seed) + j
                    choices.append(await anyio.to_thread.run_sync(
                        self._choice, i * n + j, p, body, s))
        finally:
            self.running -= 1
        usage = {"prompt_tokens": sum(len(p) for p in prompts),
                 "completion_tokens": sum(len(c["logprobs"]["tokens"]) if c["logprobs"] else 0
                                          for c in choices)}
        return json_with_nan({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                              "created": int(time.time()), "model": self.served_model_name,
                              "choices": choices, "usage": usage})

    # ------------------------------------------------------------------ app
    def _build(self) -> FastAPI:  # noqa: C901 - one closure per endpoint reads best here
        app = FastAPI(title="fake vllm")
        install_fake_controls(app, self.knobs)
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])

        @app.post("/pause")
        async def pause(mode: str = "abort", clear_cache: bool = True) -> Response:
            if mode not in ("abort", "wait", "keep"):
                return JSONResponse({"error": f"invalid mode {mode}"}, 400)
            self.paused = True
            while mode == "wait" and self.running:  # wait: drain running requests first
                await anyio.sleep(0.01)
            return JSONResponse({"status": "paused"})

        @app.post("/resume")
        async def resume() -> dict:
            self.paused = False
            return {"status": "resumed"}

        @app.get("/is_paused")
        async def is_paused() -> dict:
            return {"is_paused": self.paused}

        @app.get("/server_info")
        async def server_info(config_format: str = "text") -> dict:
            return {"vllm_config": {} if config_format == "json" else "",
                    "vllm_env": self.vllm_env, "system_env": {"pip_packages": self.pip_packages}}

        @app.get("/get_world_size")
        async def world_size() -> dict:
            return {"world_size": self.world_size}

        @app.post("/init_weight_transfer_engine")
        async def init_engine(body: dict[str, Any]) -> Response:
            info = body.get("init_info")
            need = {"master_address", "master_port", "rank_offset", "world_size"}
            if not isinstance(info, dict) or not need <= set(info):
                return _error(f"init_info must hold {sorted(need)}", 422, "ValidationError")
            if unknown := sorted(set(info) - NCCL_INIT_INFO_FIELDS):  # vLLM: **init_info
                return _error(f"NCCLWeightTransferInitInfo.__init__() got an unexpected keyword "
                              f"argument {unknown[0]!r}", 500, "InternalServerError")
            if info["world_size"] != self.world_size + 1:
                return _error("world_size must be vllm world size + 1", 500, "InternalServerError")
            self.leaked_groups += self.transfer_init is not None
            self.transfer_init = info
            return JSONResponse({"message": "Weight transfer initialized"})

        @app.post("/shutdown_weight_transfer_engine")
        async def shutdown_engine() -> Response:
            if self.updating:
                return _worker_error("Cannot release a trainer connection during a weight update")
            self.transfer_init = None  # PyNcclCommunicator.destroy(): ncclCommAbort
            return JSONResponse({"message": "Weight transfer shut down"})

        @app.post("/start_weight_update")
        async def start() -> Response:
            if self.updating:
                return _worker_error("start_weight_update called while a weight update is "
                                     "already active. Call finish_weight_update first.")
            if self.transfer_init is None:
                return _error("weight transfer engine not initialized", 500, "InternalServerError")
            self.updating = True
            return JSONResponse({"message": "Weight update started"})

        @app.post("/update_weights")
        async def update(body: dict[str, Any]) -> Response:
            if not self.updating:
                return _worker_error("start_weight_update must be called before update_weights.")
            info = body.get("update_info") or {}
            if unknown := sorted(set(info) - NCCL_UPDATE_INFO_FIELDS):  # vLLM: **update_info
                return _error(f"NCCLWeightTransferUpdateInfo.__init__() got an unexpected keyword "
                              f"argument {unknown[0]!r}", 500, "InternalServerError")
            names, dts, shapes = info.get("names"), info.get("dtype_names"), info.get("shapes")
            if not (isinstance(names, list) and isinstance(dts, list) and isinstance(shapes, list)
                    and len(names) == len(dts) == len(shapes)):
                return _error("names, dtype_names and shapes must be lists of equal length", 422)
            params = self.lm.model.state_dict()
            for nm, d, s in zip(names, dts, shapes, strict=True):
                if nm not in params or list(params[nm].shape) != list(s) or d not in DTYPES:
                    self.updating = False  # a failed chunk ends the session (as in vLLM)
                    return _worker_error(f"bad parameter {nm} {d} {s}")
            k = self.knobs.bucket_calls
            self.knobs.bucket_calls += 1
            if self.knobs.fail_bucket_at is not None and k == self.knobs.fail_bucket_at:
                self.updating = False  # vLLM's worker ends the session on a failed chunk
                return _worker_error("NCCL error: injected")
            return JSONResponse({"message": "Weights updated"})

        @app.post("/finish_weight_update")
        async def finish(request: Request) -> Response:
            raw = await request.body()
            body = (await request.json()) if raw else {}
            if not self.updating:
                return _worker_error("finish_weight_update called without a matching "
                                     "start_weight_update.")
            self.updating = False
            if body.get("weight_version") is not None:
                self.weight_version = str(body["weight_version"])
            return JSONResponse({"message": "Weight update finished"})

        @app.post("/update_weight_version")
        async def set_version(body: dict[str, Any]) -> dict:
            self.weight_version = str(body["new_version"])
            return {"success": True, "new_version": self.weight_version}

        @app.get("/weight_info")
        async def weight_info() -> dict:
            return {"weight_version": self.weight_version}

        @app.post("/reset_prefix_cache")
        async def reset_cache() -> dict:
            return {"success": True}

        @app.post("/collective_rpc")
        async def rpc(body: dict[str, Any]) -> Response:
            if body.get("method") != "reload_weights":
                return _error(f"fake supports reload_weights only, not {body.get('method')}", 500,
                              "InternalServerError")
            path = (body.get("kwargs") or {}).get("weights_path")
            try:
                if self.knobs.load_fails():
                    # vLLM reloads layer by layer: a failure part-way leaves mixed weights.
                    await anyio.to_thread.run_sync(self._load_half, path)
                    raise RuntimeError("injected load failure after a partial reload")
                await anyio.to_thread.run_sync(self.lm.load_safetensors_dir, path)
            except Exception as e:  # vLLM surfaces worker exceptions as 500
                return _error(f"reload_weights failed: {e}", 500, "InternalServerError")
            return JSONResponse({"results": [None] * self.world_size})

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=503 if self.knobs.mode == "refuse" else 200)

        @app.get("/v1/models")
        async def models() -> dict:
            return {"object": "list", "data": [{"id": self.served_model_name, "object": "model",
                                                "max_model_len": self.lm.context_len}]}

        return app

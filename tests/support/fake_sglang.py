"""A fake SGLang server (native API, sglang 0.5.23) for the endpoints our SGLang backend calls.

Formats follow docs/engines.md ("SGLang") and sglang 0.5.23's
`srt/entrypoints/http_server.py`; the route table, request fields and sampling keys are
checked against the released source by tests/test_upstream_contract_sglang.py:
- POST /generate: `input_ids` (one list or a batch), `sampling_params` (dict or list), `rid`,
  `return_logprob`, `logprob_start_len`. `n > 1` on one prompt makes a batch. Unknown
  sampling keys -> 400 `{"error": "unknown field ..."}` (0.5.23 schema check); request errors
  -> 400 `{"error": {"message": ...}}`. Results: `text`, `output_ids`, `meta_info` with
  `finish_reason` (object), `weight_version`, `output_token_logprobs` = [logprob, id, null]
  triples and, from `logprob_start_len`, `input_token_logprobs` (first one null).
- /flush_cache: plain text, 400 while requests are running (or `busy_flushes` says so).
- /pause_generation {mode} aborts running requests (mode abort) and holds new ones until
  /continue_generation.
- /update_weights_from_disk: all-or-nothing load, `{"success", "message",
  "num_paused_requests"}`, 400 on failure.
- /init_weights_update_group, /update_weights_from_distributed, /destroy_weights_update_group:
  validated and recorded; no tensors move (no NCCL here), so the weights do not change.
  init/update answer HTTP 500 when `dp_size > 1` (SGLang asserts dp_size == 1).
- /begin_weight_update, /end_weight_update: the session; a distributed update outside one
  is refused with SGLang's 400 and message, a second begin too.
- `unflushed_next > 0`: the next update loads but answers SGLang's 400 "Weights were updated,
  but the cache was not flushed ..." (version not recorded, as in SGLang).
- /model_info (weight_version), /server_info (dp_size, tp_size, pp_size,
  enable_deterministic_inference), /update_weight_version, /v1/models; /health and
  /health_generate run a generation in SGLang, so they answer 503 while paused; /ready.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from support.fake_controls import Knobs, install_fake_controls, misbehave
from support.tiny_lm import TinyLM

# SGLang 0.5.23's SamplingParams fields (sglang/api/v1/api_types.py); anything else is
# refused. The contract test checks this set equals the released one.
SAMPLING_KEYS = {
    "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "n",
    "min_new_tokens", "ignore_eos", "skip_special_tokens", "no_stop_trim", "sampling_seed",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias", "json_schema",
    "regex", "ebnf", "spaces_between_special_tokens", "custom_params", "stream_interval",
    "stop_regex", "structural_tag", "beam_width", "watermark", "choice",
}
# SGLang's texts (srt/managers/scheduler_components/weight_updater.py), checked by the
# contract test: the client recognises them.
NO_SESSION = ("update_weights_from_distributed must run between begin_weight_update() and "
              "end_weight_update()")
SESSION_OPEN = "a weight-update session is already open; call end_weight_update() first"
NO_SESSION_TO_END = "no weight-update session is open; call begin_weight_update() first"
NOT_FLUSHED = ("Weights were updated, but the cache was not flushed because requests are "
               "still running or queued. Retract or finish them, then call /flush_cache.")
DTYPES = {"bfloat16", "float16", "float32", "float8_e4m3fn"}


class RequestError(ValueError):
    pass


def _err(message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=400)


def _load_tokenizer(path: str):  # noqa: ANN202 - optional transformers tokenizer
    if not (Path(path) / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class FakeSGLang:
    def __init__(self, model_path: str | Path, *, served_model_name: str = "fake-sglang",
                 dp_size: int = 1, deterministic: bool = True) -> None:
        self.model_path = str(model_path)
        self.dp_size = dp_size
        self.tp_size = 1
        self.pp_size = 1
        self.deterministic = deterministic
        self.session = False
        self.unflushed_next = 0
        self.lm = TinyLM(model_path)
        self.tokenizer = _load_tokenizer(str(model_path))
        self.served_model_name = served_model_name
        self.knobs = Knobs()
        self.weight_version = "default"
        self.running = 0
        self.paused = False
        self.abort_epoch = 0
        self.groups: dict[str, dict[str, Any]] = {}
        self.app = self._build()

    # ------------------------------------------------------------------ generate
    def _check_sampling(self, sp: Any) -> dict[str, Any]:
        if not isinstance(sp, dict):
            raise RequestError("sampling_params must be an object")
        unknown = sorted(set(sp) - SAMPLING_KEYS)
        if unknown:
            raise KeyError(unknown[0])
        return sp

    def _check_ids(self, ids: Any, max_new: int) -> list[int]:
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise RequestError("input_ids must be a list of integers")
        if not ids:
            raise RequestError("input_ids is empty")
        bad = [t for t in ids if t < 0 or t >= self.lm.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is out of vocabulary (size {self.lm.vocab_size})")
        if len(ids) >= self.lm.context_len:
            raise RequestError(f"The input ({len(ids)} tokens) is longer than the model's "
                               f"context length ({self.lm.context_len} tokens).")
        if len(ids) + max_new > self.lm.context_len:
            raise RequestError(
                f"Requested token count exceeds the model's maximum context length of "
                f"{self.lm.context_len} tokens. You requested a total of {len(ids) + max_new} "
                f"tokens: {len(ids)} tokens from the input messages and {max_new} tokens for "
                "the completion.")
        return ids

    def _one(self, ids: list[int], sp: dict[str, Any], rid: str, return_logprob: bool,
             logprob_start_len: int, epoch: int) -> dict[str, Any]:
        max_new = int(sp.get("max_new_tokens", 128))
        s = self.lm.sample(
            ids, max_new_tokens=max_new, temperature=float(sp.get("temperature", 1.0)),
            top_p=float(sp.get("top_p", 1.0)), top_k=int(sp.get("top_k", -1)),
            seed=sp.get("sampling_seed"), stop_token_ids=sp.get("stop_token_ids"),
            ignore_eos=bool(sp.get("ignore_eos", False)),
            aborted=lambda: self.abort_epoch != epoch)
        if s.finish == "stop":
            finish: dict[str, Any] = {"type": "stop", "matched": s.matched}
        elif s.finish == "length":
            finish = {"type": "length", "length": max_new}
        else:
            finish = {"type": "abort", "message": "Abort before prefill" if not s.token_ids
                      else "Abort in waiting queue"}
        meta: dict[str, Any] = {
            "id": rid, "finish_reason": finish, "prompt_tokens": len(ids),
            "completion_tokens": len(s.token_ids), "cached_tokens": 0,
            "weight_version": self.weight_version,
        }
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(s.logprobs, s.token_ids, strict=True)]
            meta["output_token_logprobs_length"] = len(s.token_ids)
            if logprob_start_len >= 0:
                # position 0 has no predecessor: its log-prob is null, as in sglang
                lps = self.lm.prompt_logprobs(ids)[logprob_start_len:]
                toks = ids[logprob_start_len:]
                meta["input_token_logprobs"] = [[lp, t, None] for lp, t in zip(lps, toks, strict=True)]
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(s.token_ids, skip_special_tokens=True)
        return {"text": text, "output_ids": s.token_ids, "meta_info": meta}

    async def generate(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _err("request body is not valid JSON")
        if not isinstance(body, dict):
            return _err("request body must be an object")
        if body.get("stream"):
            return _err("the fake serves stream=false only")
        if "input_ids" not in body:
            return _err("the fake needs input_ids (text input is not supported)")
        sp = body.get("sampling_params") or {}
        ids = body["input_ids"]
        try:
            if isinstance(sp, list):
                sps = [self._check_sampling(x) for x in sp]
            else:
                sps = [self._check_sampling(sp)]
        except KeyError as e:  # sglang 0.5.23's schema check, before the handler
            return JSONResponse({"error": f"unknown field {e.args[0]!r} in sampling_params"}, 400)
        except RequestError as e:
            return _err(str(e))
        batch = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
        prompts = ids if batch else [ids]
        if not batch and int(sps[0].get("n", 1)) > 1:
            batch = True
            prompts = prompts * int(sps[0]["n"])
        if len(sps) == 1:
            sps = sps * len(prompts)
        if len(sps) != len(prompts):
            return _err(f"{len(sps)} sampling_params for {len(prompts)} prompts")
        try:
            for p, s in zip(prompts, sps, strict=True):
                self._check_ids(p, int(s.get("max_new_tokens", 128)))
        except (RequestError, TypeError, ValueError) as e:
            return _err(str(e))
        while self.paused:  # pause_generation holds new requests until continue_generation
            await anyio.sleep(0.01)
        if (bad := await misbehave(self.knobs)) is not None:
            return bad
        rid = str(body.get("rid") or uuid.uuid4().hex)
        epoch = self.abort_epoch
        if self.knobs.abort_next > 0:  # as if a pause_generation(abort) hit this request
            self.knobs.abort_next -= 1
            epoch = -1
        self.running += 1
        try:
            results = []
            for i, (p, s) in enumerate(zip(prompts, sps, strict=True)):
                results.append(await anyio.to_thread.run_sync(
                    self._one, p, s, f"{rid}-{i}" if batch else rid,
                    bool(body.get("return_logprob")), int(body.get("logprob_start_len", -1)),
                    epoch))
        finally:
            self.running -= 1
        return JSONResponse(results if batch else results[0])

    # ------------------------------------------------------------------ weights
    def _update_from_disk(self, body: dict[str, Any]) -> JSONResponse:
        path = body.get("model_path")
        if not isinstance(path, str):
            return JSONResponse({"success": False, "message": "model_path is required"}, 400)
        try:
            if self.knobs.load_fails():
                raise RuntimeError("injected load failure")
            self.lm.load_safetensors_dir(path)
        except Exception as e:  # sglang rolls back to the old weights and reports
            return JSONResponse({"success": False, "num_paused_requests": 0,
                                 "message": f"Failed to update weights: {e}. Rolling back to "
                                 "original weights."}, 400)
        if self.unflushed_next > 0:  # loaded, version not recorded, cache not flushed
            self.unflushed_next -= 1
            return JSONResponse({"success": False, "message": NOT_FLUSHED,
                                 "num_paused_requests": 0}, 400)
        msg = "Succeeded to update model weights."
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
            msg += f" Weight version updated to {self.weight_version}."
        return JSONResponse({"success": True, "message": msg, "num_paused_requests": 0})

    def _dp_refused(self) -> JSONResponse | None:
        # SGLang asserts dp_size == 1 in the tokenizer manager: the assertion is a 500
        if self.dp_size > 1:
            return JSONResponse({"detail": "data-parallel replicas are not supported for "
                                 "update weights from distributed"}, 500)
        return None

    def _init_group(self, body: dict[str, Any]) -> JSONResponse:
        if (refused := self._dp_refused()) is not None:
            return refused
        need = ("master_address", "master_port", "rank_offset", "world_size")
        if any(k not in body for k in need):
            return JSONResponse({"success": False, "message": f"missing one of {need}"}, 400)
        name = body.get("group_name", "weight_update_group")
        if name in self.groups:
            return JSONResponse({"success": False,
                                 "message": f"group {name} already initialized"}, 400)
        self.groups[name] = dict(body)
        return JSONResponse({"success": True, "message": "Succeeded to initialize custom process group."})

    def _update_distributed(self, body: dict[str, Any]) -> JSONResponse:
        if (refused := self._dp_refused()) is not None:
            return refused
        if not self.session:
            return JSONResponse({"success": False, "message": NO_SESSION}, 400)
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        name = body.get("group_name", "weight_update_group")
        if name not in self.groups:
            return JSONResponse({"success": False, "message": f"group {name} not initialized"}, 400)
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)
                and len(names) == len(dtypes) == len(shapes) and names):
            return JSONResponse({"success": False, "message": "names/dtypes/shapes must be "
                                 "non-empty lists of equal length"}, 400)
        params = self.lm.model.state_dict()
        for n, d, s in zip(names, dtypes, shapes, strict=True):
            if n not in params or list(params[n].shape) != list(s) or d not in DTYPES:
                return JSONResponse({"success": False, "message": f"bad parameter {n} {d} {s}"}, 400)
        k = self.knobs.bucket_calls
        self.knobs.bucket_calls += 1
        if self.knobs.fail_bucket_at is not None and k == self.knobs.fail_bucket_at:
            return JSONResponse({"success": False, "message": "Failed to update parameter online: "
                                 "injected NCCL error"}, 400)
        if self.unflushed_next > 0 and body.get("flush_cache", True):
            self.unflushed_next -= 1
            return JSONResponse({"success": False, "message": NOT_FLUSHED}, 400)
        msg = "Succeeded to update parameter online."
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
        return JSONResponse({"success": True, "message": msg})

    # ------------------------------------------------------------------ app
    def _build(self) -> FastAPI:
        app = FastAPI(title="fake sglang")
        install_fake_controls(app, self.knobs)
        app.add_api_route("/generate", self.generate, methods=["POST", "PUT"])

        @app.api_route("/flush_cache", methods=["GET", "POST"])
        async def flush_cache() -> Response:
            busy = self.running > 0 or self.knobs.busy_flushes > 0
            if self.knobs.busy_flushes > 0:
                self.knobs.busy_flushes -= 1
            return Response(
                "Cache flushed.\nPlease check backend logs for more details. (When there are "
                "running or waiting requests, the operation will not be performed.)\n",
                status_code=400 if busy else 200)

        @app.post("/pause_generation")
        async def pause(request: Request) -> dict:
            raw = await request.body()
            mode = (await request.json()).get("mode", "abort") if raw else "abort"
            if mode not in ("abort", "retract", "in_place"):
                return JSONResponse({"error": {"message": f"bad mode {mode}"}}, 400)
            self.paused = True
            if mode == "abort":
                self.abort_epoch += 1
            return {"message": "Generation paused successfully.", "status": "ok"}

        @app.post("/continue_generation")
        async def cont() -> dict:
            self.paused = False
            return {"message": "Generation continued successfully.", "status": "ok"}

        @app.post("/update_weights_from_disk")
        async def from_disk(body: dict[str, Any]) -> JSONResponse:
            return await anyio.to_thread.run_sync(self._update_from_disk, body)

        @app.post("/init_weights_update_group")
        async def init_group(body: dict[str, Any]) -> JSONResponse:
            return self._init_group(body)

        @app.post("/destroy_weights_update_group")
        async def destroy_group(body: dict[str, Any]) -> JSONResponse:
            name = body.get("group_name", "weight_update_group")
            if self.groups.pop(name, None) is None:
                return JSONResponse({"success": False, "message": f"no group {name}"}, 400)
            return JSONResponse({"success": True, "message": "Succeeded to destroy."})

        @app.post("/update_weights_from_distributed")
        async def from_dist(body: dict[str, Any]) -> JSONResponse:
            return self._update_distributed(body)

        @app.post("/begin_weight_update")
        async def begin(body: dict[str, Any]) -> JSONResponse:
            if self.session:
                return JSONResponse({"success": False, "message": SESSION_OPEN}, 400)
            self.session = True
            return JSONResponse({"success": True, "message": "Success"})

        @app.post("/end_weight_update")
        async def end(body: dict[str, Any]) -> JSONResponse:
            if not self.session:
                return JSONResponse({"success": False, "message": NO_SESSION_TO_END}, 400)
            self.session = False
            return JSONResponse({"success": True, "message": "Success"})

        @app.get("/model_info")
        async def model_info() -> dict:
            return {"model_path": self.model_path, "served_model_name": self.served_model_name,
                    "tokenizer_path": self.model_path, "is_generation": True,
                    "weight_version": self.weight_version}

        @app.get("/server_info")
        async def server_info() -> dict:
            return {"model_path": self.model_path, "tp_size": self.tp_size, "pp_size": self.pp_size,
                    "dp_size": self.dp_size,
                    "enable_deterministic_inference": self.deterministic,
                    "version": "0.5.23", "frontend": "python"}

        @app.get("/ready")
        async def ready() -> Response:
            return Response(status_code=200)

        @app.post("/update_weight_version")
        async def set_version(body: dict[str, Any]) -> dict:
            self.weight_version = str(body["new_version"])
            return {"success": True, "message": f"Weight version updated to {self.weight_version}",
                    "new_version": self.weight_version}

        @app.get("/health")
        @app.get("/health_generate")
        async def health() -> Response:
            # SGLang generates one token here: held by a pause, it times out with 503
            down = self.knobs.mode == "refuse" or self.paused
            return Response(status_code=503 if down else 200)

        @app.get("/v1/models")
        async def models() -> dict:
            return {"object": "list", "data": [{
                "id": self.served_model_name, "object": "model", "root": self.served_model_name,
                "max_model_len": self.lm.context_len}]}

        return app

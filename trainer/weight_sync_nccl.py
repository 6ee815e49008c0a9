"""Weight push, NCCL path: bucketed broadcasts from the trainer straight into the SGLang
(rollout) and vLLM (teacher) servers. GPU ONLY -- selected by `push.mode: nccl`; the CPU
tests exercise the bucketing (model.iter_gathered) and the SGLang sequence over gloo, never
NCCL itself. The trainer is rank 0 of one extra process group per engine (not the training
group), the engine's GPUs are ranks 1..n.

SGLang (engine-apis.md section 1), per update:
    once   POST /init_weights_update_group {master_address, master_port, rank_offset: 1,
           world_size: 1+n, group_name, backend: "nccl"}   || trainer joins as rank 0
    1      POST /pause_generation {mode: "abort"}, POST /flush_cache (400 while busy: retry)
    2      per bucket: POST /update_weights_from_distributed {names, dtypes, shapes,
           group_name, flush_cache: <last bucket>, weight_version}
           || dist.broadcast(t, src=0) for each tensor, in the same order
    3      POST /continue_generation
vLLM >= 0.22 native RL API (VLLM_SERVER_DEV_MODE=1, --weight-transfer-config
'{"backend":"nccl"}'; section 2), per update:
    once   GET /get_world_size; POST /init_weight_transfer_engine {init_info:
           {master_address, master_port, rank_offset: 1, world_size: n+1}}
           || NCCLWeightTransferEngine.trainer_init (vLLM's own helper: its StatelessProcessGroup
           + PyNccl wire protocol is vLLM's, so the trainer must speak it with vLLM's code)
    1      POST /pause?mode=keep, POST /start_weight_update {}
    2      per bucket: POST /update_weights {update_info: {names, dtype_names, shapes}}
           || trainer_send_weights(bucket)
    3      POST /finish_weight_update {weight_version}, POST /resume
Then, for both: POST {service}/v1/weights WeightUpdate{format: "nccl", version, location:
"host:port"} so our service records the version it now serves.

Blocking HTTP calls that wait for the broadcast run in a thread; the broadcast runs on the
caller's thread; both have timeouts. An engine that fails is reported, its group dropped
(re-initialised on the next push), and the other engines still get their update. Buckets
are gathered once (ZeRO-3: per bucket, sized by ds_numel) and sent to every engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import torch

from protocol.messages import WeightUpdate
from trainer.config import PushConfig, ServiceEndpoint
from trainer.model import Policy, iter_gathered
from trainer.weight_push import PushResult

log = logging.getLogger("rlrt.trainer.nccl")

Bucket = list[tuple[str, torch.Tensor]]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def init_custom_process_group(backend: str, master_address: str, master_port: int, rank: int,
                              world_size: int, group_name: str, timeout_s: float) -> Any:
    """A process group separate from the training one, built exactly like SGLang's
    `init_custom_process_group` builds its side (TCP rendezvous + torch's group helper, so
    the store prefixes match). Private torch API: checked against torch 2.13."""
    from torch.distributed.distributed_c10d import (
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank,
                                              world_size, timeout=timeout))
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(world_size, rank, [], backend, store,
                                      group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class _Call(threading.Thread):
    """An HTTP call on a thread, so a broadcast can run while it waits for it."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - re-raised by join_result
            self.error = e

    def join_result(self, timeout_s: float) -> Any:
        self.join(timeout_s)
        if self.is_alive():
            raise TimeoutError(f"HTTP call still running after {timeout_s:.0f} s")
        if self.error is not None:
            raise self.error
        return self.result


class EngineSync:
    """One engine's update protocol. connect() once; begin/send/end per update."""

    def __init__(self, svc: ServiceEndpoint, cfg: PushConfig, port: int, *,
                 backend: str = "nccl") -> None:
        self.svc = svc
        self.cfg = cfg
        self.port = port
        self.backend = backend
        self.url = (svc.engine_url or "").rstrip("/")
        self.http = httpx.Client(timeout=httpx.Timeout(cfg.nccl_timeout_s,
                                                       connect=cfg.connect_timeout_s))
        self.group: Any = None

    def post(self, path: str, json: Any = None, params: dict | None = None) -> Any:
        r = self.http.post(f"{self.url}{path}", json=json, params=params)
        if r.status_code >= 300:
            raise RuntimeError(f"{self.svc.name} {path}: HTTP {r.status_code}: {r.text[:300]}")
        try:
            body = r.json()
        except ValueError:
            return r.text
        if isinstance(body, dict) and body.get("success") is False:
            raise RuntimeError(f"{self.svc.name} {path}: {body.get('message', body)}")
        return body

    def close(self) -> None:
        self.group = None


class SGLangSync(EngineSync):
    group_name = "rlrt_weights"

    def connect(self) -> None:
        n = self.svc.engine_world_size or 1
        body = {"master_address": self.cfg.master_address, "master_port": self.port,
                "rank_offset": 1, "world_size": n + 1, "group_name": self.group_name,
                "backend": self.backend}
        call = _Call(lambda: self.post("/init_weights_update_group", body))
        call.start()  # blocks server-side until our side joins: run both at once
        self.group = init_custom_process_group(self.backend, self.cfg.master_address,
                                               self.port, 0, n + 1, self.group_name,
                                               self.cfg.nccl_timeout_s)
        call.join_result(self.cfg.nccl_timeout_s)

    def begin(self, version: int) -> None:
        self.post("/pause_generation", {"mode": "abort"})
        deadline = time.monotonic() + self.cfg.nccl_timeout_s
        while True:  # 400 while requests are still running: retry (slime: 60 x 1 s)
            r = self.http.post(f"{self.url}/flush_cache")
            if r.status_code < 300:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.svc.name} /flush_cache kept failing: {r.text[:200]}")
            time.sleep(1.0)

    def send(self, bucket: Bucket, version: int, last: bool) -> None:
        body = {"names": [n for n, _ in bucket],
                "dtypes": [dtype_name(t.dtype) for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket],
                "group_name": self.group_name, "flush_cache": last,
                "weight_version": str(version)}
        call = _Call(lambda: self.post("/update_weights_from_distributed", body))
        call.start()
        for _, t in bucket:
            torch.distributed.broadcast(t.contiguous(), src=0, group=self.group)
        call.join_result(self.cfg.nccl_timeout_s)

    def end(self, version: int) -> None:
        self.post("/continue_generation", {})

    def close(self) -> None:
        if self.group is not None:
            try:
                self.post("/destroy_weights_update_group", {"group_name": self.group_name})
            except Exception as e:  # noqa: BLE001 - best effort on a broken group
                log.warning("%s: destroy group: %s", self.svc.name, e)
        self.group = None


class VLLMSync(EngineSync):
    def connect(self) -> None:
        try:
            from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
        except ImportError as e:
            raise RuntimeError("push.mode=nccl to a vLLM server needs vllm installed in the "
                               "trainer's environment (its NCCL weight-transfer helpers)") from e
        n = self.svc.engine_world_size
        if n is None:
            r = self.http.get(f"{self.url}/get_world_size")
            r.raise_for_status()
            n = int(r.json()["world_size"])
        info = {"master_address": self.cfg.master_address, "master_port": self.port,
                "rank_offset": 1, "world_size": n + 1}
        call = _Call(lambda: self.post("/init_weight_transfer_engine", {"init_info": info}))
        call.start()
        self.group = NCCLWeightTransferEngine.trainer_init(info)
        call.join_result(self.cfg.nccl_timeout_s)
        self._send = NCCLWeightTransferEngine.trainer_send_weights

    def begin(self, version: int) -> None:
        self.post("/pause", params={"mode": "keep"})
        self.post("/start_weight_update", {})

    def send(self, bucket: Bucket, version: int, last: bool) -> None:
        info = {"names": [n for n, _ in bucket],
                "dtype_names": [dtype_name(t.dtype) for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket]}
        call = _Call(lambda: self.post("/update_weights", {"update_info": info}))
        call.start()
        self._send(iter(bucket), {"group": self.group, "packed": False})
        call.join_result(self.cfg.nccl_timeout_s)

    def end(self, version: int) -> None:
        self.post("/finish_weight_update", {"weight_version": str(version)})
        self.post("/resume")


_SYNCS: dict[str, EngineSync] = {}  # connected engines of this process (rank 0)


def _sync_for(i: int, svc: ServiceEndpoint, cfg: PushConfig) -> EngineSync:
    if svc.name not in _SYNCS:
        cls = SGLangSync if svc.engine == "sglang" else VLLMSync
        _SYNCS[svc.name] = cls(svc, cfg, cfg.master_port + i)
    return _SYNCS[svc.name]


def nccl_push_all(policy: Policy, cfg: PushConfig, *, version: int, dtype: torch.dtype,
                  run_id: str = "rlrt") -> PushResult | None:
    """Collective (every rank iterates the gathered buckets); rank 0 drives the engines.
    Returns the result on rank 0, None elsewhere."""
    lead = policy.rank == 0
    res = PushResult(version=version)
    live: list[EngineSync] = []
    t0 = time.perf_counter()
    if lead:
        for i, svc in enumerate(cfg.services):
            s = _sync_for(i, svc, cfg)
            try:
                if s.group is None:
                    s.connect()
                s.begin(version)
                live.append(s)
            except Exception as e:  # noqa: BLE001 - reported, the others still update
                res.failed[svc.name] = f"{type(e).__name__}: {e}"
                s.close()
    buckets = iter_gathered(policy, cfg.bucket_mb * 1024**2, dtype)
    pending = next(buckets, None)
    while pending is not None:  # look one ahead to flag the last bucket
        nxt = next(buckets, None)
        for s in list(live):
            try:
                s.send(pending, version, last=nxt is None)
            except Exception as e:  # noqa: BLE001
                res.failed[s.svc.name] = f"{type(e).__name__}: {e}"
                live.remove(s)
                s.close()
        pending = nxt
    if not lead:
        return None
    for s in live:
        try:
            s.end(version)
            res.ok.append(s.svc.name)
        except Exception as e:  # noqa: BLE001
            res.failed[s.svc.name] = f"{type(e).__name__}: {e}"
            s.close()
    res.write_s = time.perf_counter() - t0
    _notify_versions(cfg, res, version, run_id)
    return res


def _notify_versions(cfg: PushConfig, res: PushResult, version: int, run_id: str) -> None:
    """Tell our services which version their engine now holds (format nccl)."""
    t0 = time.perf_counter()
    update = WeightUpdate(run_id=run_id, version=version, format="nccl",
                          location=f"{cfg.master_address}:{cfg.master_port}")
    headers = {"content-type": "application/json"}
    if cfg.control_token:
        headers["authorization"] = f"Bearer {cfg.control_token}"
    with httpx.Client(timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s)) as c:
        for svc in cfg.services:
            if svc.name not in res.ok:
                continue
            try:
                r = c.post(f"{svc.url.rstrip('/')}/v1/weights", content=update.model_dump_json(),
                           headers=headers)
                if r.status_code >= 300:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            except Exception as e:  # noqa: BLE001
                res.ok.remove(svc.name)
                res.failed[svc.name] = f"version notice: {e}"
    res.notify_s = time.perf_counter() - t0

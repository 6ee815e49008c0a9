"""NCCL transport: the trainer's half of the services' NCCL update (docs/engines.md,
"The trainer's half of an NCCL update"). GPU ONLY in production -- used by `push.mode: nccl`
(with its disk fallback, trainer/transports/fallback.py). On CPU the same code runs with
`push.nccl_backend: gloo` against a test receiver (tests/test_trainer_nccl.py); NCCL itself
and vLLM's PyNccl path are GPU-only and untested here.

The service drives its engine's HTTP endpoints (SGLang: pause, flush, init group,
update_weights_from_distributed per bucket, continue; vLLM: pause, init transfer engine,
start, update_weights per bucket, finish, resume); the trainer, rank 0 and rendezvous master
of one extra process group per service (not the training group), broadcasts the tensors:

    1. init_group: true on the first update, after a failure, or when the service's
       GET /v1/version shows another group than HOST:PORT/NAMExW (a restarted service)
    2. POST {service}/v1/weights {version, format: "nccl", location: "HOST:PORT",
       meta: {"nccl": {world_size, rank_offset: 1, group_name, backend, packed, init_group,
       buckets: [{names, dtypes, shapes}, ...]}}}           -- on a thread, long timeout
    3. if init_group: join the group as rank 0, concurrently with the service's init call
       (SGLang: torch TCP rendezvous + a second process group built exactly like SGLang's
       init_custom_process_group -- PrefixStore(group_name, store) first -- with the default
       group's bound device cleared meanwhile; vLLM: vLLM's own
       `vllm.distributed.weight_transfer.nccl_common.trainer_init`, a PyNccl communicator)
    4. every bucket, in order (gathered once under ZeRO-3, on every rank): broadcast each
       tensor from rank 0 to each service's group
    5. join the HTTP thread: 200 = done; anything else = reported, the group destroyed
       (re-initialised next time)

One group per service, each with its own port (master_port + index) and its own name
(rlrt_weight_sync_<service>): torch refuses a second group of one name in this process.
vLLM's `WeightTransferEngineFactory.trainer_init(init_info, client=..., source=...)` is not
used: its client drives the vLLM server's HTTP endpoints from the trainer, while here the
service drives them (its server is on the service's loopback) and the trainer only joins the
group and broadcasts -- exactly what `nccl_common.trainer_init` and PyNccl's broadcast do.

Every wait is bounded: the HTTP call by push.nccl_timeout_s, torch groups by their
timeout. vLLM's PyNccl has no timeout of its own (a dead server blocks the broadcast), so each
bucket's PyNccl broadcasts run under a watchdog that, past push.nccl_timeout_s, destroys the
communicator (`destroy()`: ncclCommAbort, which ends the pending operations) and fails the
push for that service. Every group dropped (a failure, a re-initialisation) is destroyed, a
torch group by destroy_process_group and a PyNccl communicator by `destroy()`: a dropped
reference alone leaks the communicator and its GPU buffers.

Before a group forms, both sides' NCCL versions are compared when both are known (the vLLM
service reports its server's; this process knows its own): NCCL refuses a communicator whose
ranks differ in version (ncclInvalidUsage), so a mismatch fails the push at once with both
versions and the fix (docs/deploy.md, "One NCCL per update group").

The group's size is the server's: the service reports the engine's GPU count (vLLM's
/get_world_size, SGLang's tp_size) and says whether the server told it
(`engine_world_size_from: "server"`); a configured push.services[].engine_world_size that
disagrees is a config error, reported before any rendezvous (a wrong size would hang it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import Any

import httpx
import torch

from protocol.canary import Canary
from protocol.config import secret_value
from protocol.messages import WeightUpdate
from protocol.weights import DEFAULT_NCCL_GROUP, Bucket, NcclSpec
from protocol.weights_client import UpdateRefused, WeightsClient, canary_verdict, check_reply
from trainer.config import NcclPush, ServiceEndpoint
from trainer.model import Policy, iter_gathered, named_weights, plan_buckets, shape_of
from trainer.transports.base import Collectives, PushResult, WeightTransport

log = logging.getLogger("rlrt.trainer.nccl")


def group_name(service: str) -> str:
    """The update group of one service: distinct per service (see the module docstring)."""
    return f"{DEFAULT_NCCL_GROUP}_{service}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def _unbound_default_group() -> Iterator[None]:
    """Clear the default group's `bound_device_id` meanwhile. Under a multi-GPU DeepSpeed
    trainer the default group is bound to a device, and torch's group helper then builds
    the new group by splitting the default group's communicator -- a collective of every
    training rank, while only rank 0 is here: it would hang. (NVIDIA NeMo-RL does the same.)"""
    dist = torch.distributed
    pg = dist.distributed_c10d._world.default_pg if dist.is_initialized() else None
    bound = getattr(pg, "bound_device_id", None)
    if bound is None:
        yield
        return
    pg.bound_device_id = None
    try:
        yield
    finally:
        pg.bound_device_id = bound


def local_nccl_version(engine: str | None) -> str | None:
    """The NCCL version this process brings to a group with `engine`: torch's (the SGLang
    group, and vLLM's PyNccl by default); None without CUDA, or when VLLM_NCCL_SO_PATH points
    PyNccl at a library of its own."""
    if not torch.cuda.is_available():
        return None
    if engine == "vllm" and os.environ.get("VLLM_NCCL_SO_PATH"):
        return None
    return ".".join(str(x) for x in torch.cuda.nccl.version())


def check_nccl_versions(service: str, ours: str | None, theirs: str | None) -> None:
    """Raise the one clear error NCCL would otherwise give as ncclInvalidUsage (or a hang)."""
    if ours and theirs and ours != theirs:
        raise RuntimeError(
            f"{service}: NCCL version mismatch: this trainer runs NCCL {ours}, the {service} "
            f"engine NCCL {theirs}; NCCL refuses a group whose ranks differ (\"Mismatched NCCL "
            "version detected\"). Run images whose torch pins the same NCCL, or point vLLM's "
            "PyNccl at one library on both sides with VLLM_NCCL_SO_PATH; until then use "
            "push.mode: disk (docs/deploy.md, \"One NCCL per update group\")")


def init_custom_process_group(backend: str, host: str, port: int, rank: int, world_size: int,
                              group_name: str, timeout_s: float) -> Any:
    """A process group apart from the training one, built the way SGLang 0.5.23's
    `sglang.srt.utils.common.init_custom_process_group` builds the server's side: torch TCP
    rendezvous, the store wrapped in `PrefixStore(group_name, store)`, then torch's group
    helper (which adds its own "<group_name>/" prefix). Without the same wrap the two sides
    read different keys and never exchange the NCCL id. Private torch API (checked on torch
    2.13; SGLang uses the same); tests/test_nccl_rendezvous.py runs it against SGLang's."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{host}:{port}", rank, world_size,
                                              timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    # torch 2.6 renamed pg_options to backend_options (SGLang checks the same way)
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    options = "backend_options" if (major, minor) >= (2, 6) else "pg_options"
    with _unbound_default_group():
        pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store,
                                          group_name=group_name, timeout=timeout,
                                          **{options: None})
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_group(group: Any) -> None:
    """Free a group: a torch ProcessGroup, or vLLM's PyNcclCommunicator (its `destroy()`
    aborts the NCCL communicator; vLLM's own trainer engine does the same on shutdown)."""
    if group is None:
        return
    try:
        if isinstance(group, torch.distributed.ProcessGroup):
            torch.distributed.destroy_process_group(group)
        else:
            group.destroy()
    except Exception as e:  # noqa: BLE001 - a broken group may not tear down cleanly
        log.debug("destroy group: %r", e)


def run_with_watchdog(work: Callable[[], None], abort: Callable[[], None], timeout_s: float,
                      what: str) -> None:
    """Run `work` here; if it has not returned after `timeout_s`, call `abort` from another
    thread (which must make `work` return or raise: ncclCommAbort ends a communicator's
    pending operations) and raise TimeoutError once `work` is back."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        log.error("%s: no progress within %.0f s; aborting the communicator", what, timeout_s)
        abort()

    timer = threading.Timer(timeout_s, fire)
    timer.daemon = True
    timer.start()
    try:
        work()
    except Exception as e:
        if fired.is_set():
            raise TimeoutError(f"{what}: aborted after {timeout_s:.0f} s ({e})") from e
        raise
    finally:
        timer.cancel()
    if fired.is_set():
        raise TimeoutError(f"{what}: aborted after {timeout_s:.0f} s")


class _Call(threading.Thread):
    """The blocking /v1/weights call, on a thread while the broadcasts run."""

    def __init__(self, service: WeightsClient, http: httpx.Client, update: WeightUpdate) -> None:
        super().__init__(daemon=True)
        self.args = (service, http, update)
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        service, http, update = self.args
        try:
            self.response = service.post(update, client=http)
        except BaseException as e:  # noqa: BLE001 - reported by outcome()
            self.error = e

    def outcome(self, timeout_s: float) -> str | None:
        """None when the service took the update, else what went wrong."""
        self.join(timeout_s)
        if self.is_alive():
            return f"no answer within {timeout_s:.0f} s"
        if self.error is not None:
            return f"{type(self.error).__name__}: {self.error}"
        if self.response is None:
            return "no answer"
        try:
            check_reply(self.args[0].name, self.response)
        except UpdateRefused as e:
            return str(e)
        return None


class Peer:
    """One service's group and update protocol, trainer side."""

    def __init__(self, svc: ServiceEndpoint, cfg: NcclPush, port: int) -> None:
        self.svc = svc
        self.cfg = cfg
        self.port = port
        # A join given up on (the service refused, or timed out) still holds the rendezvous
        # port until its own timeout: the next group is made on another port meanwhile.
        self.abandoned: threading.Thread | None = None
        self.group: Any = None
        self.world_size: int | None = None  # 1 + the engine's GPUs, set by prepare()
        self.failed = False
        self.service = WeightsClient(svc.name, svc.url, secret_value(cfg.control_token))
        self.http = httpx.Client(timeout=httpx.Timeout(cfg.nccl_timeout_s,
                                                       connect=cfg.connect_timeout_s))

    @property
    def location(self) -> str:
        return f"{self.cfg.master_address}:{self.port}"

    @property
    def group_name(self) -> str:
        return group_name(self.svc.name)

    def group_key(self) -> str:
        return f"{self.location}/{self.group_name}x{self.world_size}"

    def _engine_info(self) -> dict[str, Any]:
        state = self.service.version(client=self.http, timeout=self.cfg.timeout_s)
        return dict(state.get("engine") or {})

    def engine_gpus(self, info: dict[str, Any]) -> int:
        """The engine's GPUs in the update group: the server's word when the service has it
        (a configured value must agree), else the configured value, else the service's."""
        reported = info.get("engine_world_size")
        configured = self.svc.engine_world_size
        if info.get("engine_world_size_from") == "server" and reported:
            if configured is not None and configured != int(reported):
                raise ValueError(
                    f"config error: push.services[{self.svc.name}].engine_world_size is "
                    f"{configured}, but its {self.svc.engine or 'engine'} server has "
                    f"{int(reported)} GPU(s) in a weight-update group (vLLM: TP x PP x DP; "
                    "SGLang: TP). The group would never form: remove engine_world_size (the "
                    "server's word is used) or set it to that")
            return int(reported)
        if configured is not None:
            return configured
        if not reported:
            raise RuntimeError(f"{self.svc.name}: engine_world_size unknown; set it in "
                               "push.services")
        return int(reported)

    def prepare(self) -> bool:
        """Decide init_group (step 1), after checking the group can form: its size (the
        server's) and the server's parallelism."""
        info = self._engine_info()
        self.world_size = self.engine_gpus(info) + 1
        dp = int(info.get("dp_size") or 1)
        if self.svc.engine == "sglang" and dp > 1:
            raise RuntimeError(
                f"{self.svc.name}: its SGLang server runs dp_size={dp}, and SGLang accepts NCCL "
                "weight updates only with dp_size 1. Run one server per replica, each its own "
                "entry in push.services, or set push.mode: disk (docs/deploy.md)")
        if self.cfg.nccl_backend == "nccl":
            check_nccl_versions(self.svc.name, local_nccl_version(self.svc.engine),
                                info.get("nccl_version"))
        pp = int(info.get("pp_size") or 1)
        if self.svc.engine == "sglang" and pp > 1:
            raise RuntimeError(
                f"{self.svc.name}: its SGLang server runs pp_size={pp}; SGLang ranks the update "
                "group's GPUs by tensor-parallel rank only, so pipeline stages would collide. "
                "Set push.mode: disk (docs/engines.md)")
        init = self.group is None or info.get("nccl_group") != self.group_key()
        if init and self.group is not None:
            destroy_group(self.group)
            self.group = None
        if init and self.abandoned is not None and self.abandoned.is_alive():
            self.port = _free_port()
            log.warning("%s: an abandoned rendezvous still holds its port; this update's group "
                        "uses port %d", self.svc.name, self.port)
        return init

    def update(self, version: int, buckets: list[Bucket], init: bool, run_id: str,
               canary: Canary | None = None) -> _Call:
        """Step 2: start the /v1/weights call (with the weight canary, protocol/canary.py)."""
        spec = NcclSpec(world_size=int(self.world_size or 2), rank_offset=1,
                        group_name=self.group_name, backend=self.cfg.nccl_backend,
                        packed=False, init_group=init, buckets=buckets)
        update = WeightUpdate(run_id=run_id, version=version, format="nccl",
                              location=self.location, meta={"nccl": spec.model_dump()},
                              canary=canary)
        call = _Call(self.service, self.http, update)
        call.start()
        return call

    def join_group(self) -> Any:
        """Step 3 (when init_group): rank 0 of the new group; returns it."""
        if self.svc.engine == "vllm":
            try:
                from vllm.distributed.weight_transfer.nccl_common import trainer_init
            except ImportError as e:
                raise RuntimeError("NCCL updates of a vLLM server need vllm (0.32, the pin of "
                                   "the trainer image) in the trainer's environment") from e
            return trainer_init({"master_address": self.cfg.master_address,
                                 "master_port": self.port,
                                 "world_size": self.world_size})
        return init_custom_process_group(
            self.cfg.nccl_backend, self.cfg.master_address, self.port, 0,
            int(self.world_size or 2), self.group_name, self.cfg.nccl_timeout_s)

    def send(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        """Step 4 for one bucket, tensor by tensor (packed=False on both sides)."""
        if self.svc.engine == "vllm":
            # vLLM's own trainer-side broadcast (NCCLTrainerWeightTransferEngine._broadcast,
            # unpacked branch): PyNccl on the current stream, contiguous tensors. PyNccl has
            # no timeout: the bucket (enqueue and completion) runs under the watchdog.
            group = self.group
            stream = torch.cuda.current_stream() if torch.cuda.is_available() else None

            def work() -> None:
                for _, t in bucket:
                    group.broadcast(t, src=0, stream=stream)
                if stream is not None:
                    stream.synchronize()

            run_with_watchdog(work, group.destroy, self.cfg.nccl_timeout_s,
                              f"{self.svc.name}: PyNccl broadcast")
            return
        for _, t in bucket:
            torch.distributed.broadcast(t, src=0, group=self.group)

    def reset(self) -> None:
        destroy_group(self.group)
        self.group = None


def _join_while_alive(peer: Peer, call: _Call) -> None:
    """Join the group on a thread, giving up as soon as the service's call has ended (it
    refused, or failed before its own join): never wait out the rendezvous timeout for a
    peer that is not coming."""
    error: list[BaseException] = []
    group: list[Any] = []

    def join() -> None:
        try:
            group.append(peer.join_group())
        except BaseException as e:  # noqa: BLE001 - re-raised below
            error.append(e)

    th = threading.Thread(target=join, daemon=True)
    th.start()
    deadline = time.monotonic() + peer.cfg.nccl_timeout_s
    while th.is_alive():
        th.join(0.05)
        if th.is_alive() and not call.is_alive():
            peer.abandoned = th  # it may still complete; its group is never used
            raise RuntimeError(f"{peer.svc.name} answered without joining the group: "
                               f"{call.outcome(0)}")
        if time.monotonic() > deadline:
            peer.abandoned = th
            raise TimeoutError(f"{peer.svc.name}: no rendezvous within {peer.cfg.nccl_timeout_s} s")
    if error:
        raise error[0]
    peer.group = group[0]


def _free_port() -> int:
    """A free TCP port on every interface (the engines connect from other hosts)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


_PEERS: dict[str, Peer] = {}  # this process's groups, kept between updates (rank 0)


def _peers(cfg: NcclPush) -> list[Peer]:
    out = []
    for i, svc in enumerate(cfg.services):
        if svc.name not in _PEERS:
            _PEERS[svc.name] = Peer(svc, cfg, cfg.master_port + i)  # one port per service
        out.append(_PEERS[svc.name])
    return out


def bucket_metadata(policy: Policy, plan: list[list[int]], dtype: torch.dtype) -> list[Bucket]:
    """The NcclSpec buckets of `plan`: real (gathered) shapes, all in the push dtype."""
    items = named_weights(policy.hf_model)
    return [Bucket(names=[items[i][0] for i in idx], dtypes=[dtype_name(dtype)] * len(idx),
                   shapes=[shape_of(items[i][1]) for i in idx]) for idx in plan]


def push_buckets(peers: list[Peer], version: int, meta: list[Bucket],
                 buckets: Iterable[list[tuple[str, torch.Tensor]]], res: PushResult, *,
                 run_id: str, timeout_s: float, canary: Canary | None = None) -> None:
    """Rank 0's half of one update to every peer: steps 1-5 of the module docstring.
    `buckets` yields each bucket's tensors (as `meta` announces them) and is always consumed
    to the end -- under ZeRO-3 it is a collective the other ranks run in step. Outcomes go
    into `res` (ok / failed per service); a failed peer's group is dropped."""
    live: list[tuple[Peer, _Call]] = []
    for peer in peers:
        try:
            init = peer.prepare()
            call = peer.update(version, meta, init, run_id, canary)
            if init:
                _join_while_alive(peer, call)
            live.append((peer, call))
        except Exception as e:  # noqa: BLE001 - reported; the other services go on
            res.failed[peer.svc.name] = f"{type(e).__name__}: {e}"
            peer.reset()
    sending = list(live)
    for bucket in buckets:
        tensors = [(n, t.contiguous()) for n, t in bucket]
        for peer, call in list(sending):
            if not call.is_alive():  # the service answered before the last bucket: it failed
                res.failed[peer.svc.name] = f"ended before the broadcast: {call.outcome(0)}"
                sending.remove((peer, call))
                continue
            try:
                peer.send(tensors)
            except Exception as e:  # noqa: BLE001
                res.failed[peer.svc.name] = f"broadcast: {type(e).__name__}: {e}"
                sending.remove((peer, call))
    for peer, call in live:
        why = call.outcome(timeout_s)
        if why is None and peer.svc.name not in res.failed:
            res.ok.append(peer.svc.name)
        else:
            res.failed.setdefault(peer.svc.name, why or "failed")
            if call.response is not None and (v := canary_verdict(call.response)) is not None:
                res.canary_refused[peer.svc.name] = v  # loaded, but not the pushed weights
            peer.reset()  # a failed update leaves the group unusable: rebuild next time


def nccl_push_all(policy: Policy, cfg: NcclPush, *, version: int, dtype: torch.dtype,
                  run_id: str = "rlrt", canary: Canary | None = None) -> PushResult | None:
    """Collective: every rank iterates the gathered buckets; rank 0 drives the services and
    broadcasts. Returns the result on rank 0, None elsewhere."""
    t0 = time.perf_counter()
    plan = plan_buckets(named_weights(policy.hf_model), int(cfg.bucket_mb * 1024**2), dtype)
    gathered = iter_gathered(policy, 0, dtype, plan=plan)
    if policy.rank != 0:
        for _ in gathered:
            pass
        return None
    res = PushResult(version=version, location=f"{cfg.master_address}:{cfg.master_port}")
    push_buckets(_peers(cfg), version, bucket_metadata(policy, plan, dtype), gathered, res,
                 run_id=run_id, timeout_s=cfg.nccl_timeout_s, canary=canary)
    res.write_s = time.perf_counter() - t0
    for name, why in res.failed.items():
        log.error("NCCL weight push v%d to %s failed: %s", version, name, why)
    return res


class NcclTransport(WeightTransport):
    """Every push by NCCL broadcast (the collective `nccl_push_all`, announced by rank 0).
    Used as the fast path of NcclWithDiskFallback, which is what `push.mode: nccl` runs."""

    async def push(self, version: int, ranks: Collectives, *, index: int,
                   canary: Canary | None) -> PushResult:
        return await ranks.broadcast_nccl(version, canary)

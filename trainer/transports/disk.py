"""Disk transport (CPU and GPU): write the weights once as an atomic safetensors directory
with a sha256 manifest (protocol.weights), then tell every service where it is:

    POST {service}/v1/weights   Authorization: Bearer <token>
    body: WeightUpdate{version, format: "safetensors_dir", location: <dir>, sha256: <digest>}

All services are called concurrently (protocol/weights_client.py). A call that fails for a
reason that may pass (connection error, timeout, 5xx -- 502 engine failed, 503 engine not up
yet -- 408, 429) is retried with exponential backoff up to `retries` times. A refusal is not
retried: 409 (hash mismatch, stale version: the old version keeps serving, docs/engines.md),
401, 413, 422. A service still failing is *reported* -- returned in the result, logged,
counted in the metrics -- and the trainer goes on (or stops, with on_failure=raise); its
samples then come back stale and the driver drops them. Every call has a timeout and the whole
push a deadline: a service can slow the trainer down, never hang it.

With push.overlap a push returns once the directory is written -- the weights may change from
there on -- and the services are notified in the background (`in_flight`, `settle`).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

import httpx
import torch
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from protocol.canary import Canary
from protocol.config import secret_value
from protocol.messages import WeightUpdate
from protocol.weights import save_weights_dir
from protocol.weights_client import UpdateRefused, WeightsClient, check_reply
from trainer.config import DiskPush, ServiceEndpoint
from trainer.transports.base import Collectives, PushResult, WeightTransport

log = logging.getLogger("rlrt.trainer.push")


def _retryable(e: BaseException) -> bool:
    if isinstance(e, UpdateRefused):
        return e.retryable
    return isinstance(e, httpx.TransportError)  # connect / read timeouts, refused, reset


class WeightPusher:
    """Writes weight directories under `root` and notifies the services."""

    def __init__(self, cfg: DiskPush, root: str | Path, run_id: str,
                 extra_files: dict[str, bytes | str] | None = None) -> None:
        self.cfg = cfg
        self.root = Path(root)
        self.run_id = run_id
        self.extra_files = extra_files or {}
        # Versions this process wrote, oldest first: only these are worth keeping (see prune).
        self.written: list[int] = []
        self.last_update: WeightUpdate | None = None  # the newest directory written, named
        # One HTTP client for every push of the run (of one event loop): a new client per push
        # built a TLS context each time (~10 ms of the event loop's CPU and GIL, taken from the
        # update running beside it) and opened new connections.
        self._http: httpx.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ disk
    def dir_for(self, version: int) -> Path:
        return self.root / f"v{version:08d}"

    def write(self, state_dict: dict[str, torch.Tensor], version: int) -> tuple[Path, str]:
        path = self.dir_for(version)
        sha = save_weights_dir(state_dict, path, version=version, extra_files=self.extra_files,
                               durable=self.cfg.fsync)
        if version in self.written:
            self.written.remove(version)
        self.written.append(version)
        self.prune()
        return path, sha

    def prune(self) -> None:
        """Keep the `keep` directories this process wrote last; delete every other one.

        A resumed run owns its versions: directories left by an earlier process -- above all
        a killed run's versions *past* the checkpoint this run resumed from -- are stale, and
        keeping "the highest-numbered" ones would delete the directory just written (its
        push then fails with 409 at every service) and hand a revived service the dead run's
        weights. Before this process has written anything, nothing is deleted."""
        if not self.written:
            return
        keep = {self.dir_for(v).name for v in self.written[-self.cfg.keep:]}
        for old in self.root.glob("v*"):
            if old.is_dir() and old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ HTTP
    def client(self, svc: ServiceEndpoint) -> WeightsClient:
        return WeightsClient(svc.name, svc.url, secret_value(self.cfg.control_token))

    def http(self) -> httpx.AsyncClient:
        """The run's HTTP client (kept alive between pushes), for the running event loop."""
        loop = asyncio.get_running_loop()
        if self._http is None or self._http.is_closed or self._http_loop is not loop:
            timeout = httpx.Timeout(self.cfg.timeout_s, connect=self.cfg.connect_timeout_s)
            self._http, self._http_loop = httpx.AsyncClient(timeout=timeout), loop
        return self._http

    async def close(self) -> None:
        if self._http is not None and self._http_loop is asyncio.get_running_loop():
            await self._http.aclose()
        self._http = self._http_loop = None

    async def _post_one(self, client: httpx.AsyncClient, svc: ServiceEndpoint,
                        update: WeightUpdate, attempts: dict[str, int]) -> None:
        service = self.client(svc)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.cfg.retries),
            wait=wait_exponential(multiplier=self.cfg.retry_backoff_s, max=30),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                attempts[svc.name] = attempt.retry_state.attempt_number
                check_reply(svc.name, await service.apost(client, update))

    async def notify(self, update: WeightUpdate, services: list[ServiceEndpoint] | None = None
                     ) -> PushResult:
        """POST `update` to every service concurrently; never raises for a service failure."""
        services = self.cfg.services if services is None else services
        res = PushResult(version=update.version, location=update.location, sha256=update.sha256)
        if not services:
            return res
        t0 = time.perf_counter()
        client = self.http()
        tasks = {s.name: asyncio.ensure_future(self._post_one(client, s, update, res.attempts))
                 for s in services}
        done, pending = await asyncio.wait(tasks.values(), timeout=self.cfg.deadline_s)
        for f in pending:
            f.cancel()
        for name, f in tasks.items():
            if f in pending:
                res.failed[name] = f"no success within the push deadline of {self.cfg.deadline_s:.0f} s"
            elif f.exception() is not None:
                e = f.exception()
                res.failed[name] = f"{type(e).__name__}: {e}"
                if isinstance(e, UpdateRefused) and e.canary is not None:
                    res.canary_refused[name] = e.canary
            else:
                res.ok.append(name)
        res.notify_s = time.perf_counter() - t0
        for name, why in res.failed.items():
            if name in res.canary_refused:
                log.error("weight push v%d: %s loaded the weights but its weight canary does "
                          "not match (max |delta log-prob| %s, tolerance %s): %s", update.version,
                          name, res.canary_refused[name].get("max_diff"),
                          res.canary_refused[name].get("tolerance"), why)
                continue
            log.error("weight push v%d to %s failed after %d attempt(s): %s", update.version,
                      name, res.attempts.get(name, 0), why)
        return res

    async def write_update(self, state_dict: dict[str, torch.Tensor], version: int,
                           meta: dict | None = None, canary: Canary | None = None
                           ) -> tuple[WeightUpdate, float]:
        """Write the directory (in a thread: it is disk and hashing work); return the
        WeightUpdate that names it (with `canary`, protocol/canary.py) and the seconds the
        write took."""
        t0 = time.perf_counter()
        path, sha = await asyncio.to_thread(self.write, state_dict, version)
        update = WeightUpdate(run_id=self.run_id, version=version, format="safetensors_dir",
                              location=str(path.resolve()), sha256=sha, meta=meta or {},
                              canary=canary)
        self.last_update = update
        return update, time.perf_counter() - t0

    async def push(self, state_dict: dict[str, torch.Tensor], version: int,
                   services: list[ServiceEndpoint] | None = None,
                   meta: dict | None = None, canary: Canary | None = None) -> PushResult:
        """Write the directory, then notify `services` (default: all); `meta` and `canary`
        go into the WeightUpdate."""
        update, write_s = await self.write_update(state_dict, version, meta, canary)
        res = await self.notify(update, services)
        res.write_s = write_s
        return res


class DiskTransport(WeightTransport):
    """push.mode disk: every push by a weight directory."""

    def __init__(self, cfg: DiskPush, pusher: WeightPusher) -> None:
        self.cfg = cfg
        self.pusher = pusher
        self.notifying: asyncio.Task[PushResult] | None = None  # a push loading in the background

    @property
    def in_flight(self) -> bool:
        return self.notifying is not None

    async def push(self, version: int, ranks: Collectives, *, index: int,
                   canary: Canary | None) -> PushResult:
        first = index == 0
        sd = await ranks.gather_weights()
        # The first push of a process may go *back* in version (a resumed run whose services
        # had loaded later weights from the killed one): say so explicitly.
        meta = {"reason": "start", "allow_rollback": True} if first else {"reason": "step"}
        if self.cfg.overlap and not first:
            update, write_s = await self.pusher.write_update(sd, version, meta, canary)
            self.notifying = asyncio.create_task(self.pusher.notify(update))
            return PushResult(version=version, location=update.location,
                              sha256=update.sha256, write_s=write_s)
        return await self.pusher.push(sd, version, meta=meta, canary=canary)

    async def push_to(self, services: list[ServiceEndpoint], version: int, ranks: Collectives,
                      canary: Canary | None) -> PushResult:
        """A synchronous push of `version` to `services` only (another transport's fallback)."""
        sd = await ranks.gather_weights()
        return await self.pusher.push(sd, version, services=services, canary=canary)

    async def catch_up(self, services: list[ServiceEndpoint], version: int, ranks: Collectives,
                       canary: Canary | None) -> PushResult:
        # The directory of `version` is still on disk when it was the last one written (the
        # usual case: the services lag the push just made): name it again rather than
        # rewrite it under a service that may be reading it.
        last = self.pusher.last_update
        if last is not None and last.version == version and Path(last.location).is_dir():
            update = last.model_copy(update={"meta": {"reason": "catch_up"}})
            return await self.pusher.notify(update, services)
        return await self.push_to(services, version, ranks, canary)

    async def settle(self) -> PushResult | None:
        if self.notifying is None:
            return None
        res = await self.notifying
        self.notifying = None
        return res

    async def close(self) -> None:
        await self.pusher.close()

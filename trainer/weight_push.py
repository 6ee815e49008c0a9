"""Weight push, disk path (CPU and GPU): write the weights once as an atomic safetensors
directory with a sha256 manifest (protocol.weights), then tell every service where it is:

    POST {service}/v1/weights   Authorization: Bearer <token>
    body: WeightUpdate{version, format: "safetensors_dir", location: <dir>, sha256: <digest>}

All services are called concurrently. A call that fails for a reason that may pass
(connection error, timeout, 5xx -- 502 engine failed, 503 engine not up yet -- 408, 429) is
retried with exponential backoff up to `retries` times. A refusal is not retried: 409 (hash
mismatch, stale version: the old version keeps serving, docs/engines.md), 401, 413, 422. A service still failing is *reported* -- returned in the
result, logged, counted in the metrics -- and the trainer goes on (or stops, with
on_failure=raise); its samples then come back stale and the driver drops them. Every call
has a timeout and the whole push a deadline: a service can slow the trainer down, never hang it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from dataclasses import dataclass, field
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
from trainer.config import PushConfig, ServiceEndpoint

log = logging.getLogger("rlrt.trainer.push")

_RETRY_STATUS = {408, 425, 429}


class PushError(RuntimeError):
    """One service refused or failed an update; `retryable` says whether to try again.
    `canary`: the service's weight-canary verdict when that is why it refused."""

    def __init__(self, msg: str, retryable: bool, canary: dict | None = None) -> None:
        super().__init__(msg)
        self.retryable = retryable
        self.canary = canary


def _retryable(e: BaseException) -> bool:
    if isinstance(e, PushError):
        return e.retryable
    return isinstance(e, httpx.TransportError)  # connect / read timeouts, refused, reset


@dataclass
class PushResult:
    version: int
    location: str | None = None
    sha256: str | None = None
    ok: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    # services that loaded the weights but refused them because the weight canary did not
    # match (max_diff, tolerance, ...): they serve another version, or nothing (consistent)
    canary_refused: dict[str, dict] = field(default_factory=dict)
    write_s: float = 0.0
    notify_s: float = 0.0


def canary_verdict(r: httpx.Response) -> dict | None:
    """The weight-canary verdict of a 409 (`{max_diff, tolerance, sequence, position,
    consistent, version}`), or None when the refusal had another reason."""
    if r.status_code != 409:
        return None
    try:
        body = r.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("canary"), dict):
        return None
    return {**body["canary"], "consistent": body.get("consistent", True),
            "version": body.get("version")}


def _check_reply(svc: ServiceEndpoint, r: httpx.Response) -> None:
    if r.status_code >= 300:
        detail = r.text[:500]
        retry = r.status_code >= 500 or r.status_code in _RETRY_STATUS
        raise PushError(f"{svc.name}: HTTP {r.status_code}: {detail}", retry, canary_verdict(r))
    try:
        body = r.json()
    except ValueError:
        return
    if isinstance(body, dict) and (body.get("ok") is False or body.get("success") is False):
        raise PushError(f"{svc.name}: refused: {body}", False)


class WeightPusher:
    """Writes weight directories under `root` and notifies the services."""

    def __init__(self, cfg: PushConfig, root: str | Path, run_id: str,
                 extra_files: dict[str, bytes | str] | None = None) -> None:
        self.cfg = cfg
        self.root = Path(root)
        self.run_id = run_id
        self.extra_files = extra_files or {}
        # Versions this process wrote, oldest first: only these are worth keeping (see prune).
        self.written: list[int] = []

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
    def _headers(self) -> dict[str, str]:
        h = {"content-type": "application/json"}
        if self.cfg.control_token:
            h["authorization"] = f"Bearer {secret_value(self.cfg.control_token)}"
        return h

    async def _post_one(self, client: httpx.AsyncClient, svc: ServiceEndpoint,
                        update: WeightUpdate, attempts: dict[str, int]) -> None:
        body = update.model_dump_json()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.cfg.retries),
            wait=wait_exponential(multiplier=self.cfg.retry_backoff_s, max=30),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                attempts[svc.name] = attempt.retry_state.attempt_number
                r = await client.post(f"{svc.url.rstrip('/')}/v1/weights", content=body,
                                      headers=self._headers())
                _check_reply(svc, r)

    async def notify(self, update: WeightUpdate, services: list[ServiceEndpoint] | None = None
                     ) -> PushResult:
        """POST `update` to every service concurrently; never raises for a service failure."""
        services = self.cfg.services if services is None else services
        res = PushResult(version=update.version, location=update.location, sha256=update.sha256)
        if not services:
            return res
        t0 = time.perf_counter()
        timeout = httpx.Timeout(self.cfg.timeout_s, connect=self.cfg.connect_timeout_s)
        async with httpx.AsyncClient(timeout=timeout) as client:
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
                    if isinstance(e, PushError) and e.canary is not None:
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

"""What the SGLang and vLLM clients share: the pause gate, in-flight accounting, the policy
version, and the weight-update transaction that never leaves a half-updated engine serving.

The transaction (one at a time):
1. Validate everything we can without touching the engine (manifest + sha256 of a weight
   directory, the nccl metadata, version monotonicity). Any problem: refuse, nothing changed.
2. Close our gate (new requests wait), pause the server (subclass), update (subclass).
3. Success: adopt the new version. A clean refusal by the server (it says it kept its old
   weights, e.g. SGLang's disk-load rollback): keep the old version, report the error.
   Anything else (timeout, 5xx, NCCL bucket failure, vLLM reload error) may have left the
   server's weights half-written: reload the last known-good weight directory if we have one;
   otherwise mark the engine *inconsistent* (quarantine): generate/score calls wait for a
   later successful update (up to `quarantine_wait_s`, then fail) and /readyz reports
   not-ready meanwhile. Never serve mixed weights.
   An update carrying a weight canary (protocol/canary.py) is only a success once the server,
   resumed but still behind our closed gate, reproduces the trainer's log-probs for it; a
   mismatch is handled like a failed load (rollback, verified with the previous version's
   canary, or quarantine): the server reported success but serves other weights.
4. Always resume the server and reopen the gate (unless the operator paused us).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from protocol.canary import DEFAULT_TOLERANCE, Canary
from protocol.messages import WeightUpdate
from protocol.weights import WeightsError, verify_weights_dir
from services.engines.base import (
    Engine,
    EngineClosed,
    EngineError,
    UpstreamError,
    WeightUpdateError,
)
from services.engines.canary_check import check_canary_shape, judge_canary
from services.engines.http import EngineHTTP
from services.engines.nccl_sync import GroupKey, NcclSpec, nccl_spec

log = logging.getLogger("rlrt.engines")

UPDATES = Counter("rlrt_engine_weight_updates_total", "weight updates", ["engine", "format", "result"])
UPDATE_SECONDS = Histogram("rlrt_engine_weight_update_seconds", "weight update time", ["engine", "format"],
                           buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))
VERSION = Gauge("rlrt_engine_version", "policy version being served", ["engine"])
INCONSISTENT = Gauge("rlrt_engine_inconsistent", "1 while the engine's weights are unusable", ["engine"])
RETRIES = Counter("rlrt_engine_regenerations_total", "requests redone after an abort", ["engine"])


class UpdateRefused(WeightUpdateError):
    """The engine refused the update and (by its own account) kept its old weights."""


class RemoteEngine(Engine):
    """Base of the HTTP engine clients. Subclasses implement the `_srv_*` hooks."""

    kind = "remote"

    def __init__(self, http: EngineHTTP, *, vocab_size: int | None = None,
                 context_len: int | None = None, verify_weights: bool = True,
                 weight_timeout_s: float = 600.0, abort_retries: int = 3,
                 engine_world_size: int = 1, quarantine_wait_s: float = 300.0,
                 canary_check: bool = True, canary_tolerance: Mapping[str, float] | None = None,
                 serving_dtype: str | None = None) -> None:
        self.http = http
        self.vocab_size = vocab_size
        self.context_len = context_len
        self.verify_weights = verify_weights
        self.weight_timeout_s = weight_timeout_s
        self.abort_retries = abort_retries
        self.engine_world_size = engine_world_size
        self.quarantine_wait_s = quarantine_wait_s
        self.canary_check = canary_check
        self.canary_tolerance = dict(canary_tolerance or DEFAULT_TOLERANCE)
        self.serving_dtype = serving_dtype
        self._canary: Canary | None = None  # the serving version's canary (checks a rollback)
        self._version = 0
        self._sha: str | None = None
        self._last_dir: str | None = None  # weights we can reload to undo a failed update
        self._usable = asyncio.Event()  # set = consistent: the weights are one known version
        self._usable.set()
        self._last_error: str | None = None
        self._group: GroupKey | None = None
        self._gate = asyncio.Event()
        self._gate.set()
        self._user_paused = False
        self._inflight = 0
        self._lock = asyncio.Lock()
        self._closed = False

    # ------------------------------------------------------------------ hooks
    async def _srv_reported(self) -> tuple[bool, int | None]:
        """(the server reports a weight version, that version if it is one of ours).
        (True, None) = a version that is not ours, e.g. SGLang's "default" after a restart."""
        raise NotImplementedError

    async def _srv_context_len(self) -> int | None:
        data = await self.http.get("/v1/models", timeout_s=30)
        try:
            return int(data["data"][0]["max_model_len"])
        except (KeyError, IndexError, TypeError, ValueError):
            return None

    async def _srv_pause(self) -> None:
        raise NotImplementedError

    async def _srv_resume(self) -> None:
        raise NotImplementedError

    async def _srv_load_dir(self, path: str, version: int) -> None:
        raise NotImplementedError

    async def _srv_nccl(self, spec: NcclSpec, key: GroupKey, version: int) -> None:
        raise NotImplementedError

    async def _srv_healthy(self) -> bool:
        raise NotImplementedError

    async def _srv_score(self, sequences: list[list[int]], offsets: list[int]) -> list[np.ndarray]:
        """score() without our gate (closed during an update): for the weight canary."""
        raise NotImplementedError

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Learn what we can from the server: its version (a restarted service adopts the
        engine's) and its context window. Raises UpstreamError if it does not answer."""
        _known, v = await self._srv_reported()
        self._version = v if v is not None else 0
        VERSION.labels(self.kind).set(self._version)
        INCONSISTENT.labels(self.kind).set(0)
        if self.context_len is None:
            self.context_len = await self._srv_context_len()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._gate.set()  # release waiters so they see the closed flag
            await self.http.close()

    @property
    def version(self) -> int:
        return self._version

    @property
    def consistent(self) -> bool:
        return self._usable.is_set()

    @property
    def _consistent(self) -> bool:
        return self._usable.is_set()

    def _quarantine(self, msg: str) -> None:
        if self._usable.is_set():
            log.error("%s engine quarantined: %s", self.kind, msg)
        self._usable.clear()
        self._last_error = msg
        INCONSISTENT.labels(self.kind).set(1)

    @contextlib.asynccontextmanager
    async def _request_slot(self) -> AsyncIterator[None]:
        """Wait for the gate; while the weights are unusable (quarantine) wait up to
        `quarantine_wait_s` for the update that fixes them -- the message stays with this
        worker instead of burning its bus retries -- then fail. Counts in-flight requests."""
        while True:
            await self._gate.wait()
            if self._closed:
                raise EngineClosed(f"{self.kind} engine is closed")
            if self._usable.is_set():
                break
            try:
                await asyncio.wait_for(self._usable.wait(), self.quarantine_wait_s)
            except asyncio.TimeoutError:
                raise UpstreamError(
                    f"{self.kind} engine weights are inconsistent ({self._last_error}); no "
                    f"successful update within {self.quarantine_wait_s:g}s") from None
        self._inflight += 1
        try:
            yield
        finally:
            self._inflight -= 1

    async def pause(self) -> None:
        self._user_paused = True
        self._gate.clear()

    async def resume(self) -> None:
        self._user_paused = False
        if not self._lock.locked():  # an update in progress reopens the gate when done
            self._gate.set()

    def _stamp(self, reported: int | None) -> int:
        """Check a version the server reports against ours. A mismatch outside an update
        means the server lost our weights (restarted: back to its base model) or someone
        else changed them: quarantine rather than stamp samples with a wrong version."""
        v = 0 if reported is None else reported
        if v != self._version and not self._lock.locked():
            msg = (f"{self.kind} server reports weight version {reported} but this service "
                   f"loaded {self._version} (server restarted?); push the weights again")
            self._quarantine(msg)
            raise UpstreamError(msg)
        return v

    async def health(self) -> dict[str, Any]:
        try:
            up = await self._srv_healthy()
            if up and self._consistent and not self._lock.locked():
                known, reported = await self._srv_reported()
                if known:
                    self._stamp(reported)
        except EngineError:
            up = False
        return {
            "ok": up and self._consistent, "upstream_ok": up, "version": self._version,
            "paused": not self._gate.is_set(), "consistent": self._consistent,
            "inflight": self._inflight, "engine": self.kind, "url": self.http.base_url,
            "nccl_group": str(self._group) if self._group else None,
            "engine_world_size": self.engine_world_size, "last_error": self._last_error,
        }

    # ------------------------------------------------------------------ weights
    async def update_weights(self, update: WeightUpdate) -> int:
        if self._closed:
            raise EngineClosed(f"{self.kind} engine is closed")
        async with self._lock:
            old = self._version
            if update.version < old and not update.meta.get("allow_rollback"):
                raise WeightUpdateError(f"stale update: version {update.version} < serving {old}")
            if (update.version == old and self._consistent and update.format == "safetensors_dir"
                    and update.sha256 is not None and update.sha256 == self._sha):
                return old  # a retried request for what we already serve
            spec = key = None
            if update.canary is not None and self.canary_check:
                check_canary_shape(update.canary, self.vocab_size, self.context_len)
            if update.format == "safetensors_dir":
                await self._verify_dir(update)
            else:
                spec, key = nccl_spec(update)
            start = time.perf_counter()
            self._gate.clear()
            try:
                await self._transaction(update, spec, key, old)
            except WeightUpdateError:
                UPDATES.labels(self.kind, update.format, "failed").inc()
                raise
            finally:
                with contextlib.suppress(EngineError):
                    await self._srv_resume()
                if not self._user_paused:
                    self._gate.set()
            UPDATES.labels(self.kind, update.format, "ok").inc()
            UPDATE_SECONDS.labels(self.kind, update.format).observe(time.perf_counter() - start)
            return self._version

    async def _verify_dir(self, update: WeightUpdate) -> None:
        if not self.verify_weights:
            return
        try:
            await asyncio.to_thread(verify_weights_dir, update.location, update.sha256)
        except WeightsError as e:
            raise WeightUpdateError(f"refused {update.location}: {e}") from None

    async def _transaction(self, update: WeightUpdate, spec: NcclSpec | None,
                           key: GroupKey | None, old: int) -> None:
        try:
            await self._srv_pause()
            if spec is not None and key is not None:
                await self._srv_nccl(spec, key, update.version)
            else:
                await self._srv_load_dir(update.location, update.version)
            canary = update.canary if self.canary_check else None
            if canary is not None:
                await self._verify_canary(canary, update.version)
        except UpdateRefused as e:
            self._last_error = str(e)
            raise
        except EngineError as e:
            await self._recover(e, old)  # always raises
        self._version = update.version
        self._sha = update.sha256
        self._canary = update.canary
        self._last_dir = update.location if spec is None else None
        self._last_error = None
        self._usable.set()
        VERSION.labels(self.kind).set(self._version)
        INCONSISTENT.labels(self.kind).set(0)

    async def _verify_canary(self, canary: Canary, version: int) -> None:
        """Score the canary on the server (running, behind our closed gate); raise
        CanaryMismatch (a WeightUpdateError) when it does not reproduce the trainer's values."""
        await self._srv_resume()  # a paused server queues requests: it must run to score
        try:
            served = await self._srv_score(canary.sequences, [1] * len(canary.sequences))
            judge_canary(self.kind, canary, served, version, self.canary_tolerance,
                         self.serving_dtype)
        except EngineError:
            with contextlib.suppress(EngineError):
                await self._srv_pause()  # what follows (rollback) expects a paused server
            raise

    async def _recover(self, err: EngineError, old: int) -> None:
        """The server may hold a mix of old and new weights (or, after a canary mismatch,
        other weights than the pushed ones): reload the old ones or quarantine."""
        self._group = None  # a failed broadcast leaves the group unusable on both sides
        msg = f"weight update failed: {err}"
        if self._last_dir is not None:
            try:
                await self._srv_load_dir(self._last_dir, old)
                if self._canary is not None and self.canary_check:
                    await self._verify_canary(self._canary, old)
            except EngineError as e2:
                msg += f"; rollback to {self._last_dir} failed too: {e2}"
            else:
                self._last_error = msg
                raise _with_canary(WeightUpdateError(
                    f"{msg}; rolled back to version {old} from {self._last_dir}"), err) from None
        else:
            msg += "; no known-good weight directory to roll back to"
        self._quarantine(msg)
        raise _with_canary(WeightUpdateError(
            f"{msg}; the engine refuses requests until a successful update"), err) from None


def _with_canary(exc: WeightUpdateError, cause: EngineError) -> WeightUpdateError:
    """Carry a canary verdict from the failure to the error the caller sees (409 body)."""
    exc.canary_result = getattr(cause, "canary_result", None)  # type: ignore[attr-defined]
    return exc

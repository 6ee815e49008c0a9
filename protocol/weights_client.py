"""The one client of a service's weight control API (services/engines/control_api.py):

    POST {url}/v1/weights   Authorization: Bearer <token>   body: WeightUpdate (JSON)
    GET  {url}/v1/version   the serving version and the engine's state

used by the trainer's transports (trainer/transports/) and by the launcher when it brings a
restarted service back to the newest pushed weights (rlrt/repush.py).
No torch here: the launcher imports it.

How a reply reads (`check_reply`): 2xx with no `{"ok": false}` is done; 5xx, 408, 425 and 429
may pass (retryable); any other status is a refusal (409: hash mismatch, stale version, a
weight canary that does not match -- the old version keeps serving; 401, 413, 422).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx

from protocol.messages import WeightUpdate

_RETRY_STATUS = {408, 425, 429}


class UpdateRefused(RuntimeError):
    """A service refused or failed an update; `retryable` says whether to try again.
    `canary`: the service's weight-canary verdict when that is why it refused."""

    def __init__(self, msg: str, retryable: bool, canary: dict | None = None) -> None:
        super().__init__(msg)
        self.retryable = retryable
        self.canary = canary


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


def check_reply(name: str, r: httpx.Response) -> None:
    """Raise UpdateRefused unless `r` (service `name`'s answer to /v1/weights) says done."""
    if r.status_code >= 300:
        retry = r.status_code >= 500 or r.status_code in _RETRY_STATUS
        raise UpdateRefused(f"{name}: HTTP {r.status_code}: {r.text[:500]}", retry,
                            canary_verdict(r))
    try:
        body = r.json()
    except ValueError:
        return
    if isinstance(body, dict) and (body.get("ok") is False or body.get("success") is False):
        raise UpdateRefused(f"{name}: refused: {body}", False)


class WeightsClient:
    """One service's control API. The calls raise httpx errors (connection, timeout) as
    they come; `check_reply` reads an answer."""

    def __init__(self, name: str, url: str, token: str | None = None) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.headers = {"content-type": "application/json"}
        if token:
            self.headers["authorization"] = f"Bearer {token}"

    def post(self, update: WeightUpdate, *, client: httpx.Client | None = None,
             timeout: httpx.Timeout | float = 300.0) -> httpx.Response:
        """POST the update and return the answer (blocking: a thread of the NCCL transport,
        or the launcher)."""
        if client is not None:
            return client.post(f"{self.url}/v1/weights", content=update.model_dump_json(),
                               headers=self.headers)
        return httpx.post(f"{self.url}/v1/weights", content=update.model_dump_json(),
                          headers=self.headers, timeout=timeout)

    async def apost(self, client: httpx.AsyncClient, update: WeightUpdate) -> httpx.Response:
        """POST the update on `client` (its timeouts apply) and return the answer."""
        return await client.post(f"{self.url}/v1/weights", content=update.model_dump_json(),
                                 headers=self.headers)

    def version(self, *, client: httpx.Client | None = None,
                timeout: float = 60.0) -> dict[str, Any]:
        """GET /v1/version: `{version, ready, paused, engine: {...}}`; raises on a non-2xx."""
        get = client.get if client is not None else httpx.get
        r = get(f"{self.url}/v1/version", headers=self.headers, timeout=timeout)
        r.raise_for_status()
        return dict(r.json())


def newest_weights(root: str | Path, run_id: str) -> WeightUpdate | None:
    """The update naming the highest-versioned weight directory under `root` (what a restarted
    service is given), or None when there is none. The directory's digest is the sha256 of
    its manifest.json (protocol/weights.py)."""
    best: tuple[int, Path, str] | None = None
    for manifest in Path(root).glob("*/manifest.json"):
        try:
            raw = manifest.read_bytes()
            version = int(json.loads(raw).get("version", -1))
        except (OSError, ValueError):
            continue
        if version < 0:
            continue  # not a manifest this project wrote
        if best is None or version > best[0]:
            best = (version, manifest.parent, hashlib.sha256(raw).hexdigest())
    if best is None:
        return None
    return WeightUpdate(run_id=run_id, version=best[0], location=str(best[1]), sha256=best[2])

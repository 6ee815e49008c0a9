"""Bring a restarted engine service to the newest weights, and say what it then serves.

The launcher revives a service (rlrt/supervisor.py) or the vLLM server under it
(rlrt/engine_servers.py); either way the service comes back on base weights, and the trainer's
next push may be a step away. The line printed afterwards states the version the service
itself reports on GET /v1/version, not the version that was sent: a refused or failed push
leaves it serving something else, and the line must say so.
"""

from __future__ import annotations

import httpx

from protocol.messages import WeightUpdate
from protocol.weights_client import WeightsClient


def served_version(client: WeightsClient, timeout: float = 60.0) -> tuple[int | None, str]:
    """(the version the service reports, how to print it): None and the reason when it does
    not answer."""
    try:
        state = client.version(timeout=timeout)
    except (httpx.HTTPError, ValueError) as e:
        return None, f"unknown (GET /v1/version: {type(e).__name__})"
    v = state.get("version")
    if not isinstance(v, int):
        return None, f"unknown (/v1/version answered {state!r:.80})"
    return v, f"{v}" + ("" if state.get("ready", True) else " (not ready)")


def repush(client: WeightsClient, latest: WeightUpdate | None, timeout: float = 300.0) -> str:
    """POST `latest` to the service unless it already serves it (the trainer's own push got
    there first); return one line: what it serves now, by its own answer, and the push's."""
    name = client.name
    served, shown = served_version(client)
    if latest is None:
        return f"{name} back, serving weights version {shown} (the trainer has published none)"
    if served is not None and served >= latest.version:
        return f"{name} back, serving weights version {shown} (already up to date)"
    try:
        r = client.post(latest, timeout=timeout)
        push = f"pushed version {latest.version}: {r.status_code}"
    except httpx.HTTPError as e:  # the trainer's next push brings it up to date
        push = f"push of version {latest.version} failed: {e!r}; the trainer's next push retries"
    _, shown = served_version(client)
    return f"{name} back, serving weights version {shown} ({push})"

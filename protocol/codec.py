"""Message <-> bytes. msgpack of the pydantic python-mode dump: arrays are raw bytes."""

from __future__ import annotations

from typing import TypeVar

import msgpack
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def encode(msg: BaseModel) -> bytes:
    return msgpack.packb(msg.model_dump(mode="python"), use_bin_type=True)


def decode(data: bytes, msg_type: type[M]) -> M:
    """Raises ValueError (msgpack) or pydantic.ValidationError on bad input."""
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise ValueError(f"payload is not msgpack: {e}") from e
    return msg_type.model_validate(obj)

"""Compact binary arrays for pydantic messages.

Token ids and log-probs are the bulk of every message. They travel as packed little-endian
bytes (msgpack `bin`, or base64 in JSON), never as JSON lists of floats: 8 x 1,024 log-probs
are 32 KiB as float32 bytes but ~200 KiB as JSON text.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

import numpy as np
from pydantic import PlainSerializer, PlainValidator, SerializationInfo, WithJsonSchema


def _validator(dtype: np.dtype):
    def validate(v: Any) -> np.ndarray:
        if isinstance(v, np.ndarray):
            if v.dtype.kind not in "iuf":
                raise ValueError(f"expected a numeric array, got dtype {v.dtype}")
            return np.ascontiguousarray(v.reshape(-1), dtype=dtype)
        if isinstance(v, (bytes, bytearray, memoryview)):
            if len(v) % dtype.itemsize:
                raise ValueError(f"{len(v)} bytes is not a whole number of {dtype} items")
            return np.frombuffer(bytes(v), dtype=dtype)
        if isinstance(v, str):  # base64 from JSON
            try:
                raw = base64.b64decode(v, validate=True)
            except ValueError as e:
                raise ValueError(f"not valid base64: {e}") from e
            return validate(raw)
        if isinstance(v, (list, tuple)):
            try:
                return np.asarray(v, dtype=dtype).reshape(-1)
            except (TypeError, ValueError) as e:
                raise ValueError(f"not a list of numbers: {e}") from e
        raise ValueError(f"expected an array, bytes, base64 string or list, got {type(v).__name__}")

    return validate


def _serializer(dtype: np.dtype):
    def serialize(v: np.ndarray, info: SerializationInfo) -> Any:
        raw = np.ascontiguousarray(v, dtype=dtype).tobytes()
        if info.mode == "json":
            return base64.b64encode(raw).decode("ascii")
        return raw

    return serialize


def _array_type(dtype_name: str):
    dtype = np.dtype(dtype_name).newbyteorder("<")
    return Annotated[
        np.ndarray,
        PlainValidator(_validator(dtype)),
        PlainSerializer(_serializer(dtype)),
        WithJsonSchema(
            {"type": "string", "contentEncoding": "base64", "description": f"packed {dtype_name}"}
        ),
    ]


Int32Array = _array_type("int32")
"""Token ids: packed little-endian int32."""

Float32Array = _array_type("float32")
"""Log-probs: packed little-endian float32 (-inf allowed)."""

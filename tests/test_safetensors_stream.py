"""The streaming safetensors writer: files the safetensors library (and transformers) read back
exactly, with the BLAKE3 digest and size of the bytes on disk."""

from __future__ import annotations

import json
import struct

import blake3
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from protocol.safetensors_stream import write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(5, 7, generator=g),
        "half": torch.randn(3, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(2, 2, generator=g).half(),
        "ids": torch.arange(11, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "bytes": torch.arange(3, dtype=torch.uint8),
    }


def test_roundtrip_through_the_safetensors_library(tmp_path):
    src = _tensors()
    path = tmp_path / "m.safetensors"
    digest, size = write_safetensors(path, src, {"format": "pt"})
    raw = path.read_bytes()
    assert size == len(raw)
    assert digest == blake3.blake3(raw).hexdigest()
    back = st_load(raw)
    assert set(back) == set(src)
    for k, t in src.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert torch.equal(back[k], t), k
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    # Same content as the library's own writer (header layout may differ, tensors may not).
    ref = st_load(st_save(src, metadata={"format": "pt"}))
    assert all(torch.equal(ref[k], back[k]) for k in src)


def test_header_is_aligned_and_durable_flag_only_changes_flushing(tmp_path):
    sha1, _ = write_safetensors(tmp_path / "a", _tensors(), durable=True)
    sha2, _ = write_safetensors(tmp_path / "b", _tensors(), durable=False)
    assert sha1 == sha2  # deterministic bytes
    raw = (tmp_path / "a").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert "__metadata__" not in header  # none given, none written
    ends = sorted(v["data_offsets"] for v in header.values())
    assert ends[0][0] == 0 and ends[-1][1] == len(raw) - 8 - n


def test_refuses_what_it_cannot_write_faithfully(tmp_path):
    with pytest.raises(TypeError, match="complex"):
        write_safetensors(tmp_path / "x", {"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="contiguous"):
        write_safetensors(tmp_path / "y", {"t": torch.zeros(4, 4).t()})

"""Write a .safetensors file straight from the tensors' memory, hashing it on the way.

`safetensors.torch.save` first builds the whole file as one Python `bytes` (a full copy, and on
this machine slower than the disk write itself), and `save_file` writes from Rust where we
cannot see the bytes to hash them, so either route costs a second pass over the data. The
format is simple enough to stream instead (https://github.com/huggingface/safetensors#format):

    8 bytes   N, little-endian u64: the header's length
    N bytes   JSON header {"__metadata__": {...}, name: {dtype, shape, data_offsets}, ...},
              padded with spaces to a multiple of 8
    rest      every tensor's raw little-endian bytes, back to back, at its data_offsets

so each tensor is written from a zero-copy view of its storage, while a helper thread feeds the
same views, in the same order, to BLAKE3 (it and file writes both release the GIL on large
buffers; protocol/weights.py says why BLAKE3). Reading is left to the safetensors library, which validates all of the above.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import blake3
import torch

# torch dtype -> safetensors dtype tag (the library's own names).
DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}

# One helper thread per process (a forked child inherits the executor object but not its
# thread, hence the pid check).
_pool: tuple[int, ThreadPoolExecutor] | None = None


def background(fn, *args) -> Future:  # noqa: ANN001 - a thin wrapper over submit()
    """Run `fn(*args)` on this process's helper thread (tasks run one at a time, in order)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlrt-hash"))
    return _pool[1].submit(fn, *args)


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _hash_all(parts: list[memoryview | bytes]) -> str:
    h = blake3.blake3()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None, *, durable: bool = True
                      ) -> tuple[str, int]:
    """Write `tensors` (contiguous, CPU, no shared storage) as a safetensors file at `path`.
    Returns (BLAKE3 hex digest of the file, its size in bytes). fsync'd when `durable`."""
    if sys.byteorder != "little":  # safetensors stores little-endian; so do x86 and ARM hosts
        raise RuntimeError("write_safetensors needs a little-endian host")
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    parts: list[memoryview | bytes] = []
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors equivalent")
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous CPU tensor")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
        if n:
            parts.append(_raw_bytes(t))
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    parts.insert(0, struct.pack("<Q", len(head)) + head)
    digest = background(_hash_all, parts)
    try:
        with open(Path(path), "wb") as f:
            for p in parts:
                f.write(p)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    finally:
        hexdigest = digest.result()  # never leave the helper reading tensors the caller may free
    return hexdigest, 8 + len(head) + offset

"""A slot KV cache for continuous batching, plugged into HF models as a `Cache`.

Layout per layer: K and V buffers [rows_cap, kv_heads, cols_cap, head_dim]. Live rows occupy
slots 0..B-1 (kept dense, so a decode step is one plain batch with no gather). All rows share
one write column `ptr`: row r's real tokens are the columns [ptr - len_r, ptr), i.e. rows are
left-padded, and a decode step writes every row's new K/V at column `ptr`. Attention reads
the view [start, ptr] with start = ptr - max(len_r); the padding columns are masked.

Why not HF's DynamicCache: it appends with torch.cat (copying the whole cache every step) and
cannot take in new rows mid-flight or drop finished ones without copying everything. Here a
step writes one column, a finished row costs one row copy (the last row moves into its slot),
a new group of G samples is prefilled once and its K/V broadcast into G slots, and the live
region is only moved ("rebased") when the write column runs out of room or a new prompt is
longer than the space left of `ptr`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SlotStore:
    """The buffers and the shared column bookkeeping for all layers."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = 0  # live rows B (slots 0..B-1)
        self.ptr = 0  # next write column
        self.start = 0  # first column any live row uses

    @property
    def allocated(self) -> bool:
        return bool(self.keys)

    @property
    def rows_cap(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def cols_cap(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def span(self) -> int:
        return self.ptr - self.start

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def reshape(self, shapes: list[tuple[int, int]], rows_cap: int, cols_cap: int, new_ptr: int) -> None:
        """Reallocate to [rows_cap, H, cols_cap, D] per layer (`shapes` = (H, D) per layer) and
        move the live region so that it ends at column `new_ptr`."""
        span = self.span
        if new_ptr < span or new_ptr >= cols_cap or rows_cap < self.rows:
            raise ValueError(f"bad reshape: span {span}, ptr {new_ptr}, cols {cols_cap}, rows {rows_cap}")
        new_start = new_ptr - span
        keys, values = [], []
        for i, (h, d) in enumerate(shapes):
            k = torch.zeros(rows_cap, h, cols_cap, d, dtype=self.dtype)
            v = torch.zeros(rows_cap, h, cols_cap, d, dtype=self.dtype)
            if self.keys and self.rows and span:
                k[: self.rows, :, new_start:new_ptr] = self.keys[i][: self.rows, :, self.start : self.ptr]
                v[: self.rows, :, new_start:new_ptr] = self.values[i][: self.rows, :, self.start : self.ptr]
            keys.append(k)
            values.append(v)
        self.keys, self.values = keys, values
        self.start, self.ptr = new_start, new_ptr

    def shift(self, new_ptr: int) -> None:
        """Move the live region to end at `new_ptr` inside the current buffers."""
        if new_ptr == self.ptr:
            return
        span = self.span
        if self.rows and span:
            src = slice(self.start, self.ptr)
            dst = slice(new_ptr - span, new_ptr)
            for buf in self.keys + self.values:
                # clone: source and destination ranges may overlap
                buf[: self.rows, :, dst] = buf[: self.rows, :, src].clone()
        self.start, self.ptr = new_ptr - span, new_ptr

    def write_rows(self, slot0: int, n: int, layer_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write prefilled K/V ([n or 1, H, P, D] per layer) into slots slot0..slot0+n-1, ending
        at `ptr`. A batch of 1 is broadcast to all n slots: one prefill serves G samples."""
        for i, (k, v) in enumerate(layer_kv):
            cols = slice(self.ptr - k.shape[2], self.ptr)
            self.keys[i][slot0 : slot0 + n, :, cols] = k
            self.values[i][slot0 : slot0 + n, :, cols] = v

    def move_rows(self, dst: list[int], src: list[int]) -> None:
        """Copy live columns of slots `src` into slots `dst` (filling holes left by finished rows)."""
        if not dst:
            return
        d = torch.tensor(dst, dtype=torch.long)
        s = torch.tensor(src, dtype=torch.long)
        cols = slice(self.start, self.ptr)
        for buf in self.keys + self.values:
            buf[d, :, cols] = buf[s, :, cols]


class _SlotLayer(DynamicLayer):
    """One layer's view of the store for a single-token decode step."""

    def __init__(self, store: SlotStore, idx: int) -> None:
        super().__init__()
        self.store = store
        self.idx = idx
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        s = self.store
        if key_states.shape[2] != 1 or key_states.shape[0] != s.rows:
            raise RuntimeError(f"slot cache takes one token per live row, got {tuple(key_states.shape)}")
        k, v = s.keys[self.idx], s.values[self.idx]
        k[: s.rows, :, s.ptr] = key_states[:, :, 0]
        v[: s.rows, :, s.ptr] = value_states[:, :, 0]
        return k[: s.rows, :, s.start : s.ptr + 1], v[: s.rows, :, s.start : s.ptr + 1]

    def get_seq_length(self) -> int:
        return self.store.span

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.store.span + query_length, 0


class SlotCache(Cache):
    """What the model sees during a decode step; the caller advances `store.ptr` afterwards."""

    def __init__(self, store: SlotStore, num_layers: int) -> None:
        super().__init__(layers=[_SlotLayer(store, i) for i in range(num_layers)])
        self.store = store

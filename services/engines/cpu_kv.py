"""KV storage for the CPU engine's decode loop: one prompt cache per group, one response cache
per row ("cascade" layout).

RL samples G responses per prompt, so a group's G rows share their whole prompt. Storing (and,
in cpu_attention.py, reading) the prompt K/V once per group instead of once per row divides the
attention memory traffic over the prompt by G, and storing each row's response K/V left-aligned
in its own slot means rows of different lengths never pad each other and never move when
others start or finish.

Per layer:
- prompt K/V [groups_cap, kv_heads, prompt_cap, head_dim]: group slot g holds its prompt at
  columns [0, P_g);
- response K/V [rows_cap, kv_heads, resp_cap, head_dim]: row slot r holds the K/V of the
  tokens it has fed to the model so far at [0, n_r); a decode step writes column n_r.
Live groups and live rows are kept dense (slots 0..n-1): a finished row or group is replaced
by the last one, which costs one row's (group's) copy. Buffers grow by reallocation and are
zero-initialised: masked-out columns are still read by the attention kernel and weighted by 0,
so they must hold finite numbers.

Why not HF's DynamicCache: it appends with torch.cat (copying the whole cache every step),
stores the shared prompt G times, and cannot take in or drop rows without copying everything.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


def _grow(bufs: list[torch.Tensor], cap0: int, cap2: int, live0: int, live2: int) -> list[torch.Tensor]:
    out = []
    for b in bufs:
        n = torch.zeros(cap0, b.shape[1], cap2, b.shape[3], dtype=b.dtype)
        if live0 and live2:
            n[:live0, :, :live2] = b[:live0, :, :live2]
        out.append(n)
    return out


class KVStore:
    def __init__(self, shapes: list[tuple[int, int]], dtype: torch.dtype) -> None:
        self.shapes = shapes  # (kv_heads, head_dim) per layer
        self.dtype = dtype
        empty = [torch.zeros(0, h, 0, d, dtype=dtype) for h, d in shapes]
        self.pk, self.pv = list(empty), list(empty)
        self.rk, self.rv = list(empty), list(empty)

    @property
    def groups_cap(self) -> int:
        return self.pk[0].shape[0]

    @property
    def prompt_cap(self) -> int:
        return self.pk[0].shape[2]

    @property
    def rows_cap(self) -> int:
        return self.rk[0].shape[0]

    @property
    def resp_cap(self) -> int:
        return self.rk[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pk + self.pv + self.rk + self.rv)

    def reserve_groups(self, groups: int, prompt_len: int, live: int, live_cols: int) -> None:
        """Room for `groups` group slots of `prompt_len` columns (keeping `live` x `live_cols`)."""
        if groups > self.groups_cap or prompt_len > self.prompt_cap:
            g = max(groups, self.groups_cap if groups <= self.groups_cap else 2 * self.groups_cap)
            p = max(prompt_len, self.prompt_cap)
            self.pk = _grow(self.pk, g, p, live, live_cols)
            self.pv = _grow(self.pv, g, p, live, live_cols)

    def reserve_rows(self, rows: int, resp_len: int, live: int, live_cols: int, limit: int) -> None:
        """Room for `rows` row slots of `resp_len` columns; grows geometrically up to `limit`."""
        if rows > self.rows_cap or resp_len > self.resp_cap:
            r = self.rows_cap if rows <= self.rows_cap else max(rows, min(2 * self.rows_cap, limit))
            n = max(resp_len, self.resp_cap)
            self.rk = _grow(self.rk, r, n, live, live_cols)
            self.rv = _grow(self.rv, r, n, live, live_cols)

    def write_prompt(self, slot: int, layer_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Prompt K/V ([1, H, P, D] per layer, from a prefill) into group slot `slot`."""
        for i, (k, v) in enumerate(layer_kv):
            p = k.shape[2]
            self.pk[i][slot, :, :p] = k[0]
            self.pv[i][slot, :, :p] = v[0]

    def move_group(self, dst: int, src: int, cols: int) -> None:
        for buf in self.pk + self.pv:
            buf[dst, :, :cols] = buf[src, :, :cols]

    def move_rows(self, dst: list[int], src: list[int], cols: int) -> None:
        if not dst or not cols:
            return
        d = torch.tensor(dst, dtype=torch.long)
        s = torch.tensor(src, dtype=torch.long)
        for buf in self.rk + self.rv:
            buf[d, :, :cols] = buf[s, :, :cols]


class _DecodeLayer(DynamicLayer):
    """One layer's cache during a decode step: store the new token's K/V in each row's next
    response column. Attention itself reads the store (cpu_attention.cascade_attention)."""

    def __init__(self, cache: DecodeCache, idx: int) -> None:
        super().__init__()
        self.owner = cache
        self.idx = idx
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        c = self.owner
        if key_states.shape[2] != 1 or key_states.shape[0] != c.rows.numel():
            raise RuntimeError(f"decode cache takes one token per live row, got {tuple(key_states.shape)}")
        c.store.rk[self.idx][c.rows, :, c.cols] = key_states[:, :, 0]
        c.store.rv[self.idx][c.rows, :, c.cols] = value_states[:, :, 0]
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0  # the model only sizes its (unused) mask with this

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0


class DecodeCache(Cache):
    """What the model sees as its cache during a decode step. `cols[r]` = the response column
    row r writes this step; set by the decode loop before each forward."""

    def __init__(self, store: KVStore) -> None:
        super().__init__(layers=[_DecodeLayer(self, i) for i in range(len(store.shapes))])
        self.store = store
        self.rows = torch.zeros(0, dtype=torch.long)
        self.cols = torch.zeros(0, dtype=torch.long)

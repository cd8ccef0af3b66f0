"""The engine's key/value store: every running request is a row of one per-layer tensor.

`SlotKV` holds, per layer, keys and values of shape (slots, heads, capacity, head_dim), each row
left-aligned, grown by doubling in rows and columns. `SlotLayer` is the transformers cache layer
that writes a forward's new keys/values where the `Plan` says — a batched prefill of consecutive
rows at their own start columns, or one decode token per row at its own position — and returns
the views attention reads. The engine (`agent.hf_engine`) owns the plan and the masks.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin


class Plan:
    """What the next forward writes where; read by every `SlotLayer.update`."""

    def __init__(self) -> None:
        # prefill: rows row0.. row0+len(starts)-1, row i's new tokens written from starts[i]
        self.row0 = 0
        self.starts: list[int] = []
        self.batch = 0  # decode (no starts): rows 0..batch-1, one token each at `positions`
        self.positions = torch.zeros(0, dtype=torch.long)
        self.kv_len = 0  # columns the attention reads (the longest row, new tokens included)


class SlotLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False

    def __init__(self, plan: Plan, store: SlotKV, index: int) -> None:
        super().__init__()
        self.plan, self.store, self.index = plan, store, index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.store.layer(self.index, key_states, value_states)
        p = self.plan
        if p.starts:
            q = key_states.shape[2]
            for i, start in enumerate(p.starts):
                keys[p.row0 + i, :, start : start + q] = key_states[i]
                values[p.row0 + i, :, start : start + q] = value_states[i]
            rows = slice(p.row0, p.row0 + len(p.starts))
            return keys[rows, :, : p.kv_len], values[rows, :, : p.kv_len]
        rows = torch.arange(p.batch, device=keys.device)
        keys[rows, :, p.positions] = key_states[:, :, 0]
        values[rows, :, p.positions] = value_states[:, :, 0]
        return keys[: p.batch, :, : p.kv_len], values[: p.batch, :, : p.kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.plan.kv_len, 0

    def get_seq_length(self) -> int:
        return self.plan.kv_len

    def get_max_length(self) -> int:
        return -1


class SlotKV:
    """Per-layer key/value tensors for every row, grown (doubling) in rows and in columns."""

    def __init__(self, n_layers: int, device: torch.device) -> None:
        self.device = device
        self.rows = 0
        self.cols = 0
        self._kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self._want = (1, 1)

    def reserve(self, rows: int, cols: int) -> None:
        """Make room for `rows` rows of `cols` columns (applied lazily, per layer)."""
        self._want = (max(self._want[0], rows), max(self._want[1], cols))

    def layer(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        have = self._kv[i]
        rows, cols = self._want
        if have is None or have[0].shape[0] < rows or have[0].shape[2] < cols:
            r, c = (0, 0) if have is None else (have[0].shape[0], have[0].shape[2])
            new_rows = r if r >= rows else max(rows, 2 * r, 4)
            new_cols = c if c >= cols else max(cols, 2 * c, 256)
            shape_k = (new_rows, k.shape[1], new_cols, k.shape[3])
            shape_v = (new_rows, v.shape[1], new_cols, v.shape[3])
            nk = torch.zeros(shape_k, dtype=k.dtype, device=k.device)
            nv = torch.zeros(shape_v, dtype=v.dtype, device=v.device)
            if have is not None:
                nk[:r, :, :c] = have[0]
                nv[:r, :, :c] = have[1]
            self._kv[i] = have = (nk, nv)
        return have

    def copy_row(self, src: int, dst: int, length: int, grow: bool = True) -> None:
        """Row `src`'s first `length` columns into row `dst` (grown into first, as `reserve`d,
        unless not to `grow`: both rows exist already, and moving one allocates nothing)."""
        for i, kv in enumerate(self._kv):
            if kv is not None:
                keys, values = self.layer(i, *kv) if grow else kv
                keys[dst, :, :length] = keys[src, :, :length]
                values[dst, :, :length] = values[src, :, :length]

    def read_row(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (kv[0][row, :, :length].clone(), kv[1][row, :, :length].clone())
            for kv in self._kv
            if kv is not None
        ]

    def write_row(self, row: int, kv: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        for i, (k, v) in enumerate(kv):
            keys, values = self.layer(i, k.unsqueeze(0), v.unsqueeze(0))
            keys[row, :, :length] = k[:, :length]
            values[row, :, :length] = v[:, :length]

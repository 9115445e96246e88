"""KV cache of committed blocks.

Attention is block-causal, so the keys and values of finished blocks never change: caching them is
exact (spec 5.8). The cache holds post-RoPE keys for physical positions [0, length) of every row;
a forward over the window [start, end) attends to [0, start) from here and writes its own KV at
[start, end). ``length`` is advanced by the caller (the sampler) once those blocks are final.

SPRINT (``sampling/sprint.py``) adds a view: after a block's warm-up its queries see, per layer, a
kept subset of the prefix (gathered once into a compact buffer) plus the whole window. Keys are
stored post-RoPE, so a kept key keeps its original position; the full cache stays intact underneath.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class _View:
    start: int
    idx: Tensor  # [layers, R, K] physical indices of each layer's kept prefix keys
    valid: Tensor  # [R, K] bool; rows keep different counts: the rest are invisible pads
    k: Tensor  # [layers, R, Hkv, K + T, D]: kept prefix, then the window
    v: Tensor

    @property
    def kept(self) -> int:
        return self.valid.shape[1]


class KVCache:
    def __init__(self, num_layers: int, rows: int, num_kv_heads: int, max_len: int, head_dim: int,
                 *, device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (num_layers, rows, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len
        self.real_rows = rows  # a fast path may allocate padding rows past the batch's own
        self.view: _View | None = None

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def extend(self, other: "KVCache") -> "KVCache":
        """A cache holding this one's rows followed by ``other``'s (rows joining a running batch).

        The shorter of the two is padded to the longer's max_len; the padding is never attended to.
        """
        if self.view is not None or other.view is not None:
            raise ValueError("cannot add rows to a cache with a SPRINT view")
        max_len = max(self.max_len, other.max_len)

        def pad(t: Tensor) -> Tensor:
            return torch.nn.functional.pad(t, (0, 0, 0, max_len - t.shape[3]))
        out = KVCache.__new__(KVCache)
        out.k = torch.cat([pad(self.k), pad(other.k)], dim=1)
        out.v = torch.cat([pad(self.v), pad(other.v)], dim=1)
        out.length, out.max_len, out.view = self.length, max_len, None
        out.real_rows = out.k.shape[1]
        return out

    def select_rows(self, keep: list[int]) -> "KVCache":
        """A cache of only these rows, in this order (finished requests leaving a running batch)."""
        if self.view is not None:
            raise ValueError("cannot drop rows of a cache with a SPRINT view")
        idx = torch.tensor(keep, dtype=torch.long, device=self.k.device)
        out = KVCache.__new__(KVCache)
        out.k, out.v = self.k.index_select(1, idx), self.v.index_select(1, idx)
        out.length, out.max_len, out.view = self.length, self.max_len, None
        out.real_rows = len(keep)
        return out

    def update(self, layer: int, start: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v [R, Hkv, T, D] at [start, start+T); return the keys/values the window attends to:
        [0, start+T), or with a view the kept prefix followed by the window."""
        end = start + k_new.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: window ends at {end}, cache holds {self.max_len}")
        view = self.view
        if view is not None and start != view.start:
            raise ValueError(f"the cache view starts at {view.start}, the window at {start}")
        self.k[layer, :, :, start:end] = k_new
        self.v[layer, :, :, start:end] = v_new
        if view is None:
            return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        view.k[layer, :, :, view.kept:] = k_new
        view.v[layer, :, :, view.kept:] = v_new
        return view.k[layer], view.v[layer]

    # ---- SPRINT ----

    def adapt_mask(self, mask: Tensor, start: int) -> Tensor:
        """The mask [R, 1, T, start+T] over keys [0, start+T) -> the mask over the keys ``update``
        returns. Under a view every kept key and every window key is visible to every window query,
        as in the official SPRINT step (pads of a padded row included); only the padding slots of
        rows that keep fewer keys are hidden."""
        view = self.view
        if view is None:
            return mask
        r, _, t, _ = mask.shape
        prefix = view.valid[:, None, None, :].expand(r, 1, t, view.kept)
        return torch.cat([prefix, mask.new_ones(r, 1, t, t)], dim=-1)

    def set_view(self, start: int, end: int, idx: Tensor, valid: Tensor) -> None:
        """Window [start, end) from now on; per layer, the prefix keys idx [layers, R, K] (valid
        [R, K]) are gathered once into a buffer that also holds the window."""
        layers, rows, heads, _, dim = self.k.shape
        kept = idx.shape[-1]
        if idx.shape[:2] != (layers, rows) or valid.shape != (rows, kept):
            raise ValueError(f"view indices {tuple(idx.shape)} / valid {tuple(valid.shape)} do not fit "
                             f"a cache of {layers} layers and {rows} rows")
        gather = idx[:, :, None, :, None].expand(layers, rows, heads, kept, dim)
        k = self.k.new_empty(layers, rows, heads, kept + end - start, dim)
        v = self.v.new_empty(layers, rows, heads, kept + end - start, dim)
        k[:, :, :, :kept] = self.k.gather(3, gather)
        v[:, :, :, :kept] = self.v.gather(3, gather)
        self.view = _View(start, idx, valid, k, v)

    def clear_view(self) -> None:
        self.view = None

"""KV cache of committed blocks.

Attention is block-causal, so the keys and values of finished blocks never change: caching them is
exact (spec 5.8). The cache holds post-RoPE keys for physical positions [0, length) of every row;
a forward over the window [start, end) attends to [0, start) from here and writes its own KV at
[start, end). ``length`` is advanced by the caller (the sampler) once those blocks are final.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self, num_layers: int, rows: int, num_kv_heads: int, max_len: int, head_dim: int,
                 *, device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (num_layers, rows, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, start: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v [R, Hkv, T, D] at [start, start+T); return the keys/values [0, start+T)."""
        end = start + k_new.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: window ends at {end}, cache holds {self.max_len}")
        self.k[layer, :, :, start:end] = k_new
        self.v[layer, :, :, start:end] = v_new
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

"""KV cache of committed blocks.

Attention is block-causal, so the keys and values of finished blocks never change: caching them is
exact (spec 5.8). The cache holds post-RoPE keys for physical positions [0, length) of every row;
a forward over the window [start, end) attends to [0, start) from here and writes its own KV at
[start, end). ``length`` is advanced by the caller (the sampler) once those blocks are final.

SPRINT (spec 6, ``sampling/sprint.py``) adds two things, both off unless the sampler asks:
* a probe: while set, each layer's attention probabilities of the active block's queries are summed
  per key (``observe``), to score prefix importance;
* a view: the window's queries see a kept subset of the prefix, gathered once into a compact buffer,
  plus the window itself. Keys are stored post-RoPE, so a kept key keeps its original position; the
  full cache stays intact underneath, and window columns can be frozen (their cached KV reused).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class _Probe:
    queries: Tensor  # [R, Tq] bool: which of the window's last Tq positions count
    num_keys: int
    mass: Tensor  # [R, num_keys] fp32, summed probabilities
    weight: Tensor  # [R] fp32, number of (layer, head, query) terms summed


@dataclass
class _View:
    start: int
    idx: Tensor | None  # [R, K] physical indices of the kept prefix keys, ascending
    valid: Tensor | None  # [R, K] bool; rows keep different counts: the rest are invisible pads
    frozen: Tensor | None  # [R, T] bool over window columns [start, start + T)
    k: Tensor | None  # [layers, R, Hkv, K + T, D]: kept prefix, then the window
    v: Tensor | None

    @property
    def kept(self) -> int:
        return 0 if self.idx is None else self.idx.shape[1]


class KVCache:
    def __init__(self, num_layers: int, rows: int, num_kv_heads: int, max_len: int, head_dim: int,
                 *, device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (num_layers, rows, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len
        self.probe: _Probe | None = None
        self.view: _View | None = None

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def extend(self, other: "KVCache") -> "KVCache":
        """A cache holding this one's rows followed by ``other``'s (rows joining a running batch).

        The shorter of the two is padded to the longer's max_len; the padding is never attended to.
        """
        if self.view is not None or self.probe is not None or other.view is not None:
            raise ValueError("cannot add rows to a cache with a SPRINT view or probe")
        max_len = max(self.max_len, other.max_len)

        def pad(t: Tensor) -> Tensor:
            return torch.nn.functional.pad(t, (0, 0, 0, max_len - t.shape[3]))
        out = KVCache.__new__(KVCache)
        out.k = torch.cat([pad(self.k), pad(other.k)], dim=1)
        out.v = torch.cat([pad(self.v), pad(other.v)], dim=1)
        out.length, out.max_len, out.probe, out.view = self.length, max_len, None, None
        return out

    def update(self, layer: int, start: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v [R, Hkv, T, D] at [start, start+T); return the keys/values the window attends to:
        [0, start+T), or with a view the kept prefix followed by the window."""
        end = start + k_new.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: window ends at {end}, cache holds {self.max_len}")
        view = self.view
        if view is not None:
            if start != view.start:
                raise ValueError(f"the cache view starts at {view.start}, the window at {start}")
            if view.frozen is not None:
                keep = view.frozen[:, None, :, None]  # [R, 1, T, 1]
                k_new = torch.where(keep, self.k[layer, :, :, start:end], k_new)
                v_new = torch.where(keep, self.v[layer, :, :, start:end], v_new)
        self.k[layer, :, :, start:end] = k_new
        self.v[layer, :, :, start:end] = v_new
        if view is None or view.k is None:
            return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        view.k[layer, :, :, view.kept:] = k_new
        view.v[layer, :, :, view.kept:] = v_new
        return view.k[layer], view.v[layer]

    # ---- SPRINT ----

    def adapt_mask(self, mask: Tensor, start: int) -> Tensor:
        """The block-causal mask [R, 1, T, start+T] over keys [0, start+T) -> the mask over the keys
        ``update`` returns. A kept key's column is taken from the full mask (pads stay invisible and
        a pad query still sees only itself); the padding slots of rows that keep fewer are hidden."""
        view = self.view
        if view is None or view.idx is None:
            return mask
        r, _, t, _ = mask.shape
        prefix = mask.gather(-1, view.idx[:, None, None, :].expand(r, 1, t, view.kept))
        prefix = prefix & view.valid[:, None, None, :]
        return torch.cat([prefix, mask[..., start:]], dim=-1)

    def set_view(self, start: int, end: int, keep: Tensor | None, frozen: Tensor | None) -> None:
        """Window [start, end) from now on; prefix keys with keep [R, start] True (all if None);
        window columns with frozen [R, end - start] True reuse their cached KV. Gathers the kept keys
        once, into a buffer that also holds the window."""
        idx = valid = k = v = None
        if keep is not None:
            if keep.shape[1] != start:
                raise ValueError(f"keep covers {keep.shape[1]} prefix keys, the window starts at {start}")
            counts = keep.sum(-1)  # [R]
            kept = int(counts.max())
            # Stable sort of "not kept" brings the kept indices first, in ascending order.
            idx = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[:, :kept]  # [R, K]
            valid = torch.arange(kept, device=keep.device)[None, :] < counts[:, None]
            layers, rows, heads, _, dim = self.k.shape
            gather = idx[None, :, None, :, None].expand(layers, rows, heads, kept, dim)
            k = self.k.new_empty(layers, rows, heads, kept + end - start, dim)
            v = self.v.new_empty(layers, rows, heads, kept + end - start, dim)
            k[:, :, :, :kept] = self.k.gather(3, gather)
            v[:, :, :, :kept] = self.v.gather(3, gather)
        self.view = _View(start, idx, valid, frozen, k, v)

    def clear_view(self) -> None:
        self.view = None

    def begin_probe(self, queries: Tensor, num_keys: int) -> None:
        """Until ``end_probe``, every forward adds the attention that the window's last
        queries.shape[1] positions with queries [R, Tq] True pay to keys [0, num_keys)."""
        if self.probe is not None:
            raise ValueError("a probe is already running")
        rows = queries.shape[0]
        self.probe = _Probe(queries, num_keys,
                            torch.zeros(rows, num_keys, device=queries.device, dtype=torch.float32),
                            torch.zeros(rows, device=queries.device, dtype=torch.float32))

    def end_probe(self) -> Tensor:
        """Stop probing; the mean attention probability each key received, [R, num_keys] fp32
        (mean over layers, heads, probed queries and forwards)."""
        probe, self.probe = self.probe, None
        if probe is None:
            raise ValueError("no probe is running")
        return probe.mass / probe.weight.clamp_min(1.0)[:, None]

    def observe(self, q: Tensor, k: Tensor, mask: Tensor, scale: float) -> None:
        """Add one layer's attention probabilities of the probed queries over keys [0, num_keys).

        q [R, Hq, T, D], k [R, Hkv, Tk, D] (what ``update`` returned), mask [R, 1, T, Tk]. An extra
        small matmul on the last Tq queries only, in fp32; SDPA does not return its probabilities.
        """
        probe = self.probe
        rows, hq, t, d = q.shape
        hkv, tq = k.shape[1], probe.queries.shape[1]
        g = hq // hkv
        # GQA: query heads h*g .. h*g+g-1 share KV head h; fold them into the query axis.
        qs = q[:, :, t - tq:].float().reshape(rows, hkv, g * tq, d)
        scores = (qs @ k.float().transpose(-1, -2)) * scale  # [R, Hkv, g*Tq, Tk]
        m = mask[:, :, t - tq:]  # [R, 1, Tq, Tk]
        m = m[:, :, None].expand(rows, 1, g, tq, m.shape[-1]).reshape(rows, 1, g * tq, m.shape[-1])
        probs = torch.softmax(scores.masked_fill(~m, float("-inf")), dim=-1)
        w = probe.queries.float().repeat(1, g)  # [R, g*Tq], same fold as the queries
        probe.mass += torch.einsum("rhqk,rq->rk", probs[..., :probe.num_keys], w)
        probe.weight += hkv * w.sum(-1)

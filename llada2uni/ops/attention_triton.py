"""Window attention over a preallocated KV cache in Triton: only the keys a window may see are read.

The fast path keeps one cache of a bucketed length and attends from a window of queries (a 32-token
block step, a 64-token first-of-block step, a prefill window) to the keys before and inside it. A
boolean mask over the whole cache would make SDPA read (and, with GQA, expand) every cached position
and fall back to its unfused kernel; here the visibility is two small tensors instead:

* ``key_ok`` [R, S] bool: key j of row r is a real key (not left padding, or kept by a SPRINT view);
* ``kv_lim`` [T] int32: query t may see keys j < kv_lim[t] (the block-causal rule, spec 3.3).

Both are device tensors, so one CUDA graph serves every step however far the window has moved.
``_window`` is one program per (tile of query rows, row x KV head, key split): the query heads of one
KV head are one tile (GQA without copies, each K/V tile read once for all of them), online softmax in
fp32 over the split's key tiles. Short windows over
long caches use several key splits (flash-decoding), merged by ``_merge``; a query that sees no key
gets a zero output, as ``ops.attention.attend`` (the reference this is tested against) gives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import attend

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference is used
    triton = None


def window_limits(start: int, end: int, block_length: int, device: torch.device | str | None = None) -> Tensor:
    """``kv_lim`` of the window [start, end) under the block-causal rule (spec 3.3): the query at
    position p sees keys j < min(end, (p // B + 1) * B). Returns [end - start] int32."""
    p = torch.arange(start, end, device=device)
    return ((p // block_length + 1) * block_length).clamp_max(end).to(torch.int32)


def window_mask(key_ok: Tensor, kv_lim: Tensor) -> Tensor:
    """The [R, 1, T, S] boolean mask that (key_ok, kv_lim) stand for."""
    keys = torch.arange(key_ok.shape[1], device=key_ok.device)
    return key_ok[:, None, None, :] & (keys[None, None, None, :] < kv_lim[None, None, :, None])


def window_attention_reference(q: Tensor, k: Tensor, v: Tensor, key_ok: Tensor, kv_lim: Tensor,
                               scale: float) -> Tensor:
    """q [R, Hq, T, D], k/v [R, Hkv, S, D] -> [R, Hq, T, D], through ``attend`` (SDPA)."""
    return attend(q, k, v, window_mask(key_ok, kv_lim), scale)


if triton is not None:
    @triton.jit
    def _window(q_ptr, k_ptr, v_ptr, ok_ptr, lim_ptr, o_ptr, ms_ptr, ls_ptr, scale,
                sq_r, sq_h, sq_t, sk_r, sk_h, sk_s, so_r, so_h, so_t, T, S,
                GROUP: tl.constexpr, HKV: tl.constexpr, SPLITS: tl.constexpr, D: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr):
        # Query rows m = t * GROUP + g: the GROUP query heads of one KV head share every K/V tile.
        m_tile = tl.program_id(0)
        rk = tl.program_id(1)  # row * HKV + KV head
        r, kvh = (rk // HKV).to(tl.int64), rk % HKV
        split = tl.program_id(2)
        offs_m = m_tile * BM + tl.arange(0, BM)
        t = offs_m // GROUP
        head = kvh * GROUP + offs_m % GROUP
        offs_d = tl.arange(0, D)
        m_ok = t < T
        q = tl.load(q_ptr + r * sq_r + head[:, None] * sq_h + t[:, None] * sq_t + offs_d[None, :],
                    mask=m_ok[:, None], other=0.0)
        lim = tl.load(lim_ptr + t, mask=m_ok, other=0)
        # this split's share of the key tiles the tile's queries may see
        tiles = tl.cdiv(tl.minimum(tl.max(lim, 0), S), BN)
        per = tl.cdiv(tiles, SPLITS)
        lo = split * per
        hi = tl.minimum(lo + per, tiles)
        kv = r * sk_r + kvh.to(tl.int64) * sk_h
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, D), tl.float32)
        for n in range(lo, hi):
            offs_n = n * BN + tl.arange(0, BN)
            n_in = offs_n < S
            k = tl.load(k_ptr + kv + offs_n[:, None] * sk_s + offs_d[None, :], mask=n_in[:, None], other=0.0)
            ok = tl.load(ok_ptr + r * S + offs_n, mask=n_in, other=0) != 0
            s = tl.dot(q, tl.trans(k)) * scale
            visible = ok[None, :] & (offs_n[None, :] < lim[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            base = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
            p = tl.exp(s - base[:, None])
            alpha = tl.exp(m_i - base)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kv + offs_n[:, None] * sk_s + offs_d[None, :], mask=n_in[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if SPLITS == 1:  # final output; a query that saw no key gets 0
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(o_ptr + r * so_r + head[:, None] * so_h + t[:, None] * so_t + offs_d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None])
        else:  # partial: unnormalised fp32 sum with its running max and denominator
            row = (split * tl.num_programs(1) + rk).to(tl.int64) * (T * GROUP) + offs_m
            tl.store(o_ptr + row[:, None] * D + offs_d[None, :], acc, mask=m_ok[:, None])
            tl.store(ms_ptr + row, m_i, mask=m_ok)
            tl.store(ls_ptr + row, l_i, mask=m_ok)

    @triton.jit
    def _merge(po_ptr, ms_ptr, ls_ptr, o_ptr, so_r, so_h, so_t, T,
               GROUP: tl.constexpr, HKV: tl.constexpr, SPLITS: tl.constexpr, D: tl.constexpr,
               BM: tl.constexpr):
        # one program per (BM query rows, row x KV head): every split's maximum at once, then the sum
        offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
        rk = tl.program_id(1)
        r, kvh = (rk // HKV).to(tl.int64), rk % HKV
        rks = tl.num_programs(1)
        mg = T * GROUP
        m_ok = offs_m < mg
        splits = tl.arange(0, SPLITS)
        rows = (splits[:, None] * rks + rk).to(tl.int64) * mg + offs_m[None, :]  # [SPLITS, BM]
        ms = tl.load(ms_ptr + rows, mask=m_ok[None, :], other=float("-inf"))
        m_all = tl.max(ms, 0)
        w = tl.exp(ms - tl.where(m_all == float("-inf"), 0.0, m_all)[None, :])  # [SPLITS, BM]
        l_all = tl.sum(w * tl.load(ls_ptr + rows, mask=m_ok[None, :], other=0.0), 0)
        offs_d = tl.arange(0, D)
        acc = tl.zeros((BM, D), tl.float32)
        for s in range(SPLITS):
            row = (s * rks + rk).to(tl.int64) * mg + offs_m
            ws = tl.sum(tl.where(splits[:, None] == s, w, 0.0), 0)
            acc += ws[:, None] * tl.load(po_ptr + row[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        out = acc / tl.where(l_all > 0, l_all, 1.0)[:, None]
        t = offs_m // GROUP
        head = kvh * GROUP + offs_m % GROUP
        tl.store(o_ptr + r * so_r + head[:, None] * so_h + t[:, None] * so_t + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None])


def supported(q: Tensor, k: Tensor) -> bool:
    """CUDA, bf16/fp16, a power-of-two head dim of 16-256, whole GQA groups, unit-stride head dims."""
    if triton is None or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype:
        return False
    d = q.shape[-1]
    return (16 <= d <= 256 and d & (d - 1) == 0 and q.shape[1] % k.shape[1] == 0
            and q.stride(-1) == 1 and k.stride(-1) == 1)


_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's CPU interpreter (tests): a nominal small GPU
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _splits(programs: int, s: int, bn: int, device: torch.device) -> int:
    # A power of two: enough programs to fill the GPU, never more than the key tiles (or 8: the
    # partial sums are written and read again, 64 KB per program).
    want = max(1, min(8, -(-s // bn), -(-_sm_count(device) // programs)))
    return 1 << (want.bit_length() - 1)


def window_attention_triton(q: Tensor, k: Tensor, v: Tensor, key_ok: Tensor, kv_lim: Tensor, scale: float,
                            splits: int | None = None, config: tuple[int, int, int, int] | None = None) -> Tensor:
    """``window_attention_reference``'s contract with the Triton kernels. The result is a [R, Hq, T, D]
    view of a [R, T, Hq, D] tensor, so the output projection's reshape is free. ``splits`` (a power of
    two) overrides the key splits chosen for the GPU, ``config`` (query tile, key tile, warps, stages)
    the tiles (``benchmarks/bench_attention.py --sweep``)."""
    r, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    group = hq // hkv
    if k.stride() != v.stride():
        raise ValueError("k and v must share one layout")
    key_ok = key_ok.contiguous()
    kv_lim = kv_lim.to(torch.int32).contiguous()
    out = torch.empty(r, t, hq, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    mg = t * group  # query rows per KV head
    # Tiles from bench_attention.py --sweep on an H200 (RESULTS.md): 64-row query tiles in 4 warps,
    # 3 stages, at every step shape up to 32 rows; 128 x 128 tiles in 8 warps once the programs are
    # several per SM (64 rows).
    bm, bn, warps, stages = min(64, max(16, triton.next_power_of_2(mg))), 64, 4, 3
    if -(-mg // bm) * r * hkv >= 3 * _sm_count(q.device):
        bm, bn, warps, stages = min(128, max(16, triton.next_power_of_2(mg))), 128, 8, 3
    if config is not None:
        bm, bn, warps, stages = config
    m_tiles = -(-mg // bm)
    if splits is None:
        splits = _splits(m_tiles * r * hkv, s, bn, q.device)
    grid = (m_tiles, r * hkv, splits)
    args = (scale, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    meta = dict(GROUP=group, HKV=hkv, SPLITS=splits, D=d, BM=bm, BN=bn, num_warps=warps, num_stages=stages)
    if splits == 1:
        _window[grid](q, k, v, key_ok, kv_lim, out, out, out, *args,
                      out.stride(0), out.stride(1), out.stride(2), t, s, **meta)
        return out
    part = torch.empty(splits * r * hkv * mg, d, device=q.device, dtype=torch.float32)
    ms = torch.empty(splits * r * hkv * mg, device=q.device, dtype=torch.float32)
    ls = torch.empty_like(ms)
    _window[grid](q, k, v, key_ok, kv_lim, part, ms, ls, *args, 0, 0, 0, t, s, **meta)
    merge_bm = 8
    _merge[(-(-mg // merge_bm), r * hkv)](part, ms, ls, out, out.stride(0), out.stride(1), out.stride(2), t,
                                          GROUP=group, HKV=hkv, SPLITS=splits, D=d, BM=merge_bm, num_warps=4)
    return out


@torch.library.custom_op("llada2uni::window_attention", mutates_args=())
def window_attention(q: Tensor, k: Tensor, v: Tensor, key_ok: Tensor, kv_lim: Tensor, scale: float) -> Tensor:
    """q [R, Hq, T, D] attends to k/v [R, Hkv, S, D] under (key_ok [R, S], kv_lim [T]) -> [R, Hq, T, D].

    The Triton kernels where ``supported``, else the SDPA reference. A custom op, so that a compiled
    step part keeps it as one opaque call (Dynamo does not trace into the kernel launch).
    """
    if supported(q, k):
        return window_attention_triton(q, k, v, key_ok, kv_lim, scale)
    out = window_attention_reference(q, k, v, key_ok, kv_lim, scale)
    return out.transpose(1, 2).contiguous().transpose(1, 2)  # the kernel's layout, for either path


@window_attention.register_fake
def _(q, k, v, key_ok, kv_lim, scale):
    r, hq, t, d = q.shape
    return q.new_empty(r, t, hq, d).transpose(1, 2)

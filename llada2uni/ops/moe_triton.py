"""Fused MoE expert dispatch in Triton: each touched expert's weights are read once per block of its tokens.

At decode sizes (32-2048 tokens x 8 experts over 256 experts) an expert gets 1-32 tokens, so the MoE
is a weight stream: its floor is the bytes of the touched experts. Two kernels do the whole dispatch:

* ``_gate_up``: one program per (block of one expert's token slots, tile of the intermediate dim).
  It gathers the block's token rows of ``x`` itself (no ``x[order]`` copy), multiplies them by the
  expert's gate and up tiles, and writes ``silu(gate) * up`` (fp32 accumulation, bf16 out).
* ``_down``: one program per (block, tile of the hidden dim): the down projection, scaled by each
  slot's routing weight in fp32 and stored at the slot's own (token, k) place, so un-sorting is free.

The k slots of a token are then summed in fp32 (deterministic: no atomics). The slot alignment
(``align_blocks``) is plain torch without host syncs, so the whole dispatch is CUDA-graph capturable;
``experts_reference`` in ``moe.py`` is the reference it is tested against (GPU test).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch dispatch is used
    triton = None


def align_blocks(flat_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Group token slots by expert into blocks of at most ``block_m`` slots of one expert.

    flat_ids [S] expert of each slot -> (order [S] slots sorted by expert, block_expert [B],
    block_start [B] first sorted slot of the block, block_rows [B] slots in it; 0 for unused blocks).
    B is a static bound (S // block_m + min(E, S) + 1), so shapes never depend on the routing.
    """
    s = flat_ids.numel()
    order = flat_ids.argsort(stable=True)
    experts = torch.arange(num_experts, device=flat_ids.device, dtype=flat_ids.dtype)
    ends = torch.searchsorted(flat_ids[order], experts, right=True)  # [E]
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    blocks = (counts + block_m - 1) // block_m  # [E]
    block_end = torch.cumsum(blocks, 0)
    bound = s // block_m + min(num_experts, s) + 1
    b = torch.arange(bound, device=flat_ids.device, dtype=block_end.dtype)
    expert = torch.searchsorted(block_end, b, right=True)  # num_experts past the last used block
    used = expert < num_experts
    expert = expert.clamp(max=num_experts - 1)
    j = b - (block_end[expert] - blocks[expert])  # block index within its expert
    start = ends[expert] - counts[expert] + j * block_m
    rows = torch.where(used, (counts[expert] - j * block_m).clamp(0, block_m), 0)
    return order, expert.to(torch.int32), start.to(torch.int32), rows.to(torch.int32)


if triton is not None:
    @triton.jit
    def _gate_up(x_ptr, w13_ptr, out_ptr, order_ptr, bexp_ptr, bstart_ptr, brows_ptr,
                 H: tl.constexpr, INTER: tl.constexpr, TOPK: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        blk = tl.program_id(0)
        rows = tl.load(brows_ptr + blk)
        if rows == 0:
            return
        e = tl.load(bexp_ptr + blk).to(tl.int64)
        start = tl.load(bstart_ptr + blk)
        offs_m = tl.arange(0, BM)
        m_ok = offs_m < rows
        slot = tl.load(order_ptr + start + offs_m, mask=m_ok, other=0)
        token = slot // TOPK
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        x_ptrs = x_ptr + token[:, None] * H + offs_k[None, :]
        g_ptrs = w13_ptr + e * (2 * INTER * H) + offs_n[None, :] * H + offs_k[:, None]  # [BK, BN]
        u_ptrs = g_ptrs + INTER * H
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, H // BK):
            a = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            acc_g = tl.dot(a, tl.load(g_ptrs), acc_g)
            acc_u = tl.dot(a, tl.load(u_ptrs), acc_u)
            x_ptrs += BK
            g_ptrs += BK
            u_ptrs += BK
        act = acc_g * tl.sigmoid(acc_g) * acc_u
        out_ptrs = out_ptr + (start + offs_m)[:, None].to(tl.int64) * INTER + offs_n[None, :]
        tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])

    @triton.jit
    def _down(a_ptr, w2_ptr, out_ptr, order_ptr, weight_ptr, bexp_ptr, bstart_ptr, brows_ptr,
              H: tl.constexpr, INTER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        blk = tl.program_id(0)
        rows = tl.load(brows_ptr + blk)
        if rows == 0:
            return
        e = tl.load(bexp_ptr + blk).to(tl.int64)
        start = tl.load(bstart_ptr + blk)
        offs_m = tl.arange(0, BM)
        m_ok = offs_m < rows
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        a_ptrs = a_ptr + (start + offs_m)[:, None].to(tl.int64) * INTER + offs_k[None, :]
        w_ptrs = w2_ptr + e * (H * INTER) + offs_n[None, :] * INTER + offs_k[:, None]  # [BK, BN]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, INTER // BK):
            acc = tl.dot(tl.load(a_ptrs, mask=m_ok[:, None], other=0.0), tl.load(w_ptrs), acc)
            a_ptrs += BK
            w_ptrs += BK
        slot = tl.load(order_ptr + start + offs_m, mask=m_ok, other=0)
        acc = acc * tl.load(weight_ptr + slot, mask=m_ok, other=0.0)[:, None]  # fp32 routing weight
        tl.store(out_ptr + slot[:, None].to(tl.int64) * H + offs_n[None, :], acc, mask=m_ok[:, None])


# (block_m, gate/up BN, BK, warps, stages), (down BN, BK, warps, stages) by tokens per touched expert;
# the best of benchmarks/bench_moe.py --sweep on an H200 (RESULTS.md).
CONFIGS = {
    16: ((16, 64, 128, 4, 3), (32, 128, 4, 3)),
    32: ((32, 64, 64, 4, 3), (64, 64, 4, 3)),
    64: ((64, 64, 64, 4, 3), (64, 64, 4, 3)),
}


def pick_config(slots: int, num_experts: int) -> tuple[tuple, tuple]:
    per_expert = slots / min(num_experts, slots)
    bm = 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64
    return CONFIGS[bm]


def supported(x: Tensor, w13: Tensor, w2: Tensor) -> bool:
    """CUDA, bf16/fp16, contiguous weights, sizes that divide into the kernels' tiles."""
    if triton is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if not (w13.is_contiguous() and w2.is_contiguous()) or w13.dtype != x.dtype or w2.dtype != x.dtype:
        return False
    h, inter = w13.shape[-1], w13.shape[-2] // 2
    return h % 128 == 0 and inter % 128 == 0 and w2.shape[-2:] == (h, inter)


def experts_fused(x: Tensor, expert_ids: Tensor, weights: Tensor, w13: Tensor, w2: Tensor,
                  config: tuple[tuple, tuple] | None = None) -> Tensor:
    """The ``experts_reference`` contract with the two Triton kernels: x [N, H]; expert_ids/weights
    [N, k]; w13 [E, 2I, H]; w2 [E, H, I] -> [N, H] fp32."""
    n, k = expert_ids.shape
    e, two_i, h = w13.shape
    inter = two_i // 2
    (bm, bn1, bk1, warps1, stages1), (bn2, bk2, warps2, stages2) = config or pick_config(n * k, e)
    order, bexp, bstart, brows = align_blocks(expert_ids.reshape(-1), e, bm)
    x = x.contiguous()
    act = torch.empty(n * k, inter, device=x.device, dtype=x.dtype)  # sorted slot order
    _gate_up[(bexp.numel(), inter // bn1)](x, w13, act, order, bexp, bstart, brows, H=h, INTER=inter, TOPK=k,
                                          BM=bm, BN=bn1, BK=bk1, num_warps=warps1, num_stages=stages1)
    out = torch.empty(n * k, h, device=x.device, dtype=torch.float32)  # (token, slot) order
    w = weights.reshape(-1).to(torch.float32).contiguous()
    _down[(bexp.numel(), h // bn2)](act, w2, out, order, w, bexp, bstart, brows, H=h, INTER=inter,
                                    BM=bm, BN=bn2, BK=bk2, num_warps=warps2, num_stages=stages2)
    return out.view(n, k, h).sum(dim=1)

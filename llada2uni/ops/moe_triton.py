"""Fused MoE expert dispatch in Triton: each touched expert's weights are read once per block of its tokens.

At decode sizes (32-2048 tokens x 8 experts over 256 experts) an expert gets 1-32 tokens, so the MoE
is a weight stream: its floor is the bytes of the touched experts. Two kernels do the whole dispatch:

* ``_gate_up``: one program per (block of one expert's token slots, tile of the intermediate dim).
  It gathers the block's token rows of ``x`` itself (no ``x[order]`` copy), multiplies them by the
  expert's gate and up tiles, and writes ``silu(gate) * up`` (fp32 accumulation, bf16 out).
* ``_down``: one program per (block, tile of the hidden dim): the down projection, scaled by each
  slot's routing weight in fp32 and stored at the slot's own (token, k) place, so un-sorting is free.

The k slots of a token are then summed in fp32 (deterministic: no atomics in the sums). Around them:

* the slot alignment (which slots form which expert block): ``align_triton``, three small launches
  (per-expert counts and ranks with atomics, the block table, the scatter into expert order), where
  ``align_blocks`` (plain torch: a sort and a dozen small kernels) is the reference;
* the router's selection: ``route_triton``, one launch for ``moe.route``'s sigmoid, group top-2,
  group top-k and expert top-k.

Nothing syncs with the host, so the whole dispatch is CUDA-graph capturable. ``experts_reference`` and
``route`` in ``moe.py`` are the references they are tested against (under Triton's CPU interpreter in
the CPU suite, in bf16 on the GPU).
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
    def _gate_up(x_ptr, w13_ptr, s13_ptr, out_ptr, order_ptr, bexp_ptr, bstart_ptr, brows_ptr,
                 H: tl.constexpr, INTER: tl.constexpr, TOPK: tl.constexpr,
                 QUANT: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr, SK: tl.constexpr,
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
        # 8-bit experts: scales [E, 2I/SBN, SK], one per (SBN rows, SBK columns) block
        sg_ptrs = s13_ptr + e * (2 * INTER // SBN * SK) + (offs_n // SBN) * SK
        su_ptrs = s13_ptr + e * (2 * INTER // SBN * SK) + ((INTER + offs_n) // SBN) * SK
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in range(0, H // BK):
            a = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            if QUANT:  # widen (exact), multiply, scale the block's partial sums (BK divides SBK)
                kb = (kk * BK) // SBK
                acc_g += tl.dot(a, tl.load(g_ptrs).to(a.dtype)) * tl.load(sg_ptrs + kb)[None, :]
                acc_u += tl.dot(a, tl.load(u_ptrs).to(a.dtype)) * tl.load(su_ptrs + kb)[None, :]
            else:
                acc_g = tl.dot(a, tl.load(g_ptrs), acc_g)
                acc_u = tl.dot(a, tl.load(u_ptrs), acc_u)
            x_ptrs += BK
            g_ptrs += BK
            u_ptrs += BK
        act = acc_g * tl.sigmoid(acc_g) * acc_u
        out_ptrs = out_ptr + (start + offs_m)[:, None].to(tl.int64) * INTER + offs_n[None, :]
        tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])

    @triton.jit
    def _down(a_ptr, w2_ptr, s2_ptr, out_ptr, order_ptr, weight_ptr, bexp_ptr, bstart_ptr, brows_ptr,
              H: tl.constexpr, INTER: tl.constexpr, QUANT: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr,
              SK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
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
        s_ptrs = s2_ptr + e * (H // SBN * SK) + (offs_n // SBN) * SK
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in range(0, INTER // BK):
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            if QUANT:
                acc += tl.dot(a, tl.load(w_ptrs).to(a.dtype)) * tl.load(s_ptrs + (kk * BK) // SBK)[None, :]
            else:
                acc = tl.dot(a, tl.load(w_ptrs), acc)
            a_ptrs += BK
            w_ptrs += BK
        slot = tl.load(order_ptr + start + offs_m, mask=m_ok, other=0)
        acc = acc * tl.load(weight_ptr + slot, mask=m_ok, other=0.0)[:, None]  # fp32 routing weight
        tl.store(out_ptr + slot[:, None].to(tl.int64) * H + offs_n[None, :], acc, mask=m_ok[:, None])


    @triton.jit
    def _count(ids_ptr, counts_ptr, rank_ptr, S, BS: tl.constexpr):
        # each slot's rank among its expert's slots (arrival order: any order serves, as every slot's
        # output is computed from its own row alone)
        offs = tl.program_id(0) * BS + tl.arange(0, BS)
        ok = offs < S
        e = tl.load(ids_ptr + offs, mask=ok, other=0)
        rank = tl.atomic_add(counts_ptr + e, 1, mask=ok)
        tl.store(rank_ptr + offs, rank, mask=ok)

    @triton.jit
    def _blocks(counts_ptr, start_ptr, bexp_ptr, bstart_ptr, brows_ptr, NB,
                E: tl.constexpr, BLOCK_M: tl.constexpr, BB: tl.constexpr):
        # one program: experts' first sorted slots, and the block table (expert, first slot, slots),
        # written expert-parallel: pass j writes every expert's j-th block
        offs_e = tl.arange(0, E)
        c = tl.load(counts_ptr + offs_e)
        starts = tl.cumsum(c, 0) - c
        nb = (c + BLOCK_M - 1) // BLOCK_M
        first_block = tl.cumsum(nb, 0) - nb
        tl.store(start_ptr + offs_e, starts)
        for j in range(0, tl.max(nb, 0)):
            has = j < nb
            b = first_block + j
            tl.store(bexp_ptr + b, offs_e, mask=has)
            tl.store(bstart_ptr + b, starts + j * BLOCK_M, mask=has)
            tl.store(brows_ptr + b, tl.minimum(c - j * BLOCK_M, BLOCK_M), mask=has)
        for b0 in range(tl.sum(nb, 0), NB, BB):  # the unused tail of the static bound: no slots
            b = b0 + tl.arange(0, BB)
            tail = b < NB
            tl.store(bexp_ptr + b, tl.zeros((BB,), tl.int32) + (E - 1), mask=tail)
            tl.store(bstart_ptr + b, tl.zeros((BB,), tl.int32), mask=tail)
            tl.store(brows_ptr + b, tl.zeros((BB,), tl.int32), mask=tail)

    @triton.jit
    def _scatter(ids_ptr, rank_ptr, start_ptr, order_ptr, S, BS: tl.constexpr):
        offs = tl.program_id(0) * BS + tl.arange(0, BS)
        ok = offs < S
        e = tl.load(ids_ptr + offs, mask=ok, other=0)
        place = tl.load(start_ptr + e, mask=ok, other=0) + tl.load(rank_ptr + offs, mask=ok, other=0)
        tl.store(order_ptr + place, offs, mask=ok)

    @triton.jit
    def _route(logits_ptr, bias_ptr, ids_ptr, w_ptr, N, scale, E: tl.constexpr, G: tl.constexpr,
               TOPG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, NORM: tl.constexpr, BT: tl.constexpr):
        # ``moe.route`` for BT tokens: sigmoid scores, biased group scores (sum of each group's top 2),
        # the TOPG best groups, the K best biased experts in them, unbiased weights; all fp32
        offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
        t_ok = offs_t < N
        offs_e = tl.arange(0, E)
        logit = tl.load(logits_ptr + offs_t[:, None].to(tl.int64) * E + offs_e[None, :], mask=t_ok[:, None],
                        other=0.0)
        score = tl.sigmoid(logit)
        biased = score + tl.load(bias_ptr + offs_e)[None, :]
        grouped = tl.reshape(biased, (BT, G, E // G))
        first = tl.max(grouped, 2)
        if E // G >= 2:
            in_group = tl.arange(0, E // G)[None, None, :]
            second = tl.max(tl.where(in_group == tl.argmax(grouped, 2)[:, :, None], float("-inf"), grouped), 2)
            group_score = first + second
        else:
            group_score = first
        offs_g = tl.arange(0, G)[None, :]
        keep = offs_g < 0  # [BT, G] all False
        for _ in tl.static_range(TOPG):
            hit = offs_g == tl.argmax(group_score, 1)[:, None]
            keep = keep | hit
            group_score = tl.where(hit, float("-inf"), group_score)
        cand = tl.reshape(tl.where(keep[:, :, None], grouped, float("-inf")), (BT, E))
        slots = tl.arange(0, KP)[None, :]
        ids = tl.zeros((BT, KP), tl.int32)
        w = tl.zeros((BT, KP), tl.float32)
        for j in tl.static_range(K):
            best = tl.argmax(cand, 1)
            hit = offs_e[None, :] == best[:, None]
            ids = tl.where(slots == j, best[:, None], ids)
            w = tl.where(slots == j, tl.sum(tl.where(hit, score, 0.0), 1)[:, None], w)
            cand = tl.where(hit, float("-inf"), cand)
        if NORM:
            w = w / (tl.sum(w, 1)[:, None] + 1e-20)
        out = offs_t[:, None] * K + slots
        ok = t_ok[:, None] & (slots < K)
        tl.store(ids_ptr + out, ids, mask=ok)
        tl.store(w_ptr + out, w * scale, mask=ok)


def align_triton(flat_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``align_blocks``' contract in three Triton launches (count, block table, scatter) instead of a
    sort and a dozen small kernels. Within an expert the slots keep no particular order."""
    s = flat_ids.numel()
    dev = flat_ids.device
    bound = s // block_m + min(num_experts, s) + 1
    ids = flat_ids.to(torch.int32).contiguous()
    counts = torch.zeros(num_experts, device=dev, dtype=torch.int32)
    rank = torch.empty(s, device=dev, dtype=torch.int32)
    starts = torch.empty(num_experts, device=dev, dtype=torch.int32)
    order = torch.empty(s, device=dev, dtype=torch.int32)
    bexp, bstart, brows = (torch.empty(bound, device=dev, dtype=torch.int32) for _ in range(3))
    bs = 1024
    _count[(-(-s // bs),)](ids, counts, rank, s, BS=bs)
    _blocks[(1,)](counts, starts, bexp, bstart, brows, bound, E=num_experts, BLOCK_M=block_m, BB=64)
    _scatter[(-(-s // bs),)](ids, rank, starts, order, s, BS=bs)
    return order, bexp, bstart, brows


def route_triton(router_logits: Tensor, expert_bias: Tensor, *, n_group: int, topk_group: int, top_k: int,
                 routed_scaling_factor: float, norm_topk_prob: bool = True) -> tuple[Tensor, Tensor]:
    """``moe.route``'s contract in one Triton launch; expert ids come back int32."""
    n, e = router_logits.shape
    logits = router_logits.contiguous()
    ids = torch.empty(n, top_k, device=logits.device, dtype=torch.int32)
    w = torch.empty(n, top_k, device=logits.device, dtype=torch.float32)
    # The selection is a chain of ~15 dependent reductions: few tokens per program, in few warps,
    # keeps each reduction short and gives decode-sized batches many programs.
    bt, warps = (4, 2) if n <= 8192 else (16, 4)
    _route[(-(-n // bt),)](logits, expert_bias.contiguous(), ids, w, n, routed_scaling_factor, E=e, G=n_group,
                           TOPG=topk_group, K=top_k, KP=triton.next_power_of_2(top_k), NORM=norm_topk_prob,
                           BT=bt, num_warps=warps)
    return ids, w


def _experts_fit(num_experts: int) -> bool:
    # the router and alignment kernels hold all experts in one block: a power of two, at most 1024
    return triton is not None and num_experts & (num_experts - 1) == 0 and num_experts <= 1024


def route_supported(num_experts: int, n_group: int) -> bool:
    """The fused router takes power-of-two expert and group counts (Triton block sizes)."""
    return _experts_fit(num_experts) and n_group & (n_group - 1) == 0 and num_experts % n_group == 0


# (block_m, gate/up BN, BK, warps, stages), (down BN, BK, warps, stages) by tokens per touched expert;
# the best of benchmarks/bench_moe.py --sweep on an H200 (RESULTS.md).
CONFIGS = {
    16: ((16, 64, 128, 4, 3), (32, 128, 4, 3)),
    32: ((32, 64, 64, 4, 3), (64, 64, 4, 3)),
    64: ((64, 64, 64, 4, 3), (64, 64, 4, 3)),
}


def pick_config(slots: int, num_experts: int) -> tuple[tuple, tuple]:
    # Real routing spreads unevenly: an expert that overflows its block is read again for a second
    # one, so the block takes ~1.5x the mean slots per expert (e.g. 32 rows x 32 tokens x 8 slots over
    # 256 experts: 32 on average, block 64).
    per_expert = slots / min(num_experts, slots)
    bm = 16 if per_expert <= 8 else 32 if per_expert <= 20 else 64
    return CONFIGS[bm]


QUANT_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)


def supported(x: Tensor, w13: Tensor, w2: Tensor, scales: tuple | None = None) -> bool:
    """CUDA, bf16/fp16, contiguous weights, sizes that divide into the kernels' tiles. 8-bit experts
    (``scales``): FP8 needs Ada/Hopper; every scale block holds whole 128-column tiles."""
    if triton is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if not (w13.is_contiguous() and w2.is_contiguous()):
        return False
    if scales is None:
        if w13.dtype != x.dtype or w2.dtype != x.dtype:
            return False
    else:
        if w13.dtype not in QUANT_DTYPES or w2.dtype != w13.dtype:
            return False
        if w13.dtype != torch.int8 and torch.cuda.get_device_capability(x.device) < (8, 9):
            return False
        (_, _, b13, b2) = scales
        if any(b[1] % 128 for b in (b13, b2)):
            return False
    h, inter = w13.shape[-1], w13.shape[-2] // 2
    return h % 128 == 0 and inter % 128 == 0 and w2.shape[-2:] == (h, inter)


def experts_fused(x: Tensor, expert_ids: Tensor, weights: Tensor, w13: Tensor, w2: Tensor,
                  scales: tuple | None = None, config: tuple[tuple, tuple] | None = None) -> Tensor:
    """The ``experts_reference`` contract with the two Triton kernels: x [N, H]; expert_ids/weights
    [N, k]; w13 [E, 2I, H]; w2 [E, H, I] -> [N, H] fp32. ``scales`` (w13_scale, w2_scale, w13 block,
    w2 block): 8-bit experts, read as they are (half the bytes of bf16)."""
    n, k = expert_ids.shape
    e, two_i, h = w13.shape
    inter = two_i // 2
    (bm, bn1, bk1, warps1, stages1), (bn2, bk2, warps2, stages2) = config or pick_config(n * k, e)
    align = align_triton if _experts_fit(e) else align_blocks
    order, bexp, bstart, brows = align(expert_ids.reshape(-1), e, bm)
    x = x.contiguous()
    act = torch.empty(n * k, inter, device=x.device, dtype=x.dtype)  # sorted slot order
    quant = scales is not None
    s13, s2, b13, b2 = scales if quant else (w13, w2, (1, h), (1, inter))  # unread when not quant
    _gate_up[(bexp.numel(), inter // bn1)](x, w13, s13, act, order, bexp, bstart, brows, H=h, INTER=inter, TOPK=k,
                                          QUANT=quant, SBN=b13[0], SBK=b13[1], SK=-(-h // b13[1]),
                                          BM=bm, BN=bn1, BK=bk1, num_warps=warps1, num_stages=stages1)
    out = torch.empty(n * k, h, device=x.device, dtype=torch.float32)  # (token, slot) order
    w = weights.reshape(-1).to(torch.float32).contiguous()
    _down[(bexp.numel(), h // bn2)](act, w2, s2, out, order, w, bexp, bstart, brows, H=h, INTER=inter,
                                    QUANT=quant, SBN=b2[0], SBK=b2[1], SK=-(-inter // b2[1]),
                                    BM=bm, BN=bn2, BK=bk2, num_warps=warps2, num_stages=stages2)
    return out.view(n, k, h).sum(dim=1)

"""Mixture-of-experts routing and expert dispatch (spec 3.4).

``route`` is the LLaDA2 group-limited sigmoid router; ``experts_reference`` is the clear dispatch
(tokens grouped by expert, one matmul pair per expert that received tokens). Faster dispatch
backends are tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def route(router_logits: Tensor, expert_bias: Tensor, *, n_group: int, topk_group: int, top_k: int,
          routed_scaling_factor: float, norm_topk_prob: bool = True) -> tuple[Tensor, Tensor]:
    """Pick ``top_k`` experts per token and their weights. All fp32.

    router_logits [N, E] fp32 -> (expert ids [N, k] int64, weights [N, k] fp32).
    The bias steers *selection only*; weights are the unbiased sigmoid scores, renormalised over the
    chosen experts and multiplied by ``routed_scaling_factor``.
    """
    assert router_logits.dtype == torch.float32 and expert_bias.dtype == torch.float32
    n, e = router_logits.shape
    scores = torch.sigmoid(router_logits)
    biased = scores + expert_bias
    grouped = biased.view(n, n_group, e // n_group)
    group_scores = grouped.topk(min(2, e // n_group), dim=-1).values.sum(dim=-1)  # [N, G]
    keep_groups = group_scores.topk(topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
    # Experts outside the kept groups are excluded with -inf (not 0.0): biased scores can be
    # negative, and a 0.0 fill would then let an excluded group's expert win (spec 3.4: "among experts
    # of groups in G").
    candidates = biased.masked_fill(~group_mask.repeat_interleave(e // n_group, dim=1), float("-inf"))
    expert_ids = candidates.topk(top_k, dim=-1).indices
    weights = scores.gather(1, expert_ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return expert_ids, weights * routed_scaling_factor


def swiglu(x: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """down(silu(gate x) * up x) with gate/up fused as w13 = [gate; up] along the output dim."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def experts_reference(x: Tensor, expert_ids: Tensor, weights: Tensor, w13: Tensor, w2: Tensor,
                      scales: tuple | None = None) -> Tensor:
    """Weighted sum of the chosen experts, accumulated in fp32.

    x [N, H]; expert_ids/weights [N, k]; w13 [E, 2I, H]; w2 [E, H, I] -> [N, H] fp32.
    Token slots are sorted by expert so each expert runs once on all its tokens. ``scales``
    (w13_scale, w2_scale, w13 block, w2 block): 8-bit weights, each used expert dequantized into x's
    dtype (``ops.qmm.dequantize``).
    """
    n, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    order = flat.argsort(stable=True)
    token_of_slot = order // k
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    out = torch.zeros(n, x.shape[-1], device=x.device, dtype=torch.float32)
    slot_weights = weights.reshape(-1)[order]
    begin = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        tokens = token_of_slot[begin:begin + count]
        a, b = w13[expert], w2[expert]
        if scales is not None:
            from .qmm import dequantize
            a = dequantize(a, scales[0][expert], scales[2], x.dtype)
            b = dequantize(b, scales[1][expert], scales[3], x.dtype)
        y = swiglu(x[tokens], a, b)
        out.index_add_(0, tokens, y.float() * slot_weights[begin:begin + count, None])
        begin += count
    return out


def experts_grouped(x: Tensor, expert_ids: Tensor, weights: Tensor, w13: Tensor, w2: Tensor,
                    scales: tuple | None = None) -> Tensor:
    """Same result as ``experts_reference`` with two grouped GEMMs and no host synchronisation.

    Token slots are sorted by expert; ``torch._grouped_mm`` runs every expert's slice in one launch
    (CUTLASS grouped GEMM on Hopper), so the whole MoE is a fixed sequence of kernels that CUDA
    graphs can capture. The weighted combine un-sorts the slots and sums the k experts of each token
    in fp32 (deterministic, no atomics).
    """
    if scales is not None:
        raise ValueError("the grouped-GEMM dispatch takes full-precision experts (use the triton one)")
    n, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    order = flat.argsort(stable=True)
    # End offset of each expert's slice. searchsorted, not bincount: bincount sizes its output on
    # the host (a sync), which CUDA graph capture forbids.
    experts = torch.arange(w13.shape[0], device=flat.device, dtype=flat.dtype)
    offsets = torch.searchsorted(flat[order], experts, right=True).to(torch.int32)
    xs = x[order // k]  # [N*k, H], grouped by expert
    gate, up = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
    ys = torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offsets)  # [N*k, H]
    y = torch.empty_like(ys)
    y[order] = ys  # back to (token, slot) order
    return (y.view(n, k, -1).float() * weights[..., None]).sum(dim=1)


def grouped_supported(x: Tensor, w13: Tensor) -> bool:
    """``torch._grouped_mm`` needs 16-byte aligned rows; on CUDA it takes bf16 only."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.is_cuda and x.dtype != torch.bfloat16:
        return False
    item = x.element_size()
    return all((d * item) % 16 == 0 for d in (w13.shape[-1], w13.shape[-2] // 2))

"""Block-diffusion attention: the block-causal mask with CFG left padding, and one ``attend``.

Torch SDPA is the reference backend; faster backends plug in behind ``attend`` from outside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rope_positions(start: int, end: int, pad_lens: Tensor) -> Tensor:
    """RoPE positions of physical indices [start, end) per row: restart at 0 on the first real token.

    Spec 4.5: pos = max(phys - pad_len, 0). Returns [R, end - start] int64.
    """
    phys = torch.arange(start, end, device=pad_lens.device)
    return (phys[None, :] - pad_lens[:, None]).clamp_min(0)


def block_causal_mask(start: int, end: int, pad_lens: Tensor, block_length: int) -> Tensor:
    """Boolean mask [R, 1, end - start, end] (True = may attend) for queries [start, end), keys [0, end).

    Blocks are absolute: query i sees key j iff floor(j/B) <= floor(i/B) (spec 3.3), including inside
    the prompt. Left-pad keys are invisible to every query, so a pad query in a block of pads sees
    nothing: ``attend`` gives it a zero output, as the official code's SDPA call does. Pad KV is
    never seen in the baseline; SPRINT's pruned steps show it, as the official code does.
    """
    dev = pad_lens.device
    q = torch.arange(start, end, device=dev)
    k = torch.arange(0, end, device=dev)
    allowed = (k[None, :] // block_length) <= (q[:, None] // block_length)  # [Tq, Tk]
    key_real = k[None, :] >= pad_lens[:, None]  # [R, Tk]
    return (allowed[None] & key_real[:, None, :])[:, None]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """q [R, Hq, Tq, D], k/v [R, Hkv, Tk, D], mask [R, 1, Tq, Tk] bool -> [R, Hq, Tq, D].

    GQA: query head h uses KV head h // (Hq / Hkv) (spec 3.2), done by SDPA's ``enable_gqa``.
    A query that may see no key gets a zero output (torch's CPU SDPA does this itself; not every
    GPU kernel does, and an all -inf softmax row would give NaN that later layers spread).
    """
    empty = ~mask.any(-1, keepdim=True)  # [R, 1, Tq, 1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.masked_fill(empty, 0.0)

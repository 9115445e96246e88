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
    the prompt. Left-pad keys are invisible to every query; a pad query sees only itself so that no
    softmax row is empty (an all -inf row gives NaN that later layers can spread).
    """
    dev = pad_lens.device
    q = torch.arange(start, end, device=dev)
    k = torch.arange(0, end, device=dev)
    allowed = (k[None, :] // block_length) <= (q[:, None] // block_length)  # [Tq, Tk]
    key_real = k[None, :] >= pad_lens[:, None]  # [R, Tk]
    q_pad = q[None, :] < pad_lens[:, None]  # [R, Tq]
    self_key = k[None, :] == q[:, None]  # [Tq, Tk]
    mask = allowed[None] & key_real[:, None, :] & ~q_pad[:, :, None]
    mask = mask | (q_pad[:, :, None] & self_key[None])
    return mask[:, None]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """q [R, Hq, Tq, D], k/v [R, Hkv, Tk, D], mask [R, 1, Tq, Tk] bool -> [R, Hq, Tq, D].

    GQA: query head h uses KV head h // (Hq / Hkv) (spec 3.2), done by SDPA's ``enable_gqa``.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])

"""Linear layers on quantized weights: FP8 (e4m3) or int8 weights with fp32 scales per block.

A quantized weight W [N, K] is stored as ``q`` (FP8 or int8) and ``s`` fp32 [ceil(N/bn), ceil(K/bk)]:
W = q * s block by block (``block`` = (bn, bk); per-channel scales are the block (1, K), a per-tensor
scale the block (N, K)). Three ways to multiply by it, one contract (y = x @ W.T + b, in x's dtype):

* ``qlinear_reference``: dequantize, then ``F.linear``. The clear path; runs anywhere (CPU).
* ``qlinear_triton``: weight-only (W8A16). One Triton kernel reads the 8-bit tiles, widens them to
  bf16 (exact for e4m3 and int8), multiplies on the tensor cores with fp32 accumulation and applies
  each block's scale to its partial sum. At decode sizes (tens to hundreds of tokens) a linear layer
  is a weight stream, so half the bytes is close to half the time.
* ``qlinear_w8a8``: FP8 x FP8 for large token counts (the DiT's 4096+ tokens are compute-bound): the
  activations are quantized per row (dynamic, amax / 448), the weight per output channel, and
  ``torch._scaled_mm`` runs the FP8 tensor cores with both scales in its epilogue.
  ``qlinear_w8a8_reference`` is the same arithmetic in fp32 (CPU).

``pick`` chooses once per layer: the Triton kernel on CUDA where its tiles fit (a torch custom op, so that
torch.compile and CUDA graphs see one opaque node), else the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path
    triton = None

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def expand_scale(s: Tensor, block: tuple[int, int], shape: tuple[int, int]) -> Tensor:
    """Block scales [ceil(N/bn), ceil(K/bk)] spread over the [N, K] elements of the weight."""
    bn, bk = block
    return s.repeat_interleave(bn, 0)[: shape[0]].repeat_interleave(bk, 1)[:, : shape[1]]


def dequantize(q: Tensor, s: Tensor, block: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """q [.., N, K] (FP8 or int8) and s [.., ceil(N/bn), ceil(K/bk)] -> the weight in ``dtype``
    (products in fp32). Leading dims (stacked experts) are kept."""
    if q.dim() > 2:
        return torch.stack([dequantize(qi, si, block, dtype) for qi, si in zip(q, s)])
    return (q.to(torch.float32) * expand_scale(s.to(torch.float32), block, tuple(q.shape))).to(dtype)


def qlinear_reference(x: Tensor, q: Tensor, s: Tensor, block: tuple[int, int], bias: Tensor | None = None) -> Tensor:
    return F.linear(x, dequantize(q, s, block, x.dtype), bias)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-row FP8 of activations: x [M, K] -> (e4m3 [M, K], fp32 scale [M, 1])."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def qlinear_w8a8_reference(x: Tensor, q: Tensor, s: Tensor, bias: Tensor | None = None) -> Tensor:
    """``qlinear_w8a8``'s arithmetic in fp32: both operands rounded to FP8, products of the scales."""
    shape = x.shape
    xq, xs = quantize_rows(x.reshape(-1, shape[-1]))
    y = (xq.float() * xs) @ (q.float() * s.reshape(-1, 1).float()).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*shape[:-1], q.shape[0])


def qlinear_w8a8(x: Tensor, q: Tensor, s: Tensor, bias: Tensor | None = None) -> Tensor:
    """FP8 x FP8 on the tensor cores (``torch._scaled_mm``, row-wise scales); q [N, K] e4m3 with
    per-channel s [N, 1]. x [.., K] in bf16."""
    shape = x.shape
    xq, xs = quantize_rows(x.reshape(-1, shape[-1]))
    y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s.reshape(1, -1).float(), out_dtype=x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*shape[:-1], q.shape[0])


def w8a8_supported(x: Tensor, q: Tensor, s: Tensor) -> bool:
    """Hopper/Ada FP8 tensor cores, an e4m3 per-channel weight, 16-aligned sizes."""
    if not (x.is_cuda and q.dtype == torch.float8_e4m3fn and x.dtype == torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    return s.numel() == q.shape[0] and q.shape[0] % 16 == 0 and q.shape[1] % 16 == 0


if triton is not None:
    @triton.jit
    def _qmm(x_ptr, q_ptr, s_ptr, b_ptr, out_ptr, M, N: tl.constexpr, K: tl.constexpr, SBN: tl.constexpr,
             SBK: tl.constexpr, SK: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             BK: tl.constexpr):
        offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        m_ok = offs_m < M
        n_ok = offs_n < N
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
        q_ptrs = q_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]  # [BK, BN]
        s_ptrs = s_ptr + (offs_n // SBN) * SK  # this tile's scale rows
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in range(0, K // BK):
            a = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            w = tl.load(q_ptrs, mask=n_ok[None, :], other=0.0).to(a.dtype)  # exact: 8-bit values fit bf16
            if SBK >= K:  # one scale per row of W: applied once, after the sum
                acc = tl.dot(a, w, acc)
            else:  # a block's scale multiplies its partial sum (BK divides SBK)
                part = tl.dot(a, w)
                acc += part * tl.load(s_ptrs + (kk * BK) // SBK, mask=n_ok, other=0.0)[None, :]
            x_ptrs += BK
            q_ptrs += BK
        if SBK >= K:
            acc = acc * tl.load(s_ptrs, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)[None, :].to(tl.float32)
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _tiles(m: int, k: int, sbk: int) -> tuple[int, int, int, int, int] | None:
    """(BM, BN, BK, warps, stages) for M tokens, or None when K does not split into the tiles."""
    bk = next((b for b in (128, 64, 32) if k % b == 0 and (sbk >= k or sbk % b == 0)), None)
    if bk is None:
        return None
    if m <= 16:
        return 16, 64, bk, 4, 4
    if m <= 64:
        return 32, 64, bk, 4, 4
    return 64, 128, min(bk, 64), 4, 3


def triton_supported(x: Tensor, q: Tensor, s: Tensor, block: tuple[int, int]) -> bool:
    if triton is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if q.dtype == torch.int8:
        pass
    elif q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) or torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    n, k = q.shape
    return q.is_contiguous() and _tiles(1, k, min(block[1], k)) is not None and \
        tuple(s.shape) == (math.ceil(n / block[0]), math.ceil(k / block[1]))


def qlinear_triton(x: Tensor, q: Tensor, s: Tensor, block: tuple[int, int], bias: Tensor | None = None) -> Tensor:
    shape = x.shape
    n, k = q.shape
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out.view(*shape[:-1], n)
    sbk = min(block[1], k)
    bm, bn, bk, warps, stages = _tiles(m, k, sbk)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _qmm[grid](x2, q, s.float().contiguous(), bias if bias is not None else x2, out, m, N=n, K=k,
               SBN=min(block[0], n), SBK=sbk, SK=s.shape[1], HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk,
               num_warps=warps, num_stages=stages)
    return out.view(*shape[:-1], n)


# The Triton kernel as one opaque op for torch.compile and CUDA graphs (block sizes are ints).
@torch.library.custom_op("llada2uni::qlinear", mutates_args=())
def _qlinear_op(x: Tensor, q: Tensor, s: Tensor, bn: int, bk: int, bias: Tensor | None) -> Tensor:
    return qlinear_triton(x, q, s, (bn, bk), bias)


@_qlinear_op.register_fake
def _(x, q, s, bn, bk, bias):
    return x.new_empty(*x.shape[:-1], q.shape[0])


def pick(device: torch.device, dtype: torch.dtype, q: Tensor, s: Tensor, block: tuple[int, int],
         act: str = "none") -> str:
    """The implementation for activations of ``dtype`` on ``device``: "w8a8", "triton" or
    "reference". Decided once per layer (outside torch.compile: it asks the device's capability)."""
    x = torch.empty(0, device=device, dtype=dtype)
    if act == "fp8":
        if w8a8_supported(x, q, s):
            return "w8a8"
        if device.type == "cpu" and q.dtype == torch.float8_e4m3fn and s.numel() == q.shape[0]:
            return "w8a8_reference"
    if triton_supported(x, q, s, block):
        return "triton"
    return "reference"


def qlinear(x: Tensor, q: Tensor, s: Tensor, block: tuple[int, int], bias: Tensor | None = None,
            kernel: str = "reference") -> Tensor:
    """y = x @ dequantize(q, s).T + bias by the ``kernel`` that ``pick`` chose."""
    if kernel == "triton":
        return _qlinear_op(x, q, s, block[0], block[1], bias)
    if kernel == "w8a8":
        return qlinear_w8a8(x, q, s, bias)
    if kernel == "w8a8_reference":
        return qlinear_w8a8_reference(x, q, s, bias)
    return qlinear_reference(x, q, s, block, bias)

"""FP8 checkpoints: discover the layout, check it, dequantize (the reference path), and write one.

The official ``inclusionAI/LLaDA2.0-Uni-FP8`` checkpoint is DeepSeek-V3-style block FP8 by every
public account (spec 2.1: its expert weights are ``float8_e4m3fn``), but its exact
``quantization_config`` and scale names are not public (spec: UNKNOWN). So the layout is discovered at
load time from the config's ``quantization_config`` and the checkpoint's own tensor names and dtypes,
and these variants are accepted:

* ``block``: ``X.weight`` in FP8 with ``X.weight_scale_inv`` of shape [ceil(out / bm), ceil(in / bn)]
  (``weight_block_size`` [bm, bn], 128 x 128 when the config does not say): DeepSeek-V3's layout.
  Despite its name the scale multiplies: W = fp8(W) * scale_inv, block by block.
* ``channel``: ``X.weight_scale`` [out] or [out, 1] (FBGEMM / compressed-tensors per-channel FP8).
* ``tensor``: ``X.weight_scale`` [] or [1] (per-tensor FP8).

``X.input_scale`` (static activation scales) is accepted and not used: the weights are dequantized.
Anything else is an error that names the tensor: an FP8 tensor with no scale, a scale with no FP8
weight, a scale of the wrong shape, an unknown ``quant_method``, or an FP8 tensor among those that
stay in high precision (router, expert bias, embeddings, LM head, norms, biases).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# quant_method values of FP8 schemes (HF transformers / compressed-tensors / FBGEMM names)
FP8_METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors")
DEFAULT_BLOCK = (128, 128)
SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")
IGNORED_SUFFIXES = ("input_scale",)

# Linear weights that may be FP8: attention, the dense MLP, shared and routed experts. The router
# (mlp.gate), expert bias, embeddings, LM head, norms and biases stay in high precision.
_QUANTIZABLE = re.compile(r"^model\.layers\.\d+\.(attention\.(query_key_value|dense)"
                          r"|mlp\.((shared_experts\.|experts\.\d+\.)?(gate|up|down)_proj))\.weight$")


class QuantError(ValueError):
    """The checkpoint's quantization is not one this loader understands; names the tensor."""


def quantizable(name: str) -> bool:
    """Whether checkpoint tensor ``name`` may be stored in FP8."""
    return bool(_QUANTIZABLE.match(name))


@dataclass(frozen=True)
class Fp8Layout:
    scheme: str  # "block" | "channel" | "tensor"
    block: tuple[int, int] | None  # (rows, cols) of a scale block for "block"
    scale_suffix: str  # "weight_scale_inv" | "weight_scale"

    def scale_name(self, weight_name: str) -> str:
        return weight_name.removesuffix("weight") + self.scale_suffix

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """The scale shapes this layout accepts for a weight of ``shape`` [out, in]."""
        out, inp = shape
        if self.scheme == "block":
            return ((math.ceil(out / self.block[0]), math.ceil(inp / self.block[1])),)
        if self.scheme == "channel":
            return ((out,), (out, 1))
        return ((), (1,))


def discover(quant_config: dict | None, dtypes: dict[str, str], shapes: dict[str, tuple[int, ...]]
             ) -> Fp8Layout | None:
    """The checkpoint's FP8 layout from its ``quantization_config`` (may be None) and its tensors'
    safetensors dtypes and shapes; None for a checkpoint with no FP8 tensors. Raises ``QuantError``."""
    fp8 = sorted(n for n, d in dtypes.items() if d in FP8_DTYPES)
    if quant_config:
        method = str(quant_config.get("quant_method", "")).lower()
        if method not in FP8_METHODS:
            raise QuantError(f"quantization_config.quant_method {quant_config.get('quant_method')!r} is not "
                             f"supported (FP8 checkpoints only: {', '.join(FP8_METHODS)})")
        fmt = str(quant_config.get("fmt", "e4m3")).lower()
        if fmt not in ("e4m3", "e5m2", "float8_e4m3fn", "float8_e5m2"):
            raise QuantError(f"quantization_config.fmt {quant_config.get('fmt')!r} is not an FP8 format")
    if not fp8:
        if quant_config:
            raise QuantError("the config has a quantization_config but no tensor is FP8")
        return None
    bad = [n for n in fp8 if not quantizable(n)]
    if bad:
        raise QuantError(f"tensor {bad[0]} is FP8 ({dtypes[bad[0]]}), but it must stay in high precision "
                         "(router, expert bias, embeddings, LM head, norms and biases are not quantized)")
    suffixes = {s for s in SCALE_SUFFIXES for n in fp8 if n.removesuffix("weight") + s in dtypes}
    if len(suffixes) != 1:
        what = "no scale tensor" if not suffixes else "both weight_scale_inv and weight_scale tensors"
        raise QuantError(f"FP8 weights with {what} (e.g. {fp8[0]}): expected "
                         f"{fp8[0].removesuffix('weight')}weight_scale_inv or ...weight_scale")
    suffix = suffixes.pop()
    block = (quant_config or {}).get("weight_block_size")
    if block is not None:
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                             for b in block)):
            raise QuantError(f"quantization_config.weight_block_size {block!r} is not two positive ints")
        layout = Fp8Layout("block", (block[0], block[1]), suffix)
    else:
        # no block size given: tell the schemes apart by the first weight's scale shape
        probe = fp8[0]
        sshape = shapes[probe.removesuffix("weight") + suffix]
        scheme = "tensor" if len(sshape) == 0 or sshape == (1,) else \
            "channel" if sshape in ((shapes[probe][0],), (shapes[probe][0], 1)) and suffix == "weight_scale" \
            else "block"
        layout = Fp8Layout(scheme, DEFAULT_BLOCK if scheme == "block" else None, suffix)
    check(layout, dtypes, shapes)
    return layout


def check(layout: Fp8Layout, dtypes: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every FP8 weight has its scale of the layout's shape; every scale belongs to an FP8 weight."""
    for name, dtype in dtypes.items():
        if dtype in FP8_DTYPES:
            scale = layout.scale_name(name)
            if scale not in dtypes:
                raise QuantError(f"tensor {name} is FP8 but {scale} is missing")
            if len(shapes[name]) != 2:
                raise QuantError(f"tensor {name} is FP8 with shape {list(shapes[name])}: expected a 2-D weight")
            if shapes[scale] not in layout.scale_shape(shapes[name]):
                want = " or ".join(str(list(s)) for s in layout.scale_shape(shapes[name]))
                raise QuantError(f"tensor {scale} has shape {list(shapes[scale])}, expected {want} for "
                                 f"{name} {list(shapes[name])} ({layout.scheme} scales)")
            if dtypes[scale] not in ("F32", "BF16", "F16"):
                raise QuantError(f"tensor {scale} is {dtypes[scale]}: a scale must be a float tensor")
        elif name.endswith(SCALE_SUFFIXES):
            weight = next(name.removesuffix(s) for s in SCALE_SUFFIXES if name.endswith(s)) + "weight"
            if dtypes.get(weight) not in FP8_DTYPES:
                raise QuantError(f"tensor {name} is a scale, but {weight} is not an FP8 weight")


def _per_element(scale: Tensor, block: tuple[int, int], shape: tuple[int, int]) -> Tensor:
    """Block scales [ceil(out/bm), ceil(in/bn)] spread over the weight's [out, in] elements."""
    bm, bn = block
    return scale.repeat_interleave(bm, 0)[: shape[0]].repeat_interleave(bn, 1)[:, : shape[1]]


def dequantize(weight: Tensor, scale: Tensor, layout: Fp8Layout, dtype: torch.dtype = torch.float32) -> Tensor:
    """An FP8 weight [out, in] and its scale -> the weight in ``dtype`` (products in fp32)."""
    w = weight.to(torch.float32)
    s = scale.to(torch.float32)
    if layout.scheme == "block":
        s = _per_element(s, layout.block, w.shape)
    elif layout.scheme == "channel":
        s = s.reshape(-1, 1)
    return (w * s).to(dtype)


def quantize_blockwise(weight: Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                       dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3-style block quantization: (FP8 weight, fp32 scale_inv [ceil(out/bm), ceil(in/bn)])
    with each block's largest magnitude mapped to the format's largest finite value."""
    out, inp = weight.shape
    bm, bn = block
    w = weight.to(torch.float32)
    pad = torch.zeros(math.ceil(out / bm) * bm, math.ceil(inp / bn) * bn)
    pad[:out, :inp] = w.abs()
    amax = pad.view(pad.shape[0] // bm, bm, pad.shape[1] // bn, bn).amax(dim=(1, 3))
    scale = (amax / torch.finfo(dtype).max).clamp(min=1e-12)
    return (w / _per_element(scale, block, (out, inp))).to(dtype), scale

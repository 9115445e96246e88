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

Resident quantization (``QuantMode``): the linear weights of attention, the dense and shared MLPs and
the routed experts kept as 8-bit values and fp32 block scales on the device (``QuantLinear``, and
``Experts.w13/w2`` with ``w13_scale/w2_scale``); ``ops/qmm.py`` and ``ops/moe_triton.py`` multiply
by them. An FP8 checkpoint whose blocks fit the model's tensors is kept as it is; a bf16 one (or an
FP8 one in another layout) is quantized tensor by tensor while it loads, so the full-precision model
never exists on the device. The router, expert bias, embeddings, LM head and norms stay high
precision.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

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
    pad = w.new_zeros(math.ceil(out / bm) * bm, math.ceil(inp / bn) * bn)
    pad[:out, :inp] = w.abs()
    amax = pad.view(pad.shape[0] // bm, bm, pad.shape[1] // bn, bn).amax(dim=(1, 3))
    scale = (amax / torch.finfo(dtype).max).clamp(min=1e-12)
    return (w / _per_element(scale, block, (out, inp))).to(dtype), scale


# ---- resident quantization ----

@dataclass(frozen=True)
class QuantMode:
    """How linear weights are kept on the device. ``block`` (rows, cols) of one scale, or None for
    one scale per output channel; ``act`` "fp8": the activations are quantized too (W8A8, where FP8
    tensor cores exist), "none": weight-only."""

    name: str
    dtype: torch.dtype
    block: tuple[int, int] | None
    act: str = "none"


MODES = {
    "fp8": QuantMode("fp8", torch.float8_e4m3fn, DEFAULT_BLOCK),
    "fp8-channel": QuantMode("fp8-channel", torch.float8_e4m3fn, None),
    "int8": QuantMode("int8", torch.int8, None),
}
QUANT_CHOICES = ("auto", "none", *MODES)
# the DiT's GEMMs are compute-bound (4096+ tokens): FP8 x FP8 with per-channel weight scales
DIT_MODE = QuantMode("fp8-w8a8", torch.float8_e4m3fn, None, act="fp8")


def has_fp8(device: torch.device | None) -> bool:
    """Whether FP8 weights can be kept on ``device``: any CPU (the reference path), and GPUs from
    Ada/Hopper on (FP8 tensor cores; before them FP8 becomes int8)."""
    return device is None or device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_mode(quant: str | QuantMode | None, layout: "Fp8Layout | None" = None,
                 device: torch.device | None = None) -> QuantMode | None:
    """The resident mode for ``quant`` ("auto", "none", "fp8", "fp8-channel", "int8"). "auto": an FP8
    checkpoint stays FP8 in its own blocks, a bf16 one stays bf16. FP8 on a GPU without FP8 support
    (before Ada/Hopper) is int8 instead."""
    if isinstance(quant, QuantMode):
        mode = quant
    else:
        key = "auto" if quant is None else str(quant).lower()
        if key not in QUANT_CHOICES:
            raise ValueError(f"quant must be one of {', '.join(QUANT_CHOICES)}; got {quant!r}")
        if key == "none" or (key == "auto" and layout is None):
            return None
        if key == "auto":
            block = layout.block if layout.scheme == "block" else None
            mode = QuantMode("fp8", torch.float8_e4m3fn, block)
        else:
            mode = MODES[key]
    if mode.dtype != torch.int8 and not has_fp8(device):
        return MODES["int8"]
    return mode


def fit_block(shape: tuple[int, int], block: tuple[int, int] | None) -> tuple[int, int]:
    """The block the scales of a weight of ``shape`` use: ``block`` clipped to the weight, or one row
    by the full width (per channel) when the weight does not divide into it."""
    out, inp = shape
    if block is None:
        return 1, inp
    bm = out if out <= block[0] else block[0] if out % block[0] == 0 else None
    bn = inp if inp <= block[1] else block[1] if inp % block[1] == 0 else None
    return (bm, bn) if bm and bn else (1, inp)


def quantize(weight: Tensor, dtype: torch.dtype, block: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """weight [out, in] -> (8-bit weight, fp32 scales [ceil(out/bm), ceil(in/bn)]): symmetric, each
    block's largest magnitude mapped to the format's largest value (int8: 127, rounded to nearest)."""
    if dtype == torch.int8:
        w = weight.float()
        out, inp = w.shape
        bm, bn = block
        pad = w.new_zeros(math.ceil(out / bm) * bm, math.ceil(inp / bn) * bn)
        pad[:out, :inp] = w.abs()
        amax = pad.view(pad.shape[0] // bm, bm, pad.shape[1] // bn, bn).amax(dim=(1, 3))
        scale = (amax / 127.0).clamp(min=1e-12)
        q = (w / _per_element(scale, block, (out, inp))).round().clamp(-127, 127).to(torch.int8)
        return q, scale
    return quantize_blockwise(weight, block, dtype)


class QuantLinear(nn.Module):
    """A bias-optional linear layer on an 8-bit weight [out, in] and fp32 ``weight_scale`` per block.
    ``kernel`` (``ops.qmm.pick``) is chosen after loading, once the device is known."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: QuantMode) -> None:
        super().__init__()
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.block = fit_block((out_features, in_features), mode.block)
        bm, bn = self.block
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=mode.dtype), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(math.ceil(out_features / bm), math.ceil(in_features / bn),
                                                     dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.kernel = "reference"

    def forward(self, x: Tensor) -> Tensor:
        from .ops.qmm import qlinear
        return qlinear(x, self.weight, self.weight_scale, self.block, self.bias, self.kernel)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.mode.name}, block={self.block}, {self.kernel}"


def _replace_linears(root: nn.Module, mode: QuantMode, keep: "callable[[str], bool]") -> None:
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and keep(full):
                q = QuantLinear(child.in_features, child.out_features, child.bias is not None, mode)
                if child.bias is not None:
                    q.bias = child.bias
                setattr(module, child_name, q)


def prepare_backbone(model: nn.Module, mode: QuantMode) -> dict[str, tuple[int, int]]:
    """On a meta-built backbone: attention, dense and shared MLP linears become ``QuantLinear`` and
    the experts' stacked weights 8-bit with scale parameters. Returns quantized parameter -> block."""
    from .models.backbone import Experts

    _replace_linears(model, mode, lambda name: quantizable(f"{name}.weight"))
    blocks = {f"{n}.weight": m.block for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, experts in model.named_modules():
        if isinstance(experts, Experts):
            e, two_i, h = experts.w13.shape
            # gate and up are separate tensors of [I, H] in the checkpoint: their blocks, stacked
            experts.quantize_as(mode.dtype, fit_block((two_i // 2, h), mode.block),
                                fit_block(tuple(experts.w2.shape[1:]), mode.block))
            blocks[f"{name}.w13"], blocks[f"{name}.w2"] = experts.blocks
    return blocks


def scale_name(param: str) -> str:
    """The scale parameter of a quantized parameter (``x.weight`` -> ``x.weight_scale``)."""
    return param + "_scale"


def scale_index(index: tuple | None, block: tuple[int, int]) -> tuple | None:
    """A target slice of a stacked weight -> the same slice of its scales (rows divide by the block)."""
    if index is None or len(index) < 2:
        return index
    e, rows = index
    return e, slice(rows.start // block[0], rows.stop // block[0])


def finalize(model: nn.Module, dtype: torch.dtype, act_device: torch.device | None = None) -> None:
    """After loading: each ``QuantLinear`` picks its kernel for activations of ``dtype``."""
    from .ops.qmm import pick
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = pick(act_device or m.weight.device, dtype, m.weight, m.weight_scale, m.block, m.mode.act)


def quantize_linears(root: nn.Module, mode: QuantMode, keep, *, device: torch.device, dtype: torch.dtype,
                     store: torch.device | None = None) -> None:
    """Quantize the loaded ``nn.Linear`` layers of ``root`` whose name ``keep`` accepts, in place, one
    at a time on ``device`` (a model loaded on the CPU reaches the device already quantized). The
    8-bit tensors are kept on ``store`` (default ``device``; the CPU for a memory group)."""
    store = device if store is None else torch.device(store)
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or not keep(full, child):
                continue
            q = QuantLinear(child.in_features, child.out_features, child.bias is not None, mode)
            with torch.no_grad():
                w, s = quantize(child.weight.detach().to(device), mode.dtype, q.block)
                q.weight = nn.Parameter(w.to(store), requires_grad=False)
                q.weight_scale = nn.Parameter(s.to(store), requires_grad=False)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.detach().to(device=store, dtype=dtype), requires_grad=False)
            setattr(module, child_name, q)
    finalize(root, dtype, act_device=device)


def quantize_backbone(model: nn.Module, mode: QuantMode) -> None:
    """Quantize a loaded full-precision backbone in place, one tensor at a time (the bf16 tensor is
    freed as its 8-bit copy is made): the layout ``prepare_backbone`` builds for loading."""
    from .models.backbone import Experts

    dtype = model.lm_head.weight.dtype
    device = model.lm_head.weight.device
    quantize_linears(model, mode, lambda name, _: quantizable(f"{name}.weight"), device=device, dtype=dtype)
    for experts in [m for m in model.modules() if isinstance(m, Experts)]:
        w13, w2 = experts.w13, experts.w2
        e, two_i, h = w13.shape
        experts.quantize_as(mode.dtype, fit_block((two_i // 2, h), mode.block), fit_block(tuple(w2.shape[1:]), mode.block))
        with torch.no_grad():
            for i in range(e):
                for w, q, s, b in ((w13, experts.w13, experts.w13_scale, experts.blocks[0]),
                                   (w2, experts.w2, experts.w2_scale, experts.blocks[1])):
                    qi, si = quantize(w[i], mode.dtype, b)
                    q[i].copy_(qi)
                    s[i].copy_(si)
        del w13, w2
    finalize(model, dtype)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (8-bit weights count one byte each)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def dit_linear(name: str, module: nn.Linear) -> bool:
    """The DiT linears kept in FP8: attention and feed-forward of every transformer block (main
    stack and both refiners), 99% of its weights. The embedders, the final layer and the adaLN
    modulation (one token per image: nothing to gain) stay in the model's dtype."""
    parts = name.split(".")
    return parts[0] in ("layers", "noise_refiner", "context_refiner") and \
        any(p in ("attention", "feed_forward") for p in parts) and module.in_features % 16 == 0 and \
        module.out_features % 16 == 0


def quantize_dit(model: nn.Module, mode: QuantMode = DIT_MODE, *, device: torch.device, dtype: torch.dtype,
                 store: torch.device | None = None) -> None:
    """The Z-Image DiT's block linears (``dit_linear``) to ``mode`` in place, one layer at a time on
    ``device``; everything else moves to ``store`` (default ``device``) in ``dtype``. A DiT loaded on
    the CPU so never exists in full precision on the device; with ``store="cpu"`` (a memory group,
    placed afterwards) it is not on the device at all."""
    device = torch.device(device)
    store = device if store is None else torch.device(store)
    quantize_linears(model, mode, dit_linear, device=device, dtype=dtype, store=store)
    model.to(store)  # the rest (embedders, norms, modulation) as loaded
    finalize(model, dtype, act_device=device)


DECODER_QUANT_CHOICES = ("auto", "none", "fp8")


def decoder_mode(decoder_quant: str | None, backbone: QuantMode | None,
                 device: torch.device | None = None) -> QuantMode | None:
    """The DiT's mode for ``decoder_quant``: "fp8" (W8A8 block linears, ``DIT_MODE``), "none", or
    "auto"/None: FP8 when the backbone is kept in FP8, else full precision. FP8 activations need FP8
    tensor cores: on a GPU before Ada/Hopper "fp8" is an error and "auto" full precision."""
    key = "auto" if decoder_quant is None else str(decoder_quant).lower()
    if key not in DECODER_QUANT_CHOICES:
        raise ValueError(f"decoder_quant must be one of {', '.join(DECODER_QUANT_CHOICES)}; got {decoder_quant!r}")
    fp8_ok = has_fp8(device)
    if key == "fp8":
        if not fp8_ok:
            raise ValueError("decoder_quant='fp8' needs a GPU with FP8 tensor cores (Ada, Hopper or newer)")
        return DIT_MODE
    if key == "auto" and backbone is not None and backbone.dtype == torch.float8_e4m3fn and fp8_ok:
        return DIT_MODE
    return None

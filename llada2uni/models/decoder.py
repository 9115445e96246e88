"""Semantic image codes -> pixels (image spec 6-10): SigVQ embedding, Z-Image DiT, VAE.

An h x w grid of raw VQ codes is upsampled (nearest x2) to 2h x 2w, embedded by SigVQ into "caption"
features [4hw, D], and drives diffusers' ``ZImageTransformer2DModel`` (basic mode: image tokens first,
caption after) through a flow sampler (``sampling/flow.py``); diffusers' ``AutoencoderKL`` turns the
latent into pixels. Both diffusers classes match the reference exactly (spec 11.1), so they are used
as they are; what is ours is the strict loading: built on meta, filled tensor by tensor, and a
missing, extra or mis-shaped tensor is an error naming it (the reference would load a renamed key
file with ``assign=True`` from a hard-coded file name only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..config import ConfigError, init_fields, read_json, require
from ..sampling.flow import sample_normal, sample_turbo
from ..sampling.schedules import normal_time_grid, turbo_time_grid
from ..weights import CheckpointError, materialize, resolve_checkpoint, resolve_device, resolve_dtype

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from PIL import Image

log = logging.getLogger(__name__)

SIGVQ_PATH = "image_tokenizer/sigvq_embedding.pt"
VAE_FOLDER = "vae"
MODE_FOLDERS = {"normal": "decoder", "turbo": "decoder-turbo"}
DEFAULT_STEPS = {"normal": 50, "turbo": 8}
NORMAL_SHIFT = 6.0  # the reference's time_shifting_factor
# Weight file names, first found wins: the official code opens model.safetensors, the model card
# says decoder_model.safetensors; a sharded "<name>.index.json" is accepted for each.
DIT_WEIGHTS = ("model.safetensors", "decoder_model.safetensors")
VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors",)
# The reference overrides the file's axes_lens: RoPE tables for caption positions up to 32767 and
# patch grids up to 1024 a side.
AXES_LENS = (32768, 1024, 1024)
# One semantic token covers this many pixels at the semantic resolution (the tokenizer's patch);
# the reference hard-codes it in th = h * 16 * resolution_multiplier.
TOKEN_PIXELS = 16
SEQ_MULTI_OF = 32  # diffusers' Z-Image pads each sequence to a multiple of this


# ---- config -------------------------------------------------------------------------------------


@dataclass
class DecoderConfig:
    """``decoder*/config.json``: ZImageTransformer2DModel's kwargs. Defaults are diffusers' (which the
    reference falls back to for an absent key); ``cap_feat_dim`` and ``axes_lens`` are overridden.

    The reference overrides ``cap_feat_dim`` with a hard-coded 4096; here it is the SigVQ width read
    from ``sigvq_embedding.pt`` (4096 on the real checkpoint), so the tiny checkpoint works the same
    way. ``_``-prefixed metadata and ``siglip_feat_dim`` (omni path, unused) are dropped; any other
    unknown key is an error, as in the reference (which passes the dict to the constructor) and SGLang.
    """

    all_patch_size: list[int] = field(default_factory=lambda: [2])
    all_f_patch_size: list[int] = field(default_factory=lambda: [1])
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 4096
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: list[int] = field(default_factory=lambda: [32, 48, 48])
    axes_lens: list[int] = field(default_factory=lambda: list(AXES_LENS))
    # derived: the pair the reference calls the model with
    patch_size: int = field(init=False)
    f_patch_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.all_patch_size, self.all_f_patch_size = list(self.all_patch_size), list(self.all_f_patch_size)
        self.axes_dims, self.axes_lens = list(self.axes_dims), list(self.axes_lens)
        checks = [
            (len(self.all_patch_size) == len(self.all_f_patch_size) >= 1,
             "all_patch_size and all_f_patch_size must be non-empty lists of one length"),
            (self.dim % self.n_heads == 0, f"dim {self.dim} is not a multiple of n_heads {self.n_heads}"),
            (self.n_kv_heads == self.n_heads,
             f"n_kv_heads {self.n_kv_heads} != n_heads {self.n_heads} (Z-Image attention has no GQA)"),
            (len(self.axes_dims) == len(self.axes_lens) == 3, "axes_dims and axes_lens need 3 entries (t, h, w)"),
            (sum(self.axes_dims) == self.dim // self.n_heads,
             f"axes_dims {self.axes_dims} must sum to head_dim {self.dim // max(self.n_heads, 1)}"),
        ]
        require(checks, "decoder config: ")
        self.patch_size, self.f_patch_size = self.all_patch_size[0], self.all_f_patch_size[0]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, cap_feat_dim: int) -> "DecoderConfig":
        names = init_fields(cls)
        unknown = sorted(k for k in raw if k not in names and not k.startswith("_") and k != "siglip_feat_dim")
        if unknown:
            raise ConfigError(f"unknown decoder config key(s): {', '.join(unknown)}")
        if raw.get("siglip_feat_dim") is not None:
            log.warning("decoder config: ignoring siglip_feat_dim=%s (the omni path is not used)",
                        raw["siglip_feat_dim"])
        kwargs = {k: v for k, v in raw.items() if k in names}
        kwargs.update(cap_feat_dim=cap_feat_dim, axes_lens=list(AXES_LENS))
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: Path, *, cap_feat_dim: int) -> "DecoderConfig":
        return cls.from_dict(_read_json(path), cap_feat_dim=cap_feat_dim)

    def model_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


# ---- SigVQ --------------------------------------------------------------------------------------


class _Proj(nn.Module):
    """diffusers' FeedForward keeps its first Linear under ``.proj`` (checkpoint key layout)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class _Projector(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(_Proj(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SigVQ(nn.Module):
    """Code ids -> conditioning features: W2 SiLU(W1 E[id] + b1) + b2 (spec 6)."""

    def __init__(self, vocab_size: int, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        self.vocab_size, self.dim = vocab_size, dim
        self.prior_token_embedding = nn.Embedding(vocab_size, dim)
        self.prior_projector = _Projector(dim, hidden or dim)

    def forward(self, ids: Tensor) -> Tensor:
        return self.prior_projector(self.prior_token_embedding(ids))  # [..., D]


def upsample_codes(codes: Tensor, h: int, w: int) -> Tensor:
    """Nearest x2 of an h x w row-major grid -> [4hw] row-major over 2h x 2w (the reference's
    F.interpolate(scale_factor=2, mode="nearest"): output (i, j) reads input (i // 2, j // 2))."""
    return codes.reshape(h, w).repeat_interleave(2, dim=0).repeat_interleave(2, dim=1).reshape(-1)


# ---- strict loading -----------------------------------------------------------------------------


def _folder(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"missing checkpoint folder {path}")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    """read_json, reported as a checkpoint problem (a decoder folder without a usable config)."""
    try:
        return read_json(path, "config file")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _few(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")


def weight_files(folder: Path, names: Sequence[str]) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the first of ``names`` present in ``folder`` (as a single
    file, or sharded with ``<name>.index.json``)."""
    from safetensors import safe_open

    folder = _folder(folder)
    for name in names:
        index = folder / f"{name}.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {k: folder / v for k, v in weight_map.items()}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"corrupt index {index}: {type(e).__name__}: {e}") from None
            absent = sorted({str(p) for p in files.values() if not p.exists()})
            if absent:
                raise CheckpointError(f"missing shard file(s) listed in {index}: {', '.join(absent)}")
            return files
        path = folder / name
        if path.exists():
            others = [n for n in names if n != name and (folder / n).exists()]
            if others:
                log.warning("%s: using %s, ignoring %s", folder, name, ", ".join(others))
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    return {k: path for k in f.keys()}
            except Exception as e:
                raise CheckpointError(f"cannot read safetensors file {path}: {type(e).__name__}: {e}") from None
    raise CheckpointError(f"no weights in {folder}: expected {' or '.join(names)} (or a sharded .index.json)")


def _check_plan(model: nn.Module, plan: dict[str, str], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Every model tensor has exactly one source of the right shape, and every source a target.
    Plans cover parameters; a persistent buffer (none in these models) would show up as stray."""
    missing = sorted(set(plan) - set(shapes))
    unexpected = sorted(set(shapes) - set(plan))
    if missing or unexpected:
        parts = [f"missing tensor(s): {_few(missing)}"] if missing else []
        parts += [f"unexpected tensor(s): {_few(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{where} does not match the model: " + "; ".join(parts))
    params = dict(model.named_parameters())
    stray = sorted(set(model.state_dict()) - set(plan.values()))
    if stray:
        raise CheckpointError(f"model tensors with no checkpoint source: {_few(stray)}")
    for name, target in plan.items():
        if tuple(shapes[name]) != tuple(params[target].shape):
            raise CheckpointError(f"tensor {name} in {where} has shape {list(shapes[name])}, "
                                  f"expected {list(params[target].shape)}")


def _fill(model: nn.Module, plan: dict[str, str], tensors: Callable[[], Any], device: torch.device,
          dtype: torch.dtype) -> None:
    """Materialise the meta model on ``device``/``dtype`` and copy each (name, tensor) in."""
    materialize(model, device, lambda _: dtype)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors():
            params[plan[name]].copy_(tensor)
    model.eval()


def load_safetensors_strict(model: nn.Module, folder: Path, names: Sequence[str], plan: dict[str, str], *,
                            device: torch.device, dtype: torch.dtype) -> None:
    """Fill a meta-built ``model`` from ``folder``; ``plan`` maps checkpoint names to parameter names.
    Names and shapes are all checked from the file headers before any memory is allocated."""
    from safetensors import safe_open

    from ..weights import check_float_dtypes, read_tensor

    files = weight_files(folder, names)
    shapes, dtypes = {}, {}
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in f.keys():
                if files.get(k) == path:
                    sl = f.get_slice(k)
                    shapes[k], dtypes[k] = tuple(sl.get_shape()), sl.get_dtype()
    _check_plan(model, plan, shapes, str(folder))
    check_float_dtypes(dtypes, str(folder))

    def tensors():
        for path in sorted(set(files.values())):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in f.keys():
                    if files.get(k) == path:
                        yield k, read_tensor(f, k, path)

    _fill(model, plan, tensors, device, dtype)


def load_sigvq(path: Path, *, device: torch.device, dtype: torch.dtype) -> SigVQ:
    """``sigvq_embedding.pt``: a plain torch.save state dict, read with weights_only=True (no code runs).
    Vocabulary, width and hidden size are read from the tensor shapes."""
    if not path.is_file():
        raise CheckpointError(f"missing SigVQ embedding file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load {path} with weights_only=True: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    for key in ("prior_token_embedding.weight", "prior_projector.net.0.proj.weight"):
        if key not in state or state[key].ndim != 2:
            raise CheckpointError(f"{path}: missing 2-D tensor {key}")
    vocab, dim = state["prior_token_embedding.weight"].shape
    with torch.device("meta"):
        model = SigVQ(vocab, dim, state["prior_projector.net.0.proj.weight"].shape[0])
    plan = {n: n for n, _ in model.named_parameters()}
    _check_plan(model, plan, {k: tuple(v.shape) for k, v in state.items()}, str(path))
    _fill(model, plan, lambda: state.items(), device, dtype)
    return model


def dit_plan(model: nn.Module) -> dict[str, str]:
    """Checkpoint name -> diffusers parameter name: the checkpoint says ``semantic_embedder`` where
    diffusers says ``cap_embedder`` (spec 2.2); every other name is diffusers'."""
    plan = {}
    for name, _ in model.named_parameters():
        ckpt = "semantic_embedder." + name.removeprefix("cap_embedder.") if name.startswith("cap_embedder.") else name
        plan[ckpt] = name
    return plan


def load_dit(folder: str | Path, device: torch.device, dtype: torch.dtype, *,
             cap_feat_dim: int) -> "ZImageTransformer2DModel":
    """``decoder/`` or ``decoder-turbo/`` -> diffusers ZImageTransformer2DModel, strictly loaded."""
    from diffusers import ZImageTransformer2DModel

    folder = _folder(folder)
    config = DecoderConfig.from_file(folder / "config.json", cap_feat_dim=cap_feat_dim)
    with torch.device("meta"):
        model = ZImageTransformer2DModel(**config.model_kwargs())
    load_safetensors_strict(model, folder, DIT_WEIGHTS, dit_plan(model), device=device, dtype=dtype)
    return model


def load_vae(folder: str | Path, device: torch.device, dtype: torch.dtype) -> "AutoencoderKL":
    """``vae/`` -> diffusers AutoencoderKL (config from the file; weights strict, names as diffusers')."""
    from diffusers import AutoencoderKL

    folder = _folder(folder)
    raw = _read_json(folder / "config.json")
    if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CheckpointError(f"{folder}/config.json describes a {raw['_class_name']}, not an AutoencoderKL")
    with torch.device("meta"):
        model = AutoencoderKL.from_config(raw)
    plan = {n: n for n, _ in model.named_parameters()}
    load_safetensors_strict(model, folder, VAE_WEIGHTS, plan, device=device, dtype=dtype)
    return model


def latents_to_image(vae: "AutoencoderKL", latents: Tensor) -> "Image.Image":
    """[1, C, Hl, Wl] -> RGB PIL image (spec 9): latent / scaling + shift in the VAE dtype, decode,
    (x + 1) / 2 clamped, then x 255 truncated to uint8 like torchvision's to_pil_image."""
    from PIL import Image

    shift = vae.config.shift_factor or 0.0
    s = latents.to(vae.dtype) / vae.config.scaling_factor + shift
    img = vae.decode(s, return_dict=False)[0]  # [1, 3, H, W], about [-1, 1]
    px = ((img + 1) / 2).clamp(0, 1).float()
    pixels = (px[0] * 255).to(torch.uint8).permute(1, 2, 0)  # float -> uint8 truncates
    return Image.fromarray(pixels.cpu().numpy())


# ---- the decoder --------------------------------------------------------------------------------


class ImageDecoder:
    """Codes -> PIL image. SigVQ and the VAE (small) load at construction; each DiT (12 GB in bf16)
    loads the first time its mode is used and is kept, unless keep_resident=False, which frees it
    after every decode (low memory: the reference reloads everything per call)."""

    def __init__(self, root: Path, sigvq: SigVQ, vae: "AutoencoderKL", *, device: torch.device,
                 dtype: torch.dtype, keep_resident: bool = True) -> None:
        self.root, self.sigvq, self.vae = root, sigvq, vae
        self.device, self.dtype, self.keep_resident = device, dtype, keep_resident
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._dits: dict[str, "ZImageTransformer2DModel"] = {}
        # Regional torch.compile of the repeated transformer blocks (set by runtime.accelerate):
        # about 1.45x faster at 1024 px on an H200 (benchmarks/RESULTS.md).
        self.compile_dit = False
        # Set by the pipeline: a ``memory.Memory`` (each DiT a group of its arena, loaded on the CPU
        # and brought in per decode) and the DiT's ``quant.QuantMode`` (None: full precision).
        self.memory = None
        self.quant = None

    @classmethod
    def from_pretrained(cls, checkpoint_root: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, keep_resident: bool = True) -> "ImageDecoder":
        root = resolve_checkpoint(checkpoint_root)
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        if not any((root / f).is_dir() for f in MODE_FOLDERS.values()):
            raise CheckpointError(f"{root} has neither {' nor '.join(f + '/' for f in MODE_FOLDERS.values())}")
        sigvq = load_sigvq(root / SIGVQ_PATH, device=device, dtype=dtype)
        vae = load_vae(root / VAE_FOLDER, device, dtype)
        return cls(root, sigvq, vae, device=device, dtype=dtype, keep_resident=keep_resident)

    @property
    def num_codes(self) -> int:
        return self.sigvq.vocab_size

    def dit(self, mode: str) -> "ZImageTransformer2DModel":
        """The DiT for ``mode``, loaded once and kept (until release())."""
        if mode not in MODE_FOLDERS:
            raise ValueError(f"unknown decode mode {mode!r} (use one of: {', '.join(MODE_FOLDERS)})")
        if mode not in self._dits:
            folder = self.root / MODE_FOLDERS[mode]
            if not folder.is_dir():
                hint = ' (use mode="normal" with the decoder/ weights)' if mode == "turbo" else ""
                raise CheckpointError(f"decode mode {mode!r} needs {folder}, which does not exist{hint}")
            staged = self.memory is not None or self.quant is not None
            cpu = torch.device("cpu")
            # quantized or placed in the arena: loaded on the CPU first, so the full-precision DiT
            # never sits on the device
            model = load_dit(folder, cpu if staged else self.device, self.dtype, cap_feat_dim=self.sigvq.dim)
            if self.quant is not None:
                from ..quant import quantize_dit
                quantize_dit(model, self.quant, device=self.device, dtype=self.dtype,
                             store=cpu if self.memory is not None else self.device)
            if self.memory is not None:  # from the CPU copy into the arena (``Memory.add``)
                self.memory.add(self.group(mode), model)
            if model.config.in_channels != self.vae.config.latent_channels:
                raise CheckpointError(f"{folder}: in_channels {model.config.in_channels} != the VAE's "
                                      f"latent_channels {self.vae.config.latent_channels}")
            if self.compile_dit:
                model.compile_repeated_blocks(fullgraph=True)
            self._dits[mode] = model
        return self._dits[mode]

    @staticmethod
    def group(mode: str) -> str:
        """The memory group of the DiT for ``mode``."""
        return f"dit-{mode}"

    def release(self) -> None:
        """Free the DiTs (SigVQ and the VAE, 0.4 GB, stay); they reload on the next decode. Under a
        memory budget they stay as groups (their pinned copies are what "reload" means there)."""
        if self.memory is not None:
            return
        self._dits.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def check_codes(self, codes: Sequence[int] | Tensor, h: int, w: int) -> Tensor:
        """Raw VQ codes of an h x w row-major grid -> LongTensor [h*w] on the device, validated."""
        try:
            ok = operator.index(h) > 0 and operator.index(w) > 0
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"grid size must be positive integers, got h={h!r}, w={w!r}")
        h, w = operator.index(h), operator.index(w)
        codes = torch.as_tensor(codes).reshape(-1)
        if codes.numel() != h * w:
            raise ValueError(f"{codes.numel()} codes for a {h}x{w} grid (needs h*w = {h * w})")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.num_codes:
            raise ValueError(f"code ids must lie in [0, {self.num_codes}) (raw VQ codes, without the LLM's "
                             f"image-token offset); got min {lo}, max {hi}")
        return codes.to(device=self.device, dtype=torch.long)

    @torch.no_grad()
    def conditioning(self, codes: Sequence[int] | Tensor, h: int, w: int) -> Tensor:
        """Codes of an h x w grid -> caption features [4hw, D] (nearest x2, then SigVQ)."""
        return self.sigvq(upsample_codes(self.check_codes(codes, h, w), h, w))

    def _velocity_fn(self, dit: "ZImageTransformer2DModel", caps: list[Tensor]):
        """The sampler's velocity_fn: row r of x is paired with caps[r]; basic-mode Z-Image call."""
        p, pf = dit.config.all_patch_size[0], dit.config.all_f_patch_size[0]

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            if x.shape[0] != len(caps):
                raise ValueError(f"{x.shape[0]} latent rows for {len(caps)} conditionings")
            out = dit(list(x.to(self.dtype).unbind(0)), t.float(), caps, patch_size=p, f_patch_size=pf,
                      return_dict=False)[0]
            return torch.stack([o.float() for o in out])  # [R, C, 1, Hl, Wl]

        return velocity

    def _check_positions(self, dit: "ZImageTransformer2DModel", h: int, w: int, rm: int) -> tuple[int, int]:
        """Latent size (Hl, Wl); errors instead of indexing past the RoPE tables (spec 7.2)."""
        th, tw = h * TOKEN_PIXELS * rm, w * TOKEN_PIXELS * rm
        hl, wl = th // self.vae_factor, tw // self.vae_factor
        p = dit.config.all_patch_size[0]
        if hl % p or wl % p:
            raise ValueError(f"latent {hl}x{wl} is not a multiple of the DiT patch {p}")
        cap_len = -(-4 * h * w // SEQ_MULTI_OF) * SEQ_MULTI_OF
        lens = dit.config.axes_lens
        if cap_len + 1 >= lens[0] or hl // p > lens[1] or wl // p > lens[2]:
            raise ValueError(f"a {h}x{w} grid at resolution_multiplier {rm} exceeds the decoder's position "
                             f"range (caption positions < {lens[0]}, patch grid <= {lens[1]}x{lens[2]})")
        return hl, wl

    @torch.no_grad()
    def decode(self, codes: Sequence[int] | Tensor, h: int, w: int, *, mode: str = "turbo",
               steps: int | None = None, resolution_multiplier: int = 2, seed: int | None = None,
               cfg_scale: float | None = None,
               progress: Callable[[int, int], None] | None = None) -> "Image.Image":
        """Codes of an h x w grid -> RGB image of (w, h) * 16 * resolution_multiplier pixels.

        mode "turbo" (decoder-turbo/, default 8 steps, no CFG) or "normal" (decoder/, default 50 grid
        points = 49 Euler steps, CFG 2p - n with the norm clamp; cfg_scale overrides its 1.0).
        seed: the noise and the turbo re-noise draws come from one torch.Generator on the device
        seeded with it (None: a random seed), so the global RNG is neither used nor disturbed. The
        reference draws from the global RNG; seeded with torch.manual_seed(seed) right before its
        decode, its stream is this one on CUDA. On CPU it differs: the reference builds SigVQ with a
        real random init between the seed and the noise draw (with that init's RNG use taken out,
        the tiny-checkpoint decodes are bit-identical, benchmarks/REFERENCE_CHECK.md).
        """
        if mode not in MODE_FOLDERS:
            raise ValueError(f"unknown decode mode {mode!r} (use one of: {', '.join(MODE_FOLDERS)})")
        steps = DEFAULT_STEPS[mode] if steps is None else steps
        if mode == "turbo" and cfg_scale:
            raise ValueError("the turbo decoder runs without CFG; use mode='normal' for cfg_scale")
        if not isinstance(resolution_multiplier, int) or resolution_multiplier < 1:
            raise ValueError(f"resolution_multiplier must be a positive integer, got {resolution_multiplier!r}")
        cap = self.conditioning(codes, h, w)  # [4hw, D]
        dit = self.dit(mode)
        # under a memory budget the DiT's group is resident for the whole sampling
        with self.memory.hold(self.group(mode)) if self.memory is not None else contextlib.nullcontext():
            try:
                hl, wl = self._check_positions(dit, h, w, resolution_multiplier)
                gen = torch.Generator(device=self.device)
                if seed is None:
                    gen.seed()
                else:
                    gen.manual_seed(seed)
                z = torch.randn([1, dit.config.in_channels, 1, hl, wl], generator=gen, device=self.device)
                if mode == "normal":
                    scale = 1.0 if cfg_scale is None else cfg_scale
                    # CFG rows: [conditioned, zero conditioning] (spec 6: the negative is all zeros)
                    caps = [cap, torch.zeros_like(cap)] if scale > 0 else [cap]
                    x = sample_normal(self._velocity_fn(dit, caps), z, normal_time_grid(steps, NORMAL_SHIFT),
                                      cfg_scale=scale, progress=progress)
                else:
                    x = sample_turbo(self._velocity_fn(dit, [cap]), z, turbo_time_grid(steps), gen, progress=progress)
            finally:
                del dit
                if not self.keep_resident:
                    self.release()
        return latents_to_image(self.vae, x.squeeze(2))

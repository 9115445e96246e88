"""SigLIP-VQ image tokenizer: pixels -> one VQ code per 16-px patch (spec image.md 2.1, 4, 5).

A 40-layer pre-LN ViT (1536 wide, learned 128x128 position table resampled per image by bilinear
``grid_sample``, full attention within each image, no final norm) followed by a 1x1 conv to 2048
channels and a cosine-nearest lookup in a 16384-entry codebook.

transformers' ``GlmImageVisionModel`` and ``GlmImageVQVAE`` compute exactly this, with the same
module names, so this file is a thin layer over them: config, a strict loader, packing a batch of
differently sized images into one forward, and the quantizer call. ``tests/test_image_tokenizer.py``
checks them against an independent plain-torch reading of the spec.

Precision: the reference runs everything in the model dtype (bf16), the codebook distance included
as ``(|z|^2 + |e|^2) - 2 z.e`` (spec 5). We keep that for parity of codes (the LLM was trained on
them); fp32 (``dtype=torch.float32``) is the exact-maths path and what the CPU tests use.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..config import ConfigError, from_known_keys, read_json, require
from ..preprocess import (
    DEFAULT_MAX_PIXELS,
    UNDERSTAND_FACTOR,
    ImageSource,
    PreprocessorConfig,
    edit_crop,
    load_image,
    to_patches,
    understand_resize,
)
from ..weights import CheckpointError, materialize, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
INDEX_NAME = "model.safetensors.index.json"
SUBFOLDER = "image_tokenizer"
# Checkpoint tensors are ``GlmImageModel`` attribute paths; only these two sub-models are loaded and
# every other tensor in the files is ignored, as the reference does (spec 2.1).
PREFIXES = ("model.visual.", "model.vqmodel.")

Mode = Literal["understand", "edit", "none"]


def _glm_image():
    """transformers' GLM-Image config and modeling modules, imported late: transformers takes
    seconds to import and only image input needs it."""
    try:
        from transformers.models.glm_image import configuration_glm_image, modeling_glm_image
    except ImportError as e:
        raise ImportError("the image tokenizer needs transformers with GLM-Image support (tested with "
                          f"5.17 and 5.24): pip install 'transformers>=5.17' ({e})") from None
    return configuration_glm_image, modeling_glm_image


def _pick(raw: dict[str, Any], section: str, cls) -> Any:
    """The sub-dict ``section`` if present, else the top level (the reference's fallback)."""
    sub = raw.get(section)
    source = sub if isinstance(sub, dict) else raw
    return from_known_keys(cls, source)


@dataclass
class VisionConfig:
    """``vision_config``; defaults are the LLaDA2.0-Uni values (spec 2.1, inferred from shapes)."""

    hidden_size: int = 1536
    intermediate_size: int = 6144
    num_heads: int = 16
    depth: int = 40
    patch_size: int = 16
    image_size: int = 2048  # position table side = image_size / patch_size = 128
    in_channels: int = 3
    hidden_act: str = "gelu"
    attention_bias: bool = True
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-6
    spatial_merge_size: int = 1
    table_side: int = field(init=False)

    def __post_init__(self) -> None:
        self.table_side = self.image_size // self.patch_size
        checks = [
            (self.hidden_size % self.num_heads == 0, "hidden_size must be a multiple of num_heads"),
            (self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size"),
            (self.in_channels == 3, f"in_channels {self.in_channels} is not supported (RGB only)"),
            # The reference maps "gelu" to exact (erf) GELU; other names have no known meaning here.
            (self.hidden_act == "gelu", f"hidden_act {self.hidden_act!r} is not supported"),
            # With 2 the reference's per-image split sizes do not sum to the token count (spec 2.1).
            (self.spatial_merge_size == 1,
             f"spatial_merge_size {self.spatial_merge_size} is not supported (must be 1)"),
        ]
        require(checks, "image tokenizer vision_config: ")


@dataclass
class VQConfig:
    """``vq_config`` (spec 2.1). ``beta`` is a training-loss weight, unused here."""

    num_embeddings: int = 16384
    embed_dim: int = 2048
    latent_channels: int = 1536
    beta: float = 0.25


@dataclass
class ImageTokenizerConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    vq: VQConfig = field(default_factory=VQConfig)

    def __post_init__(self) -> None:
        if self.vq.latent_channels != self.vision.hidden_size:
            raise ConfigError(f"vq_config.latent_channels {self.vq.latent_channels} must equal "
                              f"vision_config.hidden_size {self.vision.hidden_size}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ImageTokenizerConfig":
        return cls(vision=_pick(raw, "vision_config", VisionConfig), vq=_pick(raw, "vq_config", VQConfig))

    @classmethod
    def from_file(cls, path: str | Path) -> "ImageTokenizerConfig":
        return cls.from_dict(read_json(path, "image tokenizer config"))

    def hf_configs(self):
        """(GlmImageVisionConfig, GlmImageVQVAEConfig) for the transformers modules."""
        hf, _ = _glm_image()
        v, q = self.vision, self.vq
        vision = hf.GlmImageVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_heads=v.num_heads,
            depth=v.depth, patch_size=v.patch_size, image_size=v.image_size,
            in_channels=v.in_channels, hidden_act=v.hidden_act, attention_bias=v.attention_bias,
            attention_dropout=v.attention_dropout, layer_norm_eps=v.layer_norm_eps,
            spatial_merge_size=v.spatial_merge_size)
        # SDPA runs attention image by image over the packed sequence (the non-flash varlen path).
        vision._attn_implementation = "sdpa"
        vq = hf.GlmImageVQVAEConfig(num_embeddings=q.num_embeddings, embed_dim=q.embed_dim,
                                    latent_channels=q.latent_channels, in_channels=v.in_channels)
        return vision, vq


class ImageTokenizer(nn.Module):
    """``visual`` (ViT) + ``vqmodel`` (quant conv and codebook); parameter names are the checkpoint's
    without the leading ``model.``."""

    def __init__(self, config: ImageTokenizerConfig, preprocessor: PreprocessorConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.preprocessor = preprocessor or PreprocessorConfig(patch_size=config.vision.patch_size)
        if self.preprocessor.patch_size != config.vision.patch_size:
            raise ConfigError(f"preprocessor patch_size {self.preprocessor.patch_size} differs from "
                              f"the vision patch_size {config.vision.patch_size}")
        _, hf = _glm_image()
        vision_cfg, vq_cfg = config.hf_configs()
        self.visual = hf.GlmImageVisionModel(vision_cfg)
        self.vqmodel = hf.GlmImageVQVAE(vq_cfg)

    @property
    def device(self) -> torch.device:
        return self.visual.patch_embed.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.patch_embed.proj.weight.dtype

    @property
    def codebook_size(self) -> int:
        return self.config.vq.num_embeddings

    # ---------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None) -> "ImageTokenizer":
        """Config, preprocessor config and weights from an ``image_tokenizer/`` folder (or a model
        root that holds one). Weights: every ``*.safetensors`` in the folder, or the shards named by
        ``model.safetensors.index.json``. Strict within ``model.visual.*`` / ``model.vqmodel.*``."""
        folder = Path(folder).expanduser()
        if (folder / SUBFOLDER / CONFIG_NAME).is_file():
            folder = folder / SUBFOLDER
        if not folder.is_dir():
            raise CheckpointError(f"no image tokenizer folder at {folder}")
        config = ImageTokenizerConfig.from_file(folder / CONFIG_NAME)
        preprocessor = PreprocessorConfig.from_file(folder / PREPROCESSOR_NAME)
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        with torch.device("meta"):
            model = cls(config, preprocessor)
        load_weights(model, folder, device=device, dtype=dtype)
        return model.eval()

    # ---------------------------------------------------------------------------------------------
    # Forward

    def features(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        """Packed patches [N, 3*p*p] of images with grids [B, 3] (t, h, w) -> features [N, hidden].

        Attention is per image (split by the grids), so the result of an image does not depend on
        what else is in the batch.
        """
        out = self.visual(pixel_values.to(self.device, self.dtype), grid_thw=grid_thw.to(self.device))
        return out.last_hidden_state

    def quantize(self, features: Tensor, grids: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Packed features [N, hidden] -> one LongTensor of codes [h*w] per image, raster order."""
        sizes = [h * w for h, w in grids]
        codes = []
        for feats, (h, w) in zip(torch.split(features, sizes), grids, strict=True):
            nchw = feats.view(1, h, w, -1).permute(0, 3, 1, 2)  # [1, hidden, h, w]
            codes.append(self.vqmodel.encode(nchw).image_tokens)
        return codes

    @torch.inference_mode()
    def encode(self, images: ImageSource | Sequence[ImageSource], mode: Mode = "understand", *,
               num_images: int | None = None, block_order: bool = False,
               resize_factor: int = UNDERSTAND_FACTOR,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[Tensor], list[tuple[int, int]]]:
        """Images (PIL, paths or encoded bytes, any sizes) -> (codes, grids).

        ``mode``: "understand" smart-resizes (budget for ``num_images``, default the number given),
        "edit" takes the aspect-matched centre crop, "none" expects sides that are multiples of the
        patch size already. Codes are CPU int64 tensors of h*w VQ indices in raster order, without
        the LLM's image-token offset; grids are (h, w) (t = 1 for images). All images go through one
        packed ViT forward; ``block_order=True`` selects the reference's merge_size block order
        (spec 3.4), off by default. ``max_pixels`` is the decoding guard of ``load_image``.
        """
        if isinstance(images, (list, tuple)):
            batch = list(images)
        else:
            batch = [images]
        if mode not in ("understand", "edit", "none"):
            raise ValueError(f"unknown mode {mode!r} (use 'understand', 'edit' or 'none')")
        if not batch:
            return [], []
        pils = [load_image(img, max_pixels=max_pixels) for img in batch]
        if mode == "understand":
            n = len(pils) if num_images is None else num_images
            pils = [understand_resize(img, n, factor=resize_factor) for img in pils]
        elif mode == "edit":
            pils = [edit_crop(img) for img in pils]
        rows, grids = [], []
        for img in pils:
            pv, (_, gh, gw) = to_patches(img, self.preprocessor, block_order=block_order)
            rows.append(pv)
            grids.append((gh, gw))
        grid_thw = torch.tensor([[1, h, w] for h, w in grids], dtype=torch.long)
        features = self.features(torch.cat(rows), grid_thw)
        codes = self.quantize(features, grids)
        return [c.to("cpu", torch.long) for c in codes], grids


# -------------------------------------------------------------------------------------------------
# Strict loading


def _tensor_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted({str(v) for v in weight_map.values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"corrupt index {index}: {type(e).__name__}: {e}") from None
        files = [folder / s for s in shards]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"missing shard file(s) listed in {index.name}: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors (or {INDEX_NAME}) in {folder}")
    return files


def _few(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")


def load_weights(model: ImageTokenizer, folder: Path, *, device: torch.device, dtype: torch.dtype) -> None:
    """Fill a meta-built ``model`` from ``folder``. Inside the two prefixes every expected tensor
    must be present once with its exact shape and nothing else may appear (the reference loads with
    ``strict=False``, so a renamed key there silently leaves random weights); tensors outside them
    are ignored, as the reference does, with a debug log."""
    from safetensors import safe_open

    expected = {"model." + name: tuple(p.shape) for name, p in model.named_parameters()}
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    ignored = 0
    for path in _tensor_files(folder):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {type(e).__name__}: {e}") from None
        for name, shape in shapes.items():
            if not name.startswith(PREFIXES):
                ignored += 1
            elif name in found:
                raise CheckpointError(f"tensor {name} appears in both {found[name][0].name} and {path.name}")
            else:
                found[name] = (path, shape)
    if ignored:
        log.debug("image tokenizer: ignored %d tensor(s) outside %s", ignored, " / ".join(PREFIXES))
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{name} has shape {list(found[name][1])}, expected {list(shape)}"
             for name, shape in sorted(expected.items()) if name in found and found[name][1] != shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensor(s): {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected tensor(s): {_few(unexpected)}")
        if wrong:
            parts.append(f"mis-shaped tensor(s): {_few(wrong)}")
        raise CheckpointError(f"image tokenizer checkpoint {folder} does not match the model: "
                              + "; ".join(parts))

    materialize(model, device, lambda name: dtype)
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for name, (path, _) in found.items():
        by_file.setdefault(path, []).append(name)
    with torch.no_grad():
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in names:
                    params[name.removeprefix("model.")].copy_(f.get_tensor(name))

"""Find a checkpoint (local folder or Hugging Face repo id) and stream its safetensors into a model.

Models are built on the meta device; each parameter is then allocated once on the target device in
its target dtype and filled tensor by tensor straight from the shards, so no second copy of the
model ever exists. Loading is strict: a missing, unexpected or mis-shaped tensor is an error that
names it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(RuntimeError):
    """The checkpoint cannot be found or does not match the model."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"unsupported device {device!r} (use cpu or cuda)")
    return dev


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "float32": torch.float32,
           "fp32": torch.float32, "float": torch.float32}


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.bfloat16) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype} (use bfloat16, float16 or float32)")
        return dtype
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use one of: {', '.join(sorted(_DTYPES))})")
    return _DTYPES[key]


def resolve_checkpoint(path_or_repo: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (or found in the cache)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; expected a checkpoint folder")
        return path
    name = str(path_or_repo)
    if not _REPO_ID.match(name):
        raise CheckpointError(f"no checkpoint folder at {path} (and {name!r} is not a Hub repo id)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"huggingface_hub is needed to fetch {name!r}: {e}") from None
    try:
        return Path(snapshot_download(name, revision=revision))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{name!r} is not in the local Hugging Face cache and cannot be downloaded (offline: "
            "no network, or HF_HUB_OFFLINE=1). Download it on a connected machine "
            f"(`hf download {name}`) or pass a local folder.") from None
    except Exception as e:  # network, auth, unknown repo: one clear message
        raise CheckpointError(f"could not fetch {name!r} from the Hugging Face Hub: "
                              f"{type(e).__name__}: {e}") from None


def shard_map(directory: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the index (or the single-file layout). Checks files exist."""
    index = directory / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"corrupt index {index}: {type(e).__name__}: {e}") from None
        files = {name: directory / shard for name, shard in weight_map.items()}
    elif (directory / SINGLE_NAME).exists():
        from safetensors import safe_open
        with _open(directory / SINGLE_NAME, safe_open) as f:
            files = {name: directory / SINGLE_NAME for name in f.keys()}
    else:
        raise CheckpointError(f"no {INDEX_NAME} or {SINGLE_NAME} in {directory}")
    missing = sorted({str(p) for p in files.values() if not p.exists()})
    if missing:
        raise CheckpointError(f"missing shard file(s) listed in {index.name}: {', '.join(missing)}")
    return files


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def check_float_dtypes(dtypes: dict[str, str], where: str) -> None:
    """Weights must be floating point: an int32 tensor where a weight belongs is a broken
    checkpoint, not something to cast silently."""
    bad = sorted(n for n, d in dtypes.items() if d not in FLOAT_DTYPES)
    if bad:
        raise CheckpointError(f"{where}: tensor {bad[0]} is {dtypes[bad[0]]}, not a floating-point type"
                              + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))


def read_tensor(f, name: str, path: Path):
    """``f.get_tensor(name)``, a CheckpointError naming the tensor and file when its data is unreadable
    (a truncated or corrupt shard: the header alone was fine)."""
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"cannot read tensor {name} from {path}: {type(e).__name__}: {e}") from None


def _open(path: Path, safe_open):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {type(e).__name__}: {e}") from None


def materialize(model: nn.Module, device: torch.device, dtype_of: Callable[[str], torch.dtype]) -> None:
    """Replace every meta parameter by an uninitialised tensor on ``device`` in its target dtype.
    Quantized parameters (8-bit weights, their fp32 ``*_scale``) keep the dtype they were built with."""
    for name, param in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        keep = param.element_size() == 1 or name.endswith("_scale")
        tensor = torch.empty(param.shape, dtype=param.dtype if keep else dtype_of(name), device=device)
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


def _by_shard(files: dict[str, Path]) -> dict[Path, list[str]]:
    """Tensor names grouped by the shard that holds them, in index order."""
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    return by_file


def tensor_meta(files: dict[str, Path]) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Safetensors dtype (e.g. "BF16", "F8_E4M3") and shape of every tensor, from the shard headers."""
    from safetensors import safe_open

    by_file = _by_shard(files)
    dtypes, shapes = {}, {}
    for path, names in by_file.items():
        with _open(path, safe_open) as f:
            present = set(f.keys())
            unlisted = sorted(n for n in present if n not in files)
            if unlisted:  # a shard that does not match its index: a mixed-up or half-updated checkpoint
                raise CheckpointError(f"{path.name} holds tensor(s) the index does not list: "
                                      f"{', '.join(unlisted[:5])}{' ...' if len(unlisted) > 5 else ''}")
            for name in names:
                if name not in present:
                    raise CheckpointError(f"tensor {name} is listed in the index for {path.name} but not in it")
                sl = f.get_slice(name)
                dtypes[name], shapes[name] = sl.get_dtype(), tuple(sl.get_shape())
    return dtypes, shapes


def load_checkpoint(model: nn.Module, directory: Path, plan: dict, *, device: torch.device,
                    dtype_of: Callable[[str], torch.dtype], optional: tuple[str, ...] = (),
                    quant_config: dict | None = None, quant_blocks: dict[str, tuple[int, int]] | None = None,
                    quant_device: torch.device | None = None) -> None:
    """Fill a meta-built ``model`` from the shards in ``directory``.

    ``plan`` maps checkpoint names to targets with ``param``, ``index`` and ``shape``. Names ending
    in one of ``optional`` may be absent (zero-filled, with a warning). FP8 weights (the layout found
    by ``quant.discover`` from ``quant_config`` and the tensors themselves) are dequantized into their
    targets' dtype; their scales are consumed. ``quant_blocks`` (8-bit parameter -> scale block, from
    ``quant.prepare_backbone``): those parameters are kept 8-bit, FP8 tensors of the same blocks copied
    as they are, anything else quantized on ``quant_device`` (default ``device``) as it streams.
    """
    from safetensors import safe_open

    from .quant import (FP8_DTYPES, IGNORED_SUFFIXES, QuantError, dequantize, discover, fit_block, quantize,
                        scale_index, scale_name)

    files_all = files = shard_map(directory)
    dtypes, shapes = tensor_meta(files)
    check_float_dtypes(dtypes, str(directory))
    try:
        layout = discover(quant_config, dtypes, shapes)
    except QuantError as e:
        raise CheckpointError(f"checkpoint {directory}: {e}") from None
    if layout is not None:
        log.info("FP8 checkpoint (%s scales%s)", layout.scheme,
                 f" {layout.block[0]}x{layout.block[1]}" if layout.block else "")
        scales = {layout.scale_name(n) for n, d in dtypes.items() if d in FP8_DTYPES}
        files = {n: p for n, p in files.items() if n not in scales and not n.endswith(IGNORED_SUFFIXES)}
    expected = set(plan)
    unexpected = sorted(set(files) - expected)
    missing = sorted(n for n in expected - set(files) if not n.endswith(optional))
    if unexpected or missing:
        def few(names: list[str]) -> str:
            return ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing tensor(s): {few(missing)}")
        if unexpected:
            parts.append(f"unexpected tensor(s): {few(unexpected)}")
        raise CheckpointError(f"checkpoint {directory} does not match the model: " + "; ".join(parts))

    params = dict(model.named_parameters())
    quant_blocks = quant_blocks or {}
    target_params = {t.param for t in plan.values()} | {scale_name(p) for p in quant_blocks}
    stray = sorted(set(params) - target_params)
    if stray:
        raise CheckpointError(f"model parameters with no checkpoint source: {', '.join(stray)}")

    materialize(model, device, dtype_of)
    params = dict(model.named_parameters())
    by_file = _by_shard(files)
    with torch.no_grad(), ExitStack() as stack:
        handles: dict[Path, object] = {}

        def shard(path: Path):  # each shard opened once (scales may sit in another shard)
            if path not in handles:
                handles[path] = stack.enter_context(_open(path, safe_open))
            return handles[path]
        for path, names in by_file.items():
            f = shard(path)
            for name in names:
                target = plan[name]
                shape = shapes[name]
                if shape != tuple(target.shape):
                    raise CheckpointError(f"tensor {name} in {path.name} has shape {list(shape)}, "
                                          f"expected {list(target.shape)}")
                dest = params[target.param]
                if target.index is not None:
                    dest = dest[target.index]
                tensor = read_tensor(f, name, path)
                scale = None
                if dtypes[name] in FP8_DTYPES:
                    sname = layout.scale_name(name)
                    scale = read_tensor(shard(files_all[sname]), sname, files_all[sname])
                if target.param in quant_blocks:
                    block = quant_blocks[target.param]
                    sdest = params[scale_name(target.param)]
                    sidx = scale_index(target.index, block)
                    sdest = sdest if sidx is None else sdest[sidx]
                    own = fit_block(shape, layout.block if layout and layout.scheme == "block" else None)
                    if scale is not None and tensor.dtype == dest.dtype and own == block and \
                            scale.numel() == sdest.numel() and layout.scheme != "tensor":
                        dest.copy_(tensor)  # the checkpoint's own FP8 blocks: kept as they are
                        sdest.copy_(scale.float().view(sdest.shape))
                        continue
                    full = tensor if scale is None else dequantize(tensor, scale, layout, torch.float32)
                    q, s = quantize(full.to(quant_device or device), dest.dtype, block)
                    dest.copy_(q)
                    sdest.copy_(s)
                    continue
                if scale is not None:
                    tensor = dequantize(tensor, scale, layout, dest.dtype)
                dest.copy_(tensor)
        for name in sorted(expected - set(files)):
            log.warning("%s not in the checkpoint: using zeros", name)
            target = plan[name]
            dest = params[target.param]
            (dest if target.index is None else dest[target.index]).zero_()


def backbone_quant(directory: Path, quant, device: torch.device):
    """The ``quant.QuantMode`` (or None) a backbone in ``directory`` loads with for ``quant``."""
    from .config import read_json
    from .quant import QuantError, discover, resolve_mode

    if hasattr(quant, "dtype"):
        return quant
    raw = read_json(directory / "config.json", "config file")
    try:
        layout = discover(raw.get("quantization_config"), *tensor_meta(shard_map(directory)))
    except QuantError as e:
        raise CheckpointError(f"checkpoint {directory}: {e}") from None
    return resolve_mode(quant, layout, device)


def load_backbone(directory: Path, *, device: torch.device, dtype: torch.dtype, quant=None,
                  quant_device: torch.device | None = None):
    """Config + strict weight load of the LLaDA2 MoE backbone from a checkpoint folder.

    ``quant`` (``quant.resolve_mode``: "auto", "none", "fp8", "fp8-channel", "int8"): how its linear
    weights are kept; "auto" (None) keeps an FP8 checkpoint FP8 and a bf16 one bf16. ``quant_device``:
    where bf16 weights are quantized as they stream (a backbone loaded on the CPU for a memory budget
    is quantized on the GPU, tensor by tensor); the mode is resolved for it too."""
    from .config import BackboneConfig, read_json
    from .models.backbone import OPTIONAL_SUFFIXES, LLaDA2MoeForLM, param_dtype, remap
    from .quant import finalize, prepare_backbone

    raw = read_json(directory / "config.json", "config file")
    config = BackboneConfig.from_dict(raw)
    mode = backbone_quant(directory, quant, quant_device or device)
    with torch.device("meta"):
        model = LLaDA2MoeForLM(config)
    blocks = prepare_backbone(model, mode) if mode is not None else None
    if mode is not None:
        log.info("backbone weights kept as %s (%s)", mode.name, "per channel" if mode.block is None
                 else f"{mode.block[0]}x{mode.block[1]} blocks")
    load_checkpoint(model, directory, remap(config), device=device,
                    dtype_of=lambda name: param_dtype(name, dtype), optional=OPTIONAL_SUFFIXES,
                    quant_config=raw.get("quantization_config"), quant_blocks=blocks, quant_device=quant_device)
    if mode is not None:
        finalize(model, dtype)
    model.quant = mode
    return model.eval()


def random_backbone(config, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                    seed: int = 0, quant=None):
    """A full-structure backbone with random weights built directly on ``device`` (no disk round trip).

    For benchmarks: ``random_backbone(BackboneConfig(), device="cuda")`` is the 16B model in ~32 GB.
    Weights are N(0, 1/fan_in), norms 1, small expert biases, so activations stay O(1) in bf16.
    ``quant`` ("fp8", "fp8-channel", "int8" or a ``quant.QuantMode``): then quantized in place, layer
    by layer (``quant.quantize_backbone``): the same weights as the bf16 model of the same seed.
    """
    from .models.backbone import LLaDA2MoeForLM, param_dtype
    from .quant import quantize_backbone, resolve_mode

    device = resolve_device(device)
    with torch.device("meta"):
        model = LLaDA2MoeForLM(config)
    materialize(model, device, lambda name: param_dtype(name, dtype))
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith("expert_bias"):
                p.normal_(0.0, 0.01, generator=gen)
            elif "word_embeddings" in name:
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
            if p.dtype != dtype and p.is_floating_point():
                # fp32-held parameters (the router) get values of ``dtype``, as a checkpoint saved in
                # it (the official one: bfloat16) gives them
                p.copy_(p.to(dtype).float())
    mode = quant if hasattr(quant, "dtype") else resolve_mode(quant or "none", None, device)
    if mode is not None:
        quantize_backbone(model, mode)
    model.quant = mode
    return model.eval()


make_random = random_backbone

"""Write tiny checkpoints in the official LLaDA2.0-Uni layout (tests and the offline demo).

The structure is the real one (dense layer 0, grouped-routing MoE layers with a shared expert, GQA,
QK-norm, partial rotary, untied head, sharded safetensors with an index, a tokenizer holding every
special-token string the prompts use); only the sizes are small and the weights seeded random.
The special ids deliberately differ from the real checkpoint's, so that a hard-coded id anywhere in
the package breaks the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import BackboneConfig

# Tiny special-token layout: (string, id). Text ids 0..255 are byte-level BPE symbols.
TINY_SPECIALS: dict[str, int] = {
    "<|endoftext|>": 256,
    "<|mask|>": 257,
    "<role>": 258,
    "</role>": 259,
    # "<uncondition>" is NOT an added token in the real tokenizer (it encodes to several text
    # tokens), so it is not one here either; 260 holds another real special token.
    "<think>": 260,
    "<|image|>": 261,
    "<|/image|>": 262,
    "<boi>": 263,
    "<|role_end|>": 264,
}
TINY_RESERVED_BASE = 265  # <|reserved_token_n|> = 265 + n
TINY_MAX_RESERVED = 64  # n in 0..63: grid sides up to 63 tokens
TINY_IMAGE_OFFSET = 336
TINY_IMAGE_CODES = 128


def tiny_config() -> BackboneConfig:
    return BackboneConfig(
        vocab_size=TINY_IMAGE_OFFSET + TINY_IMAGE_CODES,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rope_theta=600000.0,
        partial_rotary_factor=0.5,
        rope_parameters={"rope_type": "default", "rope_theta": 600000.0, "partial_rotary_factor": 0.5},
        pad_token_id=TINY_SPECIALS["<|endoftext|>"],
        eos_token_id=TINY_SPECIALS["<|endoftext|>"],
        mask_token_id=TINY_SPECIALS["<|mask|>"],
        num_experts=16,
        num_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        image_token_offset=TINY_IMAGE_OFFSET,
    )


def write_tiny_tokenizer(directory: str | Path) -> None:
    """A byte-level BPE tokenizer (no merges) plus every special-token string the prompts use."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    directory = Path(directory)
    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    specials = dict(TINY_SPECIALS)
    for n in range(TINY_MAX_RESERVED):
        specials[f"<|reserved_token_{n}|>"] = TINY_RESERVED_BASE + n
    assert len(vocab) == 256 and max(specials.values()) < TINY_IMAGE_OFFSET
    vocab.update(specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s, _ in sorted(specials.items(), key=lambda kv: kv[1])])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "mask_token": "<|mask|>",
        "add_bos_token": False,
        "add_eos_token": False,
    }, indent=2))


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
        # not all ones, so a norm applied to the wrong axis or skipped changes the output
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("expert_bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("mlp.gate.weight"):
        return 0.2 * torch.randn(shape, generator=gen)
    if "word_embeddings" in name:
        return torch.randn(shape, generator=gen)
    fan_in = shape[-1]
    return torch.randn(shape, generator=gen) / fan_in ** 0.5


def write_backbone_shards(directory: Path, config: BackboneConfig, seed: int, num_shards: int = 3,
                          fp8_block: tuple[int, int] | None = None) -> None:
    """Seeded random backbone weights as sharded safetensors with the official names and index.

    ``fp8_block`` (rows, cols): the linear weights of attention and the MLPs as block FP8 (e4m3) with
    a ``weight_scale_inv`` per block, DeepSeek-V3's layout (``quant.py``); the rest stays bf16. The
    same seed gives the same bf16 weights before quantization."""
    from safetensors.torch import save_file

    from .models.backbone import remap
    from .quant import quantizable, quantize_blockwise

    gen = torch.Generator().manual_seed(seed)
    tensors = {n: _random_tensor(n, t.shape, gen).to(torch.bfloat16) for n, t in remap(config).items()}
    if fp8_block is not None:
        for n in [n for n in tensors if quantizable(n)]:
            tensors[n], tensors[n.removesuffix("weight") + "weight_scale_inv"] = \
                quantize_blockwise(tensors[n], fp8_block)
    names = list(tensors)
    per_shard = -(-len(names) // num_shards)
    weight_map, total = {}, 0
    for s in range(num_shards):
        shard = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {n: tensors[n].contiguous() for n in names[s * per_shard:(s + 1) * per_shard]}
        save_file(chunk, str(directory / shard), metadata={"format": "pt"})
        for n, t in chunk.items():
            weight_map[n] = shard
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def boost_tokens(directory: str | Path, boosts: dict[str, float]) -> None:
    """Scale the output-head rows of some special tokens in a tiny checkpoint, in place.

    Random weights almost never write ``<|endoftext|>`` or ``<boi>``; a row scaled by a few times
    makes the token win wherever its logit is positive and large, so EOS stops and the thinking
    phase's ``<boi>`` happen within a short generation. Deterministic: parity cases rebuild it.
    """
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = directory / index["weight_map"]["lm_head.weight"]
    tensors = load_file(str(shard))
    head = tensors["lm_head.weight"].float()
    for name, factor in boosts.items():
        row = TINY_SPECIALS.get(name)
        if row is None:
            raise KeyError(f"{name!r} is not a tiny special token")
        head[row] *= factor
    tensors["lm_head.weight"] = head.to(torch.bfloat16).contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})


# A tiny checkpoint's own marker: ``overwrite`` replaces only folders that carry it.
TINY_MARKER = ".llada2uni-tiny"


def make_tiny(directory: str | Path, seed: int = 0, *, overwrite: bool = False,
              boosts: dict[str, float] | None = None, image_side: bool = True,
              fp8: bool | tuple[int, int] = False) -> Path:
    """Write a complete tiny checkpoint in the official layout to ``directory``; return its path.

    ``boosts`` scales the head rows of named special tokens (``boost_tokens``). ``image_side=False``
    writes the backbone and tokenizer only (no image tokenizer, decoders or VAE; no diffusers needed).
    ``fp8``: the backbone in the FP8 checkpoint's layout (block FP8, 128 x 128 blocks, or the given
    (rows, cols)), with its ``quantization_config``.

    Written into a temporary sibling folder first and renamed at the end, so an interrupted run
    never leaves a half-written checkpoint behind. ``overwrite`` replaces an earlier tiny checkpoint
    (one carrying ``TINY_MARKER``), never a folder holding anything else.
    """
    import shutil
    import tempfile

    directory = Path(directory).expanduser().resolve()
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is a file, not a folder")
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{directory} exists and is not empty (pass overwrite=True / --overwrite)")
        if not (directory / TINY_MARKER).is_file():  # replace only what this function wrote
            held = sorted(p.name for p in directory.iterdir())
            raise FileExistsError(f"{directory} is not a tiny checkpoint written by llada2uni (it holds "
                                  f"{', '.join(held[:5])}{', ...' if len(held) > 5 else ''}): not replacing it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        config = tiny_config()
        raw = config.to_dict()
        block = None if fp8 is False else (128, 128) if fp8 is True else tuple(fp8)
        if block is not None:  # as DeepSeek-V3 writes it (the official FP8 checkpoint's is not public)
            raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": list(block)}
        (tmp / "config.json").write_text(json.dumps(raw, indent=2))
        (tmp / TINY_MARKER).write_text("written by llada2uni.tiny.make_tiny; --overwrite replaces this folder\n")
        write_backbone_shards(tmp, config, seed, fp8_block=block)
        write_tiny_tokenizer(tmp)
        if image_side:
            (tmp / "image_tokenizer").mkdir()
            write_tiny_image_tokenizer(tmp / "image_tokenizer", seed, TINY_IMAGE_CODES)
            write_tiny_decoder_side(tmp, seed, TINY_IMAGE_CODES)
        if boosts:
            boost_tokens(tmp, boosts)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def write_tiny_image_tokenizer(folder: Path, seed: int, num_codes: int) -> None:
    """A tiny SigLIP-VQ image tokenizer in the official ``image_tokenizer/`` layout.

    ``config.json`` (vision_config + vq_config), ``preprocessor_config.json`` (the published values,
    patch 16) and ``model.safetensors`` in bf16 with the official tensor names (spec image.md 2.1),
    written out here from the spec rather than taken from a module, so that the loader's strict
    name check is a real test. Position table 16x16; ``post_quant_conv`` is written though unused.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hidden, depth, inter, patch, side, embed = 32, 2, 64, 16, 16, 16
    vision = {"hidden_size": hidden, "intermediate_size": inter, "num_heads": 2, "depth": depth,
              "patch_size": patch, "image_size": patch * side, "in_channels": 3,
              "hidden_act": "gelu", "attention_bias": True, "attention_dropout": 0.0,
              "layer_norm_eps": 1e-6, "spatial_merge_size": 1}
    vq = {"num_embeddings": num_codes, "embed_dim": embed, "latent_channels": hidden, "beta": 0.25}
    (folder / "config.json").write_text(json.dumps({"vision_config": vision, "vq_config": vq}, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "patch_size": patch, "temporal_patch_size": 1, "merge_size": 1,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "rescale_factor": 1 / 255, "do_rescale": True, "do_normalize": True,
        "image_processor_type": "Qwen2VLImageProcessor"}, indent=2))

    shapes = {"model.visual.patch_embed.proj.weight": (hidden, 3, patch, patch),
              "model.visual.patch_embed.proj.bias": (hidden,),
              "model.visual.embeddings.position_embedding.weight": (side * side, hidden)}
    for i in range(depth):
        p = f"model.visual.blocks.{i}."
        shapes.update({p + "norm1.weight": (hidden,), p + "norm1.bias": (hidden,),
                       p + "norm2.weight": (hidden,), p + "norm2.bias": (hidden,),
                       p + "attn.qkv.weight": (3 * hidden, hidden), p + "attn.qkv.bias": (3 * hidden,),
                       p + "attn.proj.weight": (hidden, hidden), p + "attn.proj.bias": (hidden,),
                       p + "mlp.fc1.weight": (inter, hidden), p + "mlp.fc1.bias": (inter,),
                       p + "mlp.fc2.weight": (hidden, inter), p + "mlp.fc2.bias": (hidden,)})
    shapes.update({"model.vqmodel.quantize.embedding.weight": (num_codes, embed),
                   "model.vqmodel.quant_conv.weight": (embed, hidden, 1, 1),
                   "model.vqmodel.quant_conv.bias": (embed,),
                   "model.vqmodel.post_quant_conv.weight": (hidden, embed, 1, 1),
                   "model.vqmodel.post_quant_conv.bias": (hidden,)})

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if ".norm" in name and name.endswith(".weight"):
            value = 1.0 + 0.1 * noise  # not all ones: a skipped or misplaced norm shows
        elif name.endswith(".bias"):
            value = 0.1 * noise
        elif "position_embedding" in name or "quantize.embedding" in name:
            value = noise  # strong positions, so a wrong position order changes the codes
        else:
            value = noise / (noise[0].numel() ** 0.5)  # fan-in scaling keeps activations O(1)
        tensors[name] = value.to(torch.bfloat16).contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_tiny_decoder_side(root: Path, seed: int, num_codes: int, *, sigvq_dim: int = 32) -> None:
    """The decoder side in the official layout, tiny and seeded (image spec 2.1-2.3).

    ``image_tokenizer/sigvq_embedding.pt`` (a torch.save state dict, vocab ``num_codes``), ``decoder/``
    and ``decoder-turbo/`` (Z-Image DiT config + bf16 weights with the official ``semantic_embedder.*``
    names; decoder/ as model.safetensors, decoder-turbo/ as decoder_model.safetensors, so both names
    the sources give are exercised) and ``vae/`` (a FLUX-geometry AutoencoderKL: 16 latent channels,
    4 blocks = x8, tiny widths). The DiT configs keep Z-Image's stale cap_feat_dim 2560 and axes_lens,
    which the loader must override (with the SigVQ width and [32768, 1024, 1024]).
    """
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from safetensors.torch import save_file

    root = Path(root)
    gen = torch.Generator().manual_seed(seed)

    def fill(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        out = {}
        for name, shape in shapes.items():
            noise = torch.randn(shape, generator=gen)
            if "norm" in name and name.endswith(".weight") and len(shape) == 1:
                value = 1.0 + 0.1 * noise  # not all ones: a skipped or misplaced norm shows
            elif name.endswith(".bias") or "pad_token" in name:
                value = 0.1 * noise
            elif "token_embedding" in name:
                value = noise
            else:
                value = noise / (noise[0].numel() ** 0.5)  # fan-in scaling keeps activations O(1)
            out[name] = value.to(torch.bfloat16).contiguous()
        return out

    (root / "image_tokenizer").mkdir(parents=True, exist_ok=True)
    sigvq = fill({"prior_token_embedding.weight": (num_codes, sigvq_dim),
                  "prior_projector.net.0.proj.weight": (sigvq_dim, sigvq_dim),
                  "prior_projector.net.0.proj.bias": (sigvq_dim,),
                  "prior_projector.net.2.weight": (sigvq_dim, sigvq_dim),
                  "prior_projector.net.2.bias": (sigvq_dim,)})
    torch.save(sigvq, root / "image_tokenizer" / "sigvq_embedding.pt")

    dit_config = {"_class_name": "ZImageTransformer2DModel", "_diffusers_version": "0.36.0",
                  "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 64,
                  "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "norm_eps": 1e-5,
                  "qk_norm": True, "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0,
                  "axes_dims": [8, 12, 12], "axes_lens": [1536, 512, 512]}
    kwargs = {k: v for k, v in dit_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        dit = ZImageTransformer2DModel(**{**kwargs, "cap_feat_dim": sigvq_dim})
    shapes = {name.replace("cap_embedder.", "semantic_embedder.", 1): tuple(t.shape)
              for name, t in dit.state_dict().items()}
    for folder, file in (("decoder", "model.safetensors"), ("decoder-turbo", "decoder_model.safetensors")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "config.json").write_text(json.dumps(dit_config, indent=2))
        save_file(fill(shapes), str(root / folder / file), metadata={"format": "pt"})

    vae_config = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.36.0", "in_channels": 3,
                  "out_channels": 3, "latent_channels": 16, "block_out_channels": [8, 16, 16, 16],
                  "layers_per_block": 1, "down_block_types": ["DownEncoderBlock2D"] * 4,
                  "up_block_types": ["UpDecoderBlock2D"] * 4, "act_fn": "silu", "norm_num_groups": 4,
                  "mid_block_add_attention": True, "use_quant_conv": False, "use_post_quant_conv": False,
                  "scaling_factor": 0.3611, "shift_factor": 0.1159, "force_upcast": True, "sample_size": 128}
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config)
    (root / "vae").mkdir(parents=True, exist_ok=True)
    (root / "vae" / "config.json").write_text(json.dumps(vae_config, indent=2))
    save_file(fill({n: tuple(t.shape) for n, t in vae.state_dict().items()}),
              str(root / "vae" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})

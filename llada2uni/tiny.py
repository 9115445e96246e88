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
    "<uncondition>": 260,
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


def write_backbone_shards(directory: Path, config: BackboneConfig, seed: int, num_shards: int = 3) -> None:
    """Seeded random backbone weights as sharded safetensors with the official names and index."""
    from safetensors.torch import save_file

    from .models.backbone import remap

    gen = torch.Generator().manual_seed(seed)
    names = list(remap(config))
    tensors = {n: _random_tensor(n, t.shape, gen).to(torch.bfloat16) for n, t in remap(config).items()}
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


def make_tiny(directory: str | Path, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write a complete tiny checkpoint in the official layout to ``directory``; return its path.

    Written into a temporary sibling folder first and renamed at the end, so an interrupted run
    never leaves a half-written checkpoint behind.
    """
    import shutil
    import tempfile

    directory = Path(directory).expanduser().resolve()
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty (pass overwrite=True / --overwrite)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        config = tiny_config()
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        write_backbone_shards(tmp, config, seed)
        write_tiny_tokenizer(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from llada2uni.config import ConfigError
from llada2uni.models.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from llada2uni.preprocess import ImageInputError, PreprocessorConfig, to_patches
from llada2uni.tiny import TINY_IMAGE_CODES, write_tiny_image_tokenizer
from llada2uni.weights import CheckpointError


def noise_image(w, h, seed=0):
    """Smooth random image: neighbouring patches differ but not wildly, as in a photo."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("itok") / "image_tokenizer"
    write_tiny_image_tokenizer(folder, seed=0, num_codes=TINY_IMAGE_CODES)
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir):
    return ImageTokenizer.from_pretrained(tok_dir, "cpu", torch.float32)


# --------------------------------------------------------------------------------------------------
# An independent reading of spec image.md 4-5 in plain float64 torch (no transformers).


def reference_encode(sd, cfg, pixel_values, gh, gw):
    """One image: pixel rows [gh*gw, 3*p*p] -> (features [N, D], pre-quant z [N, E], codes [N])."""
    v, q = cfg["vision_config"], cfg["vq_config"]
    p, d, heads = v["patch_size"], v["hidden_size"], v["num_heads"]
    sd = {k: t.double() for k, t in sd.items()}
    n = gh * gw
    # patch embed: a p x p conv with stride p over one p x p patch is a dot product
    w = sd["model.visual.patch_embed.proj.weight"].reshape(d, -1)
    x = pixel_values.double() @ w.T + sd["model.visual.patch_embed.proj.bias"]
    # position table S x S sampled bilinearly at patch centres; align_corners=False maps the
    # centre of patch r of gh to table coordinate (r + 0.5) * S / gh - 0.5; border clamps.
    side = v["image_size"] // p
    table = sd["model.visual.embeddings.position_embedding.weight"].view(side, side, d)
    rows = torch.arange(n) // gw
    cols = torch.arange(n) % gw

    def coord(i, count):
        f = ((i.double() + 0.5) * side / count - 0.5).clamp(0, side - 1)
        i0 = f.floor().long()
        return i0, (i0 + 1).clamp(max=side - 1), f - i0

    y0, y1, wy = coord(rows, gh)
    x0, x1, wx = coord(cols, gw)
    wy, wx = wy[:, None], wx[:, None]
    pos = ((1 - wy) * (1 - wx) * table[y0, x0] + (1 - wy) * wx * table[y0, x1]
           + wy * (1 - wx) * table[y1, x0] + wy * wx * table[y1, x1])
    x = x + pos

    def layer_norm(t, pre):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + v["layer_norm_eps"]) * sd[pre + ".weight"] + sd[pre + ".bias"]

    def linear(t, pre):
        return t @ sd[pre + ".weight"].T + sd[pre + ".bias"]

    hd = d // heads
    for i in range(v["depth"]):
        b = f"model.visual.blocks.{i}."
        qkv = linear(layer_norm(x, b + "norm1"), b + "attn.qkv").view(n, 3, heads, hd)
        qh, kh, vh = (qkv[:, j].transpose(0, 1) for j in range(3))  # [H, N, hd]
        att = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(hd), dim=-1) @ vh
        x = x + linear(att.transpose(0, 1).reshape(n, d), b + "attn.proj")
        h = linear(layer_norm(x, b + "norm2"), b + "mlp.fc1")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        x = x + linear(h, b + "mlp.fc2")
    # no final norm; 1x1 quant conv = per-token linear; cosine-nearest code
    wq = sd["model.vqmodel.quant_conv.weight"].reshape(q["embed_dim"], d)
    z = x @ wq.T + sd["model.vqmodel.quant_conv.bias"]
    book = sd["model.vqmodel.quantize.embedding.weight"]
    cos = (z / z.norm(dim=-1, keepdim=True)) @ (book / book.norm(dim=-1, keepdim=True)).T
    return x, z, cos.argmax(-1)


def test_matches_independent_reading(tok, tok_dir):
    sd = load_file(str(tok_dir / "model.safetensors"))
    cfg = json.loads((tok_dir / "config.json").read_text())
    worst_feat = worst_z = 0.0
    for w, h in [(16, 16), (48, 80), (96, 64), (256, 256), (400, 112)]:  # grids incl. > table side
        img = noise_image(w, h, seed=w + h)
        pv, (_, gh, gw) = to_patches(img, tok.preprocessor)
        grid_thw = torch.tensor([[1, gh, gw]])
        with torch.no_grad():
            feats = tok.features(pv, grid_thw)
            z = tok.vqmodel.quant_conv(feats.view(1, gh, gw, -1).permute(0, 3, 1, 2))
        z = z.permute(0, 2, 3, 1).reshape(gh * gw, -1)
        ref_feats, ref_z, ref_codes = reference_encode(sd, cfg, pv, gh, gw)
        worst_feat = max(worst_feat, (feats.double() - ref_feats).abs().max().item())
        worst_z = max(worst_z, (z.double() - ref_z).abs().max().item())
        (codes,), _ = tok.encode(img, mode="none")
        assert torch.equal(codes, ref_codes), (w, h)
    print(f"fp32 vs float64 reading: features max|diff| {worst_feat:.2e}, z max|diff| {worst_z:.2e}")
    assert worst_feat < 1e-4 and worst_z < 1e-4


def test_bf16_path_close_to_reading(tok_dir):
    tok16 = ImageTokenizer.from_pretrained(tok_dir, "cpu", torch.bfloat16)
    assert tok16.dtype == torch.bfloat16
    sd = load_file(str(tok_dir / "model.safetensors"))
    cfg = json.loads((tok_dir / "config.json").read_text())
    img = noise_image(128, 96, seed=5)
    pv, (_, gh, gw) = to_patches(img, tok16.preprocessor)
    (codes,), _ = tok16.encode(img, mode="none")
    _, _, ref_codes = reference_encode(sd, cfg, pv, gh, gw)
    assert codes.dtype == torch.long
    assert (codes == ref_codes).float().mean() > 0.8  # bf16 flips only near-tie codes


# --------------------------------------------------------------------------------------------------
# Shapes, order, determinism, batching


def test_shapes_and_range(tok):
    codes, grids = tok.encode([noise_image(64, 48), noise_image(32, 32)], mode="none")
    assert grids == [(3, 4), (2, 2)]
    assert [c.shape for c in codes] == [(12,), (4,)]
    assert all(c.dtype == torch.long and c.device.type == "cpu" for c in codes)
    assert all(int(c.min()) >= 0 and int(c.max()) < TINY_IMAGE_CODES for c in codes)
    assert tok.codebook_size == TINY_IMAGE_CODES
    assert tok.encode([], mode="none") == ([], [])


def test_raster_order(tok_dir):
    """With identity blocks and no position table, each code depends only on its own patch:
    the code at k must be the code of patch (k // w, k % w) encoded alone."""
    tok = ImageTokenizer.from_pretrained(tok_dir, "cpu", torch.float32)
    with torch.no_grad():
        tok.visual.embeddings.position_embedding.weight.zero_()
        for block in tok.visual.blocks:
            for lin in (block.attn.proj, block.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (3 * 16, 5 * 16, 3), dtype=np.uint8)
    (codes,), (grid,) = tok.encode(Image.fromarray(pixels), mode="none")
    assert grid == (3, 5)
    singles = []
    for r in range(3):
        for c in range(5):
            patch = Image.fromarray(pixels[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16].copy())
            singles.append(int(tok.encode(patch, mode="none")[0][0][0]))
    assert codes.tolist() == singles
    assert len(set(singles)) > 5  # the check can tell orders apart


def test_positions_matter(tok):
    """The transposed image does not give the transposed codes: positions are not ignored."""
    img = noise_image(64, 32, seed=2)
    (codes,), (grid,) = tok.encode(img, mode="none")
    (codes_t,), (grid_t,) = tok.encode(img.transpose(Image.Transpose.TRANSPOSE), mode="none")
    assert grid == (2, 4) and grid_t == (4, 2)
    assert not torch.equal(codes.view(2, 4).T.reshape(-1), codes_t)


def test_deterministic(tok, tok_dir):
    img = noise_image(96, 64, seed=4)
    first = tok.encode(img, mode="none")[0][0]
    assert torch.equal(first, tok.encode(img, mode="none")[0][0])
    again = ImageTokenizer.from_pretrained(tok_dir, "cpu", torch.float32)
    assert torch.equal(first, again.encode(img, mode="none")[0][0])


def test_batch_equals_single(tok):
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate([(64, 48), (256, 16), (160, 160),
                                                                      (16, 16), (48, 208)])]
    codes, grids = tok.encode(images, mode="none")
    for img, c, g in zip(images, codes, grids, strict=True):
        (single,), (g1,) = tok.encode(img, mode="none")
        assert g == g1 and torch.equal(c, single)
    pvs = [to_patches(img, tok.preprocessor)[0] for img in images]
    grid_thw = torch.tensor([[1, h, w] for h, w in grids])
    with torch.no_grad():
        packed = tok.features(torch.cat(pvs), grid_thw)
        alone = torch.cat([tok.features(pv, grid_thw[i:i + 1]) for i, pv in enumerate(pvs)])
    assert torch.allclose(packed, alone, atol=1e-5, rtol=0)


def test_sources_and_modes_agree(tok, tmp_path):
    img = noise_image(64, 32, seed=6)
    path = tmp_path / "x.png"
    img.save(path)
    ref = tok.encode(img, mode="none")[0][0]
    assert torch.equal(tok.encode(path, mode="none")[0][0], ref)
    assert torch.equal(tok.encode(path.read_bytes(), mode="none")[0][0], ref)
    rgba = img.convert("RGBA")
    assert torch.equal(tok.encode(rgba, mode="none")[0][0], ref)


# --------------------------------------------------------------------------------------------------
# Grid math through encode


@pytest.mark.parametrize("size, mode, grid", [
    ((800, 800), "understand", (50, 50)),  # spec 3.1
    ((1600, 400), "understand", (24, 100)),  # round(12.5) = 12 -> 384 px
    ((1000, 112), "understand", (8, 70)),  # reference crop keeps 1120 px, not 992
    ((37, 53), "understand", (10, 8)),  # upscaled into the 128^2 minimum: 128x160 px
    ((4000, 3000), "understand", (42, 56)),
    ((512, 512), "edit", (32, 32)),  # spec 3.3
    ((1024, 256), "edit", (16, 64)),
    ((672, 384), "edit", (24, 42)),
    ((4000, 3000), "edit", (28, 36)),  # 576x448 window from the centre
    ((100, 3000), "edit", (64, 16)),  # beyond 4:1: the 256x1024 candidate
    ((32, 64), "none", (4, 2)),
])
def test_grid_math(tok, size, mode, grid):
    (codes,), (g,) = tok.encode(Image.new("RGB", size, (90, 140, 200)), mode=mode)
    assert g == grid and codes.numel() == grid[0] * grid[1]


def test_understand_budget_follows_image_count(tok):
    img = Image.new("RGB", (800, 800), (1, 2, 3))
    assert tok.encode(img, mode="understand")[1] == [(50, 50)]
    assert tok.encode([img, img], mode="understand")[1] == [(26, 26)] * 2  # 448^2 budget
    assert tok.encode(img, mode="understand", num_images=3)[1] == [(26, 26)]
    assert tok.encode(img, mode="understand", resize_factor=16)[1] == [(50, 50)]


# --------------------------------------------------------------------------------------------------
# Bad input through encode


def test_encode_bad_input(tok):
    with pytest.raises(ImageInputError, match="multiple of 16"):
        tok.encode(Image.new("RGB", (100, 100)), mode="none")
    with pytest.raises(ImageInputError, match="not an image"):
        tok.encode(b"GIF89a but not really", mode="understand")
    with pytest.raises(ImageInputError, match="no pixels"):
        tok.encode(Image.new("RGB", (0, 4)), mode="understand")
    with pytest.raises(ImageInputError, match="aspect ratio"):
        tok.encode(Image.new("RGB", (5000, 2)), mode="understand")
    with pytest.raises(ValueError, match="unknown mode"):
        tok.encode(Image.new("RGB", (32, 32)), mode="resize")
    with pytest.raises(ImageInputError, match="decompression-bomb guard"):
        tok.encode(Image.new("RGB", (64, 64)), mode="none", max_pixels=1000)
    (codes,), (grid,) = tok.encode(Image.new("RGB", (1, 1)), mode="understand")
    assert grid == (8, 8)


def test_block_order_switch(tok_dir):
    tok = ImageTokenizer.from_pretrained(tok_dir, "cpu", torch.float32)
    tok.preprocessor = PreprocessorConfig(merge_size=2)  # as if the file said merge_size=2
    img = noise_image(64, 64, seed=8)
    raster = tok.encode(img, mode="none")
    assert torch.equal(raster[0][0], tok.encode(img, mode="none", block_order=False)[0][0])
    block = tok.encode(img, mode="none", block_order=True)
    assert block[1] == raster[1] == [(4, 4)]
    assert not torch.equal(block[0][0], raster[0][0])  # the reference's misplaced-position order


# --------------------------------------------------------------------------------------------------
# Config and loader strictness


def rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_renamed_key_fails_loudly(tok_dir, tmp_path):
    old, new = "model.visual.blocks.1.attn.qkv.weight", "model.visual.blocks.1.attn.qkv_proj.weight"
    folder = rewrite(tok_dir, tmp_path / "t", lambda t: t.__setitem__(new, t.pop(old)))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): " + old.replace(".", r"\.")) as e:
        ImageTokenizer.from_pretrained(folder, "cpu", torch.float32)
    assert new in str(e.value)


def test_wrong_prefix_fails_loudly(tok_dir, tmp_path):
    # The reference loader would load nothing here and run on random weights.
    folder = rewrite(tok_dir, tmp_path / "t", lambda t: [t.__setitem__(k[len("model."):], t.pop(k))
                                                         for k in list(t)])
    with pytest.raises(CheckpointError, match="missing tensor"):
        ImageTokenizer.from_pretrained(folder, "cpu", torch.float32)


def test_missing_key(tok_dir, tmp_path):
    folder = rewrite(tok_dir, tmp_path / "t", lambda t: t.pop("model.vqmodel.quant_conv.bias"))
    with pytest.raises(CheckpointError, match=r"model\.vqmodel\.quant_conv\.bias"):
        ImageTokenizer.from_pretrained(folder, "cpu", torch.float32)


def test_wrong_shape(tok_dir, tmp_path):
    name = "model.vqmodel.quantize.embedding.weight"
    folder = rewrite(tok_dir, tmp_path / "t", lambda t: t.__setitem__(name, t[name][:-1].clone()))
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')} has shape \[127, 16\], "
                                              r"expected \[128, 16\]"):
        ImageTokenizer.from_pretrained(folder, "cpu", torch.float32)


def test_unexpected_key_inside_prefix(tok_dir, tmp_path):
    name = "model.visual.post_layernorm.weight"
    folder = rewrite(tok_dir, tmp_path / "t", lambda t: t.__setitem__(name, torch.ones(32)))
    with pytest.raises(CheckpointError, match=rf"unexpected tensor\(s\): {name.replace('.', '[.]')}"):
        ImageTokenizer.from_pretrained(folder, "cpu", torch.float32)


def test_keys_outside_prefixes_are_ignored(tok, tok_dir, tmp_path):
    folder = rewrite(tok_dir, tmp_path / "t", lambda t: t.__setitem__("lm_head.weight", torch.ones(2)))
    other = ImageTokenizer.from_pretrained(folder, "cpu", torch.float32)
    img = noise_image(32, 48)
    assert torch.equal(other.encode(img, mode="none")[0][0], tok.encode(img, mode="none")[0][0])


def test_sharded_index_any_file_name_and_root_folder(tok, tok_dir, tmp_path):
    img = noise_image(48, 32)
    expected = tok.encode(img, mode="none")[0][0]
    # one file under another name (the root README's image_tokenizer.safetensors): globbed
    renamed = tmp_path / "renamed"
    shutil.copytree(tok_dir, renamed)
    (renamed / "model.safetensors").rename(renamed / "image_tokenizer.safetensors")
    assert torch.equal(ImageTokenizer.from_pretrained(renamed, "cpu", "float32")
                       .encode(img, mode="none")[0][0], expected)
    # two shards with an index
    sharded = tmp_path / "root" / "image_tokenizer"
    shutil.copytree(tok_dir, sharded)
    tensors = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / fname))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    # the model root (holding image_tokenizer/) is accepted too
    root_tok = ImageTokenizer.from_pretrained(tmp_path / "root", "cpu", torch.float32)
    assert torch.equal(root_tok.encode(img, mode="none")[0][0], expected)
    # a shard named by the index but absent
    (sharded / "b.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        ImageTokenizer.from_pretrained(sharded, "cpu", torch.float32)


def test_duplicate_key_across_files(tok_dir, tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(tok_dir, folder)
    shutil.copy(folder / "model.safetensors", folder / "copy.safetensors")
    with pytest.raises(CheckpointError, match="appears in both"):
        ImageTokenizer.from_pretrained(folder, "cpu", torch.float32)


def test_missing_or_corrupt_files(tok_dir, tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(tok_dir, folder)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        ImageTokenizer.from_pretrained(folder, "cpu", torch.float32)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        ImageTokenizer.from_pretrained(folder, "cpu", torch.float32)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(ConfigError, match="preprocessor config not found"):
        ImageTokenizer.from_pretrained(folder, "cpu", torch.float32)
    with pytest.raises(CheckpointError, match="no image tokenizer folder"):
        ImageTokenizer.from_pretrained(tmp_path / "nowhere", "cpu", torch.float32)


def test_config_parsing():
    raw = {"vision_config": {"hidden_size": 64, "num_heads": 4, "depth": 1, "intermediate_size": 8,
                             "patch_size": 16, "image_size": 128, "unknown_key": 1},
           "vq_config": {"num_embeddings": 10, "embed_dim": 8, "latent_channels": 64}}
    cfg = ImageTokenizerConfig.from_dict(raw)
    assert cfg.vision.hidden_size == 64 and cfg.vision.table_side == 8 and cfg.vq.num_embeddings == 10
    assert cfg.vision.layer_norm_eps == 1e-6 and cfg.vision.hidden_act == "gelu"
    # no sub-dicts: both read from the top level, as the reference does
    flat = {**raw["vision_config"], **raw["vq_config"]}
    assert ImageTokenizerConfig.from_dict(flat) == cfg
    default = ImageTokenizerConfig.from_dict({})
    assert (default.vision.depth, default.vision.hidden_size, default.vision.table_side,
            default.vq.num_embeddings, default.vq.embed_dim) == (40, 1536, 128, 16384, 2048)
    for bad in ({"spatial_merge_size": 2}, {"hidden_act": "gelu_pytorch_tanh"}, {"num_heads": 7}):
        with pytest.raises(ConfigError):
            ImageTokenizerConfig.from_dict({"vision_config": {**raw["vision_config"], **bad},
                                            "vq_config": raw["vq_config"]})
    with pytest.raises(ConfigError, match="latent_channels"):
        ImageTokenizerConfig.from_dict({"vision_config": raw["vision_config"],
                                        "vq_config": {**raw["vq_config"], "latent_channels": 32}})
    with pytest.raises(ConfigError, match="patch_size"):
        ImageTokenizer(cfg, PreprocessorConfig(patch_size=14))


def test_parameter_count_matches_spec_on_meta():
    with torch.device("meta"):
        model = ImageTokenizer(ImageTokenizerConfig())
    counts = {"model.visual": 0, "model.vqmodel": 0}
    for name, p in model.named_parameters():
        counts["model." + name.split(".")[0]] += p.numel()
    # spec 2.1: vision 1,159,607,808 + VQ 39,849,472 = 1,199,457,280 in 488 tensors
    assert counts == {"model.visual": 1_159_607_808, "model.vqmodel": 39_849_472}
    assert len(list(model.parameters())) == 488

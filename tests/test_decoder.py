"""The decoder side (image spec 6-9) on the tiny checkpoint: SigVQ, the Z-Image DiT through diffusers
(checked against an independent from-the-spec forward), the VAE output, strict loading, bad input."""

import math
import shutil
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from llada2uni.config import ConfigError
from llada2uni.models.decoder import (AXES_LENS, DecoderConfig, ImageDecoder, latents_to_image, load_dit,
                                      load_sigvq, load_vae, upsample_codes)
from llada2uni.tiny import TINY_IMAGE_CODES, write_tiny_decoder_side
from llada2uni.weights import CheckpointError

CPU = torch.device("cpu")
SIGVQ_DIM = 32  # write_tiny_decoder_side's default


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("decoder_side")
    write_tiny_decoder_side(path, seed=0, num_codes=TINY_IMAGE_CODES)
    return path


@pytest.fixture(scope="module")
def decoder(root):
    return ImageDecoder.from_pretrained(root, device="cpu", dtype=torch.float32)


def codes_for(h, w, seed=0):
    return torch.randint(0, TINY_IMAGE_CODES, (h * w,), generator=torch.Generator().manual_seed(seed))


# ---- SigVQ --------------------------------------------------------------------------------------


def test_upsampling_is_nearest_x2_row_major():
    codes = torch.tensor([0, 1, 2, 3, 4, 5])  # 2x3: [[0, 1, 2], [3, 4, 5]]
    expected = [0, 0, 1, 1, 2, 2,
                0, 0, 1, 1, 2, 2,
                3, 3, 4, 4, 5, 5,
                3, 3, 4, 4, 5, 5]
    assert upsample_codes(codes, 2, 3).tolist() == expected
    ids = codes_for(3, 5)
    ref = F.interpolate(ids.view(1, 1, 3, 5).float(), scale_factor=2, mode="nearest").long().view(-1)
    assert torch.equal(upsample_codes(ids, 3, 5), ref)


def test_conditioning_is_sigvq_of_the_upsampled_grid(root, decoder):
    sd = {k: v.float() for k, v in torch.load(root / "image_tokenizer/sigvq_embedding.pt", weights_only=True).items()}
    codes = codes_for(2, 3)
    cap = decoder.conditioning(codes, 2, 3)
    assert cap.shape == (24, SIGVQ_DIM) and cap.dtype == torch.float32
    e = sd["prior_token_embedding.weight"][upsample_codes(codes, 2, 3)]
    hidden = F.silu(e @ sd["prior_projector.net.0.proj.weight"].T + sd["prior_projector.net.0.proj.bias"])
    expected = hidden @ sd["prior_projector.net.2.weight"].T + sd["prior_projector.net.2.bias"]
    torch.testing.assert_close(cap, expected)


# ---- the DiT: config overrides, position ids, and an independent forward -------------------------


def test_config_overrides_and_keys(root, decoder):
    dit = decoder.dit("normal")
    assert dit.config.cap_feat_dim == SIGVQ_DIM  # the file says 2560
    assert list(dit.config.axes_lens) == list(AXES_LENS)  # the file says [1536, 512, 512]
    raw = {"dim": 64, "n_heads": 2, "n_kv_heads": 2, "axes_dims": [8, 12, 12], "_class_name": "x",
           "siglip_feat_dim": None}
    assert DecoderConfig.from_dict(raw, cap_feat_dim=7).cap_feat_dim == 7
    with pytest.raises(ConfigError, match="unknown decoder config key"):
        DecoderConfig.from_dict({**raw, "rope_scaling": 2}, cap_feat_dim=7)
    with pytest.raises(ConfigError, match="axes_dims"):
        DecoderConfig.from_dict({**raw, "axes_dims": [8, 8, 8]}, cap_feat_dim=7)


def test_diffusers_position_ids_follow_the_spec(decoder):
    dit = decoder.dit("normal")
    x = torch.zeros(16, 1, 6, 10)  # 3x5 patches = 15 image tokens, padded to 32
    cap = torch.zeros(60, SIGVQ_DIM)  # 60 caption tokens, padded to 64
    _, _, _, img_pos, cap_pos, img_pad, cap_pad = dit.patchify_and_embed([x], [cap], 2, 1)
    img_pos, cap_pos = img_pos[0].tolist(), cap_pos[0].tolist()
    # (j + 1, 0, 0), pads included. diffusers appends (-L % 32) more (0, 0, 0) ids past the padded
    # caption and cuts them off again when it builds the RoPE table (_prepare_sequence).
    assert cap_pos[:64] == [[j + 1, 0, 0] for j in range(64)]
    assert img_pos[:15] == [[65, i, j] for i in range(3) for j in range(5)]  # (Lpad + 1, i_h, i_w)
    assert img_pos[15:] == [[0, 0, 0]] * 17
    assert img_pad[0].tolist() == [False] * 15 + [True] * 17 and cap_pad[0].sum() == 4


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, angles):
    """x [n, H, hd]; dims (2k, 2k+1) are one complex number, rotated by angles [n, hd/2]."""
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = angles.cos().float()[:, None], angles.sin().float()[:, None]
    return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)


def _angles(pos, axes_dims, theta):
    parts = []
    for axis, d in enumerate(axes_dims):
        freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        parts.append(pos[:, axis, None].double() * freq)
    return torch.cat(parts, -1)  # [n, head_dim / 2]: t, h, w axes in order


def _block(sd, pre, x, angles, heads, mod=None):
    n, dim = x.shape
    hd = dim // heads
    if mod is not None:
        s_attn, g_attn, s_ffn, g_ffn = (sd[pre + "adaLN_modulation.0.weight"] @ mod
                                        + sd[pre + "adaLN_modulation.0.bias"]).chunk(4)
    h = _rms(x, sd[pre + "attention_norm1.weight"])
    h = h * (1 + s_attn) if mod is not None else h
    q, k, v = ((h @ sd[pre + f"attention.to_{p}.weight"].T).view(n, heads, hd) for p in "qkv")
    q = _rope(_rms(q, sd[pre + "attention.norm_q.weight"]), angles)
    k = _rope(_rms(k, sd[pre + "attention.norm_k.weight"]), angles)
    att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd), dim=-1)
    o = torch.einsum("hqk,khd->qhd", att, v).reshape(n, dim) @ sd[pre + "attention.to_out.0.weight"].T
    o = _rms(o, sd[pre + "attention_norm2.weight"])
    x = x + (torch.tanh(g_attn) * o if mod is not None else o)
    h = _rms(x, sd[pre + "ffn_norm1.weight"])
    h = h * (1 + s_ffn) if mod is not None else h
    f = (F.silu(h @ sd[pre + "feed_forward.w1.weight"].T) * (h @ sd[pre + "feed_forward.w3.weight"].T))
    f = _rms(f @ sd[pre + "feed_forward.w2.weight"].T, sd[pre + "ffn_norm2.weight"])
    return x + (torch.tanh(g_ffn) * f if mod is not None else f)


def _spec_dit(sd, cfg, x, t, cap):
    """The basic-mode Z-Image forward written from image spec 7.2-7.3, on CHECKPOINT names."""
    p, dim, heads, C, H, W = 2, cfg["dim"], cfg["n_heads"], x.shape[0], x.shape[2], x.shape[3]
    lin = lambda v, name: v @ sd[name + ".weight"].T + sd[name + ".bias"]  # noqa: E731
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t * cfg["t_scale"] * freqs
    a = lin(F.silu(lin(torch.cat([args.cos(), args.sin()]), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    Hp, Wp = H // p, W // p
    tokens = x[:, 0].reshape(C, Hp, p, Wp, p).permute(1, 3, 2, 4, 0).reshape(Hp * Wp, p * p * C)
    n_img, L = Hp * Wp, cap.shape[0]
    img_pad, Lpad = -n_img % 32, L + -L % 32
    xi = torch.cat([lin(tokens, "all_x_embedder.2-1"), sd["x_pad_token"].expand(img_pad, dim)])
    c = lin(_rms(cap, sd["semantic_embedder.0.weight"]), "semantic_embedder.1")
    c = torch.cat([c, sd["cap_pad_token"].expand(Lpad - L, dim)])
    cap_pos = torch.stack([torch.arange(1, Lpad + 1), torch.zeros(Lpad), torch.zeros(Lpad)], -1)
    ih, iw = torch.meshgrid(torch.arange(Hp), torch.arange(Wp), indexing="ij")
    img_pos = torch.stack([torch.full((n_img,), Lpad + 1), ih.flatten(), iw.flatten()], -1)
    img_pos = torch.cat([img_pos, torch.zeros(img_pad, 3, dtype=img_pos.dtype)])
    ang_img = _angles(img_pos, cfg["axes_dims"], cfg["rope_theta"])
    ang_cap = _angles(cap_pos, cfg["axes_dims"], cfg["rope_theta"])
    for i in range(cfg["n_refiner_layers"]):
        xi = _block(sd, f"noise_refiner.{i}.", xi, ang_img, heads, a)
        c = _block(sd, f"context_refiner.{i}.", c, ang_cap, heads)
    seq, ang = torch.cat([xi, c]), torch.cat([ang_img, ang_cap])  # image tokens first, caption after
    for i in range(cfg["n_layers"]):
        seq = _block(sd, f"layers.{i}.", seq, ang, heads, a)
    y = F.layer_norm(seq, (dim,), eps=1e-6) * (1 + lin(F.silu(a), "all_final_layer.2-1.adaLN_modulation.1"))
    y = lin(y, "all_final_layer.2-1.linear")[:n_img]
    return y.view(Hp, Wp, p, p, C).permute(4, 0, 2, 1, 3).reshape(C, 1, H, W)


@pytest.mark.parametrize("h,w,rm", [(2, 2, 2), (3, 5, 1)])
def test_diffusers_dit_matches_the_spec_forward(root, decoder, h, w, rm):
    import json

    cfg = json.loads((root / "decoder/config.json").read_text())
    sd = {k: v.float() for k, v in load_file(str(root / "decoder/model.safetensors")).items()}
    gen = torch.Generator().manual_seed(h * 10 + w)
    x = torch.randn(16, 1, 2 * h * rm, 2 * w * rm, generator=gen)
    cap = decoder.conditioning(codes_for(h, w), h, w)
    t = 0.37
    with torch.no_grad():
        got = decoder.dit("normal")([x], torch.tensor([t]), [cap], patch_size=2, f_patch_size=1,
                                    return_dict=False)[0][0]
    torch.testing.assert_close(got, _spec_dit(sd, cfg, x, t, cap), rtol=1e-4, atol=1e-4)


# ---- decode: sizes, range, seeds, residency ------------------------------------------------------


@pytest.mark.parametrize("mode,steps", [("turbo", 8), ("normal", 3)])
@pytest.mark.parametrize("rm", [1, 2])
def test_decode_size_is_grid_times_16_times_rm(decoder, mode, steps, rm):
    img = decoder.decode(codes_for(2, 3), 2, 3, mode=mode, steps=steps, resolution_multiplier=rm, seed=0)
    assert img.mode == "RGB" and img.size == (3 * 16 * rm, 2 * 16 * rm)  # PIL size is (width, height)
    pixels = np.asarray(img)
    assert pixels.dtype == np.uint8 and pixels.shape == (2 * 16 * rm, 3 * 16 * rm, 3)
    assert pixels.std() > 0


def test_decode_is_reproducible_by_seed(decoder):
    codes = codes_for(2, 2)
    for mode, steps in (("turbo", 8), ("normal", 3)):
        a = np.asarray(decoder.decode(codes, 2, 2, mode=mode, steps=steps, seed=1))
        b = np.asarray(decoder.decode(codes, 2, 2, mode=mode, steps=steps, seed=1))
        c = np.asarray(decoder.decode(codes, 2, 2, mode=mode, steps=steps, seed=2))
        assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_decode_bf16_runs(root):
    dec = ImageDecoder.from_pretrained(root, device="cpu", dtype="bf16", keep_resident=False)
    img = dec.decode(codes_for(1, 1), 1, 1, mode="turbo", steps=2, resolution_multiplier=1, seed=0)
    assert img.size == (16, 16) and dec._dits == {}  # keep_resident=False frees the DiT after use


def test_dits_load_once_and_release(root):
    dec = ImageDecoder.from_pretrained(root, device="cpu", dtype=torch.float32)
    first = dec.dit("turbo")
    dec.decode(codes_for(1, 1), 1, 1, mode="turbo", steps=1, resolution_multiplier=1, seed=0)
    assert dec.dit("turbo") is first
    dec.release()
    assert dec._dits == {} and dec.dit("turbo") is not first


class _FakeVAE:
    """Returns a fixed image and records the latent it was given."""

    dtype = torch.float32
    config = types.SimpleNamespace(scaling_factor=0.5, shift_factor=0.25)

    def __init__(self, image):
        self.image = image

    def decode(self, s, return_dict=False):
        self.seen = s
        return (self.image,)


def test_vae_output_scaling_clamp_and_truncation():
    # (x + 1) / 2 * 255 for x = -2 (clamped to 0), 1.5 (clamped to 255), and 127.9 / 255 * 2 - 1 (-> 127)
    x = torch.tensor([-2.0, 1.5, 127.9 / 255 * 2 - 1, 0.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    vae = _FakeVAE(x)
    latents = torch.randn(1, 16, 2, 2)
    pixels = np.asarray(latents_to_image(vae, latents))
    torch.testing.assert_close(vae.seen, latents / 0.5 + 0.25)
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 2, 3)
    assert pixels[..., 0].tolist() == [[0, 255], [127, 127]]  # truncation, not rounding (127.5 -> 127)


def test_real_vae_output_range(decoder):
    latents = 20 * torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))  # saturates
    pixels = np.asarray(latents_to_image(decoder.vae, latents))
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert pixels.min() >= 0 and pixels.max() <= 255


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_codes_are_clear_errors(decoder):
    with pytest.raises(ValueError, match=r"5 codes for a 2x3 grid"):
        decoder.decode([0] * 5, 2, 3)
    with pytest.raises(ValueError, match=r"\[0, 128\).*offset"):
        decoder.decode([0, 1, 2, TINY_IMAGE_CODES], 2, 2)
    with pytest.raises(ValueError, match="got min -1"):
        decoder.conditioning([0, -1, 2, 3], 2, 2)
    with pytest.raises(ValueError, match="integers"):
        decoder.conditioning(torch.zeros(4), 2, 2)
    with pytest.raises(ValueError, match="positive integers"):
        decoder.conditioning([], 0, 3)


def test_bad_options_are_clear_errors(decoder):
    codes = codes_for(2, 2)
    with pytest.raises(ValueError, match="unknown decode mode"):
        decoder.decode(codes, 2, 2, mode="fast")
    with pytest.raises(ValueError, match="without CFG"):
        decoder.decode(codes, 2, 2, mode="turbo", cfg_scale=2.0)
    with pytest.raises(ValueError, match="num_steps >= 2"):
        decoder.decode(codes, 2, 2, mode="normal", steps=1)
    with pytest.raises(ValueError, match="resolution_multiplier"):
        decoder.decode(codes, 2, 2, resolution_multiplier=0)
    with pytest.raises(ValueError, match="position range"):  # 4hw caption positions past 32767
        decoder.decode(torch.zeros(100 * 100, dtype=torch.long), 100, 100, mode="turbo")


def test_turbo_without_its_folder_suggests_normal(root, tmp_path):
    for name in ("image_tokenizer", "decoder", "vae"):
        shutil.copytree(root / name, tmp_path / name)
    dec = ImageDecoder.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)
    with pytest.raises(CheckpointError, match='mode="normal"'):
        dec.decode(codes_for(1, 1), 1, 1, mode="turbo")
    assert dec.decode(codes_for(1, 1), 1, 1, mode="normal", steps=2, resolution_multiplier=1).size == (16, 16)


# ---- strict loading, per folder -----------------------------------------------------------------


def _rewrite(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _rename(old, new):
    return lambda t: t.__setitem__(new, t.pop(old))


@pytest.mark.parametrize("folder,file,old,new", [
    ("decoder", "model.safetensors", "layers.0.attention.to_q.weight", "layers.0.attention.q.weight"),
    ("decoder-turbo", "decoder_model.safetensors", "semantic_embedder.1.weight", "cap_embedder.1.weight"),
    ("vae", "diffusion_pytorch_model.safetensors", "decoder.conv_in.weight", "decoder.conv_input.weight"),
])
def test_renamed_key_fails_loudly(root, tmp_path, folder, file, old, new):
    shutil.copytree(root / folder, tmp_path / folder)
    _rewrite(tmp_path / folder / file, _rename(old, new))
    with pytest.raises(CheckpointError) as err:
        if folder == "vae":
            load_vae(tmp_path / folder, CPU, torch.float32)
        else:
            load_dit(tmp_path / folder, CPU, torch.float32, cap_feat_dim=SIGVQ_DIM)
    assert f"missing tensor(s): {old}" in str(err.value) and f"unexpected tensor(s): {new}" in str(err.value)


def test_dit_shape_and_width_mismatch_name_the_tensor(root, tmp_path):
    shutil.copytree(root / "decoder", tmp_path / "decoder")
    with pytest.raises(CheckpointError, match=r"semantic_embedder.0.weight .* shape \[32\], expected \[48\]"):
        load_dit(tmp_path / "decoder", CPU, torch.float32, cap_feat_dim=48)  # SigVQ width != checkpoint's
    _rewrite(tmp_path / "decoder/model.safetensors",
             lambda t: t.__setitem__("x_pad_token", torch.zeros(1, 65, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=r"x_pad_token .* shape \[1, 65\], expected \[1, 64\]"):
        load_dit(tmp_path / "decoder", CPU, torch.float32, cap_feat_dim=SIGVQ_DIM)


def test_dit_missing_or_sharded_weights(root, tmp_path):
    folder = tmp_path / "decoder"
    shutil.copytree(root / "decoder", folder)
    (folder / "model.safetensors").rename(tmp_path / "weights.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors or decoder_model.safetensors"):
        load_dit(folder, CPU, torch.float32, cap_feat_dim=SIGVQ_DIM)
    # a sharded copy under the model-card name loads to the same weights
    tensors = load_file(str(tmp_path / "weights.safetensors"))
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for shard, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(folder / shard))
    index = {"weight_map": {n: shard for shard, part in shards.items() for n in part}}
    import json
    (folder / "decoder_model.safetensors.index.json").write_text(json.dumps(index))
    model = load_dit(folder, CPU, torch.float32, cap_feat_dim=SIGVQ_DIM)
    torch.testing.assert_close(model.cap_embedder[1].weight, tensors["semantic_embedder.1.weight"].float())
    (folder / "b.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard file"):
        load_dit(folder, CPU, torch.float32, cap_feat_dim=SIGVQ_DIM)


def test_missing_configs_and_folders(root, tmp_path):
    shutil.copytree(root / "vae", tmp_path / "vae")
    (tmp_path / "vae/config.json").unlink()
    with pytest.raises(CheckpointError, match="config file not found: .*config.json"):
        load_vae(tmp_path / "vae", CPU, torch.float32)
    with pytest.raises(CheckpointError, match="missing checkpoint folder"):
        load_vae(tmp_path / "nowhere", CPU, torch.float32)
    (tmp_path / "image_tokenizer").mkdir()
    with pytest.raises(CheckpointError, match="neither decoder/ nor decoder-turbo/"):
        ImageDecoder.from_pretrained(tmp_path, device="cpu")


class _NotATensor:
    pass


def test_sigvq_loading_is_strict_and_weights_only(root, tmp_path):
    good = torch.load(root / "image_tokenizer/sigvq_embedding.pt", weights_only=True)
    path = tmp_path / "sigvq_embedding.pt"
    with pytest.raises(CheckpointError, match="missing SigVQ embedding file"):
        load_sigvq(path, device=CPU, dtype=torch.float32)
    bad = dict(good)
    bad["prior_projector.net.2.proj.weight"] = bad.pop("prior_projector.net.2.weight")
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): prior_projector.net.2.weight; "
                                              r"unexpected tensor\(s\): prior_projector.net.2.proj.weight"):
        load_sigvq(path, device=CPU, dtype=torch.float32)
    torch.save({**good, "extra": _NotATensor()}, path)  # arbitrary pickled objects are refused
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_sigvq(path, device=CPU, dtype=torch.float32)
    torch.save(good, path)
    model = load_sigvq(path, device=CPU, dtype=torch.bfloat16)
    assert (model.vocab_size, model.dim) == (TINY_IMAGE_CODES, SIGVQ_DIM)
    assert model.prior_projector.net[2].weight.dtype == torch.bfloat16

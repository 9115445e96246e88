import io
import json
import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from llada2uni.config import ConfigError
from llada2uni.preprocess import (
    ImageInputError,
    PreprocessorConfig,
    choose_crop_size,
    crop_size_list,
    edit_crop,
    load_image,
    smart_resize_dims,
    t2i_grid,
    to_patches,
    to_rgb,
    understand_resize,
)


def noise_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width, height):
    """A PNG that declares width x height but holds no pixel data (opening reads the header only)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------------
# load_image: sources and bad input


def test_load_image_sources(tmp_path):
    img = noise_image(20, 10)
    path = tmp_path / "a.png"
    img.save(path)
    for src in (img, path, str(path), png_bytes(img), bytearray(png_bytes(img))):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (20, 10)
        assert np.array_equal(np.asarray(out), np.asarray(img))


@pytest.mark.parametrize("src, words", [
    (b"this is not an image", "not an image"),
    (b"", "empty"),
    (12345, "cannot read an image from a int"),
    (None, "cannot read an image from a NoneType"),
])
def test_load_image_rejects_non_images(src, words):
    with pytest.raises(ImageInputError, match=words):
        load_image(src)


def test_load_image_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageInputError, match="no image file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageInputError, match="not a file"):
        load_image(tmp_path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_load_image_truncated(fmt):
    buf = io.BytesIO()
    noise_image(64, 64).save(buf, format=fmt)
    data = buf.getvalue()
    with pytest.raises(ImageInputError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_load_image_zero_pixels():
    with pytest.raises(ImageInputError, match="no pixels"):
        load_image(Image.new("RGB", (0, 10)))
    with pytest.raises(ImageInputError, match="no pixels"):
        load_image(Image.new("RGB", (10, 0)))


def test_load_image_one_pixel_is_accepted():
    out = load_image(Image.new("RGB", (1, 1), (10, 20, 30)))
    assert out.size == (1, 1) and out.getpixel((0, 0)) == (10, 20, 30)


def test_decompression_bomb_guard():
    # Our own limit, checked from the header before any pixel is decoded.
    with pytest.raises(ImageInputError, match="decompression-bomb guard"):
        load_image(png_header_only(9000, 9000))
    with pytest.raises(ImageInputError, match="decompression-bomb guard"):
        load_image(noise_image(100, 100), max_pixels=5000)
    # PIL's own hard limit (twice its warning threshold) is reported the same way.
    with pytest.raises(ImageInputError, match="decompression-bomb guard"):
        load_image(png_header_only(20000, 20000))


# --------------------------------------------------------------------------------------------------
# Colour modes


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (2, 1))
    img.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    img.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    out = load_image(img)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in out.getpixel((1, 0)))


def test_la_and_palette_transparency_on_white():
    la = Image.new("LA", (1, 1), (0, 0))
    assert load_image(la).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    reloaded = Image.open(io.BytesIO(png_bytes(pal)))  # transparency as a real PNG carries it
    out = load_image(reloaded)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (200, 10, 10)


def test_high_bit_depth_grey_scaled_to_8_bit():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(values)
    assert img16.mode.startswith("I;16")
    out = load_image(png_bytes(img16))  # a 16-bit PNG, as opened from disk
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]
    out_i = to_rgb(Image.fromarray(values.astype(np.int32)))  # mode "I"
    assert [out_i.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (1, 1, 1), (128,) * 3, (255,) * 3]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0, 7.0]], dtype=np.float32))
    assert [to_rgb(f).getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 255]


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "YCbCr", "P"])
def test_other_modes_convert_to_rgb(mode):
    img = noise_image(8, 8).convert(mode)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (8, 8)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = load_image(buf.getvalue())
    assert out.getpixel((0, 0)) == (255, 0, 0)


# --------------------------------------------------------------------------------------------------
# Understanding resize


@pytest.mark.parametrize("h, w, factor, expected", [
    (800, 800, 32, (800, 800)),  # spec 3.1: 800x800 -> 50x50 tokens
    (400, 1600, 32, (384, 1600)),  # round(400/32) = round(12.5) = 12: half to even
    (400, 1600, 16, (400, 1600)),  # SGLang's factor 16
    (3000, 4000, 32, (672, 896)),  # over budget: floor after scaling by sqrt(max/HW)
    (1, 1, 32, (128, 128)),  # under budget: ceil after scaling by sqrt(min/HW)
    (112, 1000, 32, (128, 992)),
])
def test_smart_resize_dims(h, w, factor, expected):
    assert smart_resize_dims(h, w, factor=factor) == expected


def test_smart_resize_dims_budgets_and_alignment():
    for h, w in [(37, 53), (480, 640), (1080, 1920), (4000, 3000), (100, 3000), (5000, 40)]:
        for max_pixels in (800 * 800, 448 * 448):
            th, tw = smart_resize_dims(h, w, max_pixels=max_pixels)
            assert th % 32 == 0 and tw % 32 == 0
            assert 128 * 128 <= th * tw <= max_pixels


def test_smart_resize_dims_rejects_extreme_aspect_and_empty():
    with pytest.raises(ImageInputError, match="aspect ratio"):
        smart_resize_dims(1, 1000)
    with pytest.raises(ImageInputError, match="no pixels"):
        smart_resize_dims(0, 10)


def test_understand_resize_examples():
    assert understand_resize(noise_image(800, 800)).size == (800, 800)  # grid 50x50
    # 448x448 budget: 800 * sqrt(448^2 / 800^2) = 447.99999999999994 in floats, floored to 416
    assert understand_resize(noise_image(800, 800), num_images=2).size == (416, 416)  # 26x26
    img = noise_image(1600, 400)
    out = understand_resize(img)
    assert out.size == (1600, 384)  # grid 24x100
    # scale 1: no resampling, only the centre crop of rows 8..392
    assert np.array_equal(np.asarray(out), np.asarray(img)[8:392])
    assert understand_resize(img, factor=16).size == (1600, 400)  # grid 25x100
    # The reference crop keeps floor(new/32)*32 when larger than the target: 1120 wide, not 992.
    assert understand_resize(noise_image(1000, 112)).size == (1120, 128)
    assert understand_resize(noise_image(1, 1)).size == (128, 128)
    assert understand_resize(Image.new("RGBA", (40, 40))).mode == "RGB"
    with pytest.raises(ValueError):
        understand_resize(noise_image(8, 8), num_images=0)


def test_understand_resize_is_bicubic_cover():
    img = noise_image(300, 200)
    out = understand_resize(img)
    th, tw = smart_resize_dims(200, 300)
    k = max(th / 200, tw / 300)
    resized = img.resize((round(300 * k), round(200 * k)), Image.BICUBIC)
    cw, ch = out.size
    left, top = (resized.width - cw) // 2, (resized.height - ch) // 2
    assert np.array_equal(np.asarray(out), np.asarray(resized.crop((left, top, left + cw, top + ch))))


# --------------------------------------------------------------------------------------------------
# Editing crop


def test_crop_size_list():
    sizes = crop_size_list()
    assert (512, 512) in sizes and (1024, 256) in sizes and (256, 1024) in sizes and (672, 384) in sizes
    assert sizes[0] == (1024, 256) and sizes[-1] == (256, 1024) and len(sizes) == 49
    for w, h in sizes:
        assert w % 32 == 0 and h % 32 == 0
        assert w * h <= 512 * 512
        assert max(w, h) / min(w, h) <= 4
    assert len(set(sizes)) == len(sizes)


def test_choose_crop_size():
    assert choose_crop_size(512, 512) == (512, 512)
    assert choose_crop_size(1024, 256) == (1024, 256)
    assert choose_crop_size(672, 384) == (672, 384)
    assert choose_crop_size(4000, 100) == (1024, 256)  # beyond 4:1: the closest candidate
    # Ties go to the larger size, as the reference's descending tuple sort.
    assert choose_crop_size(100, 100, [(64, 64), (128, 128), (96, 96)]) == (128, 128)


def test_edit_crop_is_native_resolution_centre():
    img = noise_image(512, 512)
    assert np.array_equal(np.asarray(edit_crop(img)), np.asarray(img))  # grid 32x32
    img = noise_image(1024, 768)
    out = edit_crop(img)
    cw, ch = choose_crop_size(1024, 768)
    assert out.size == (cw, ch)
    left, top = (1024 - cw) // 2, (768 - ch) // 2
    assert np.array_equal(np.asarray(out), np.asarray(img)[top:top + ch, left:left + cw])


def test_edit_crop_pads_small_images_black_top_left(caplog):
    img = noise_image(300, 200)
    with caplog.at_level(logging.WARNING):
        out = edit_crop(img)
    assert "padded with black" in caplog.text
    cw, ch = out.size
    arr = np.asarray(out)
    assert (cw, ch) == choose_crop_size(300, 200) and cw > 300 and ch > 200
    assert np.array_equal(arr[:200, :300], np.asarray(img))  # offset clamped at 0
    assert not arr[200:].any() and not arr[:, 300:].any()
    one = edit_crop(Image.new("RGB", (1, 1), (10, 20, 30)))
    assert one.size == (512, 512) and one.getpixel((0, 0)) == (10, 20, 30)
    assert edit_crop(noise_image(2000, 100)).size == (1024, 256)


# --------------------------------------------------------------------------------------------------
# Generation grid


def test_t2i_grid():
    assert t2i_grid(1024, 1024) == (32, 32)
    assert t2i_grid(768, 1024) == (24, 32)  # image_h=768, image_w=1024
    assert t2i_grid(512, 512) == (16, 16)
    assert t2i_grid(np.int64(64), 96) == (2, 3)
    for bad in (1000, 0, -32, 31, 32.0, True, "512", None):
        with pytest.raises(ImageInputError):
            t2i_grid(bad, 512)
        with pytest.raises(ImageInputError):
            t2i_grid(512, bad)


# --------------------------------------------------------------------------------------------------
# Patches


def normalised(img, cfg):
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()
    mean = torch.tensor(cfg.image_mean).view(-1, 1, 1)
    std = torch.tensor(cfg.image_std).view(-1, 1, 1)
    return (x * cfg.rescale_factor - mean) / std


def test_to_patches_raster_order_and_values():
    cfg = PreprocessorConfig()
    img = noise_image(80, 48)  # grid 3 x 5
    pv, grid = to_patches(img, cfg)
    assert grid == (1, 3, 5) and pv.shape == (15, 3 * 16 * 16) and pv.dtype == torch.float32
    x = normalised(img, cfg)
    for k in range(15):
        r, c = divmod(k, 5)
        assert torch.equal(pv[k], x[:, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16].reshape(-1))
    white, black = to_patches(Image.new("RGB", (16, 32), (255, 255, 255)), cfg)[0], \
        to_patches(Image.new("RGB", (16, 16)), cfg)[0]
    assert torch.all(white == 1.0) and torch.all(black == -1.0)


def test_to_patches_two_step_fp32_order():
    cfg = PreprocessorConfig(image_mean=(0.48145466, 0.4578275, 0.40821073),
                             image_std=(0.26862954, 0.26130258, 0.27577711))
    img = noise_image(32, 32, seed=3)
    pv, _ = to_patches(img, cfg)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).to(torch.float32)
    two_step = (x * cfg.rescale_factor - torch.tensor(cfg.image_mean).view(-1, 1, 1)) \
        / torch.tensor(cfg.image_std).view(-1, 1, 1)
    expected = two_step.view(3, 2, 16, 2, 16).permute(1, 3, 0, 2, 4).reshape(4, -1)
    assert torch.equal(pv, expected)
    off = to_patches(img, PreprocessorConfig(do_rescale=False, do_normalize=False))[0]
    assert off.max() == float(np.asarray(img).max())


def test_to_patches_block_order_switch():
    cfg = PreprocessorConfig(merge_size=2)
    img = noise_image(64, 32)  # grid 2 x 4
    raster, _ = to_patches(img, cfg)  # merge_size in the file is ignored by default
    assert torch.equal(raster, to_patches(img, PreprocessorConfig())[0])
    block, grid = to_patches(img, cfg, block_order=True)
    assert grid == (1, 2, 4)
    # 2x2 blocks row-major, patches row-major inside: raster indices 0,1,4,5, 2,3,6,7
    assert torch.equal(block, raster[[0, 1, 4, 5, 2, 3, 6, 7]])
    with pytest.raises(ImageInputError, match="multiple of 32"):
        to_patches(noise_image(48, 32), cfg, block_order=True)


@pytest.mark.parametrize("size", [(100, 100), (16, 20), (1, 1)])
def test_to_patches_rejects_unaligned_sizes(size):
    with pytest.raises(ImageInputError, match="multiple of 16"):
        to_patches(noise_image(*size), PreprocessorConfig())


# --------------------------------------------------------------------------------------------------
# Preprocessor config


def test_preprocessor_config_from_file(tmp_path, caplog):
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({"patch_size": 16, "temporal_patch_size": 1, "merge_size": 2,
                                "image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5],
                                "rescale_factor": 0.00392156862745098, "min_pixels": 3136,
                                "image_processor_type": "Qwen2VLImageProcessor"}))
    cfg = PreprocessorConfig.from_file(path)
    assert cfg.merge_size == 2 and cfg.image_mean == (0.1, 0.2, 0.3) and cfg.patch_size == 16
    path.write_text(json.dumps({"patch_size": 16}))
    with caplog.at_level(logging.WARNING):
        cfg = PreprocessorConfig.from_file(path)
    assert cfg.image_mean == (0.5, 0.5, 0.5) and cfg.temporal_patch_size == 1 and cfg.merge_size == 1
    assert "OpenAI-CLIP" in caplog.text


def test_preprocessor_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="temporal_patch_size"):
        PreprocessorConfig(temporal_patch_size=2)
    with pytest.raises(ConfigError, match="image_std"):
        PreprocessorConfig(image_std=(0.5, 0.0, 0.5))
    with pytest.raises(ConfigError, match="not found"):
        PreprocessorConfig.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PreprocessorConfig.from_file(bad)

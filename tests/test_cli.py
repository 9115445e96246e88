import json

import pytest

import torch

from llada2uni.cli import main


def test_make_tiny_and_understand(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main(["make-tiny", str(ck)]) == 0
    assert (ck / "model.safetensors.index.json").exists()
    assert main(["make-tiny", str(ck)]) == 2  # refuses to overwrite
    assert "not empty" in capsys.readouterr().err
    tok = tmp_path / "img.pt"
    torch.save({"semantic_token_ids": torch.arange(16), "metadata": {"processed_size": [64, 64]}}, tok)
    assert main(["understand", "--model_path", str(ck), "--image_token", str(tok), "--question", "hi",
                 "--steps", "4", "--gen_length", "8", "--device", "cpu"]) == 0


def test_demo_writes_outputs(tmp_path, capsys):
    from PIL import Image
    out = tmp_path / "out"
    # 128 px keeps the CPU decodes small
    assert main(["--quiet", "demo", "--output_dir", str(out), "--size", "128"]) == 0
    report = json.loads((out / "report.json").read_text())
    for name in ("t2i_turbo.png", "t2i_normal.png", "t2i_thinking.png", "edit.png"):
        with Image.open(out / name) as im:
            im.load()
            assert im.mode == "RGB"
    with Image.open(out / "t2i_turbo.png") as im:
        assert im.size == (128, 128)
    assert isinstance(report["understand_tokens"], str) and isinstance(report["understand_image"], str)
    assert report["edit"]["grid"] == [8, 8]
    assert report["interleave"] and report["interleave"][0]["type"] in ("text", "image")


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["chat", "--model_path", str(tmp_path / "nope"), "hello"]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err


def _png(path):
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        return im.size


def test_t2i_edit_understand_interleave_write_pngs(tiny_dir, tmp_path, capsys):
    from PIL import Image
    common = ["--model_path", str(tiny_dir), "--device", "cpu"]
    out = tmp_path / "t2i"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    assert main(["--quiet", "t2i", *common, "--prompts_file", str(prompts), "--image_h", "64",
                 "--image_w", "96", "--steps", "2", "--decoder_steps", "3", "--output_dir", str(out)]) == 0
    assert _png(out / "000.png") == (96, 64) and _png(out / "001.png") == (96, 64)
    assert main(["--quiet", "t2i", *common, "--prompt", "x", "--image_h", "64", "--image_w", "64",
                 "--steps", "2", "--decode_mode", "turbo", "--resolution_multiplier", "1",
                 "--output", str(tmp_path / "one.png")]) == 0
    assert _png(tmp_path / "one.png") == (32, 32)
    src = tmp_path / "src.png"
    Image.new("RGB", (64, 64), (0, 0, 255)).save(src)
    assert main(["--quiet", "understand", *common, "--image", str(src), "--question", "what?", "--steps", "4",
                 "--gen_length", "8"]) == 0
    assert main(["--quiet", "edit", *common, "--image", str(src), "--image", str(src), "--instruction", "red",
                 "--steps", "2", "--decode_mode", "turbo", "--resolution_multiplier", "1",
                 "--output", str(tmp_path / "edited.png")]) == 0
    assert _png(tmp_path / "edited.png")[0] > 0
    assert main(["--quiet", "interleave", *common, "--prompt", "story", "--max_frames", "1", "--steps", "4",
                 "--image_steps", "2", "--gen_length", "32", "--output_dir", str(tmp_path / "il")]) == 0
    assert (tmp_path / "il" / "segments.json").exists()


def test_cli_bad_inputs(tiny_dir, tmp_path, capsys):
    common = ["--model_path", str(tiny_dir), "--device", "cpu"]
    assert main(["t2i", *common, "--prompt", "x", "--image_h", "16"]) == 2
    assert ">= 32" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    assert main(["understand", *common, "--image", str(bad)]) == 2
    assert "image" in capsys.readouterr().err.lower()
    assert main(["understand", *common, "--image", str(tmp_path / "missing.png")]) == 2


def test_quant_and_memory_options_reach_from_pretrained(tiny_dir, monkeypatch, capsys):
    from llada2uni.cli import build_parser
    from llada2uni.pipeline import LLaDA2Uni
    seen = {}
    real = LLaDA2Uni.from_pretrained.__func__

    def spy(cls, path, **kw):
        seen.update(kw)
        return real(cls, path, **kw)
    monkeypatch.setattr(LLaDA2Uni, "from_pretrained", classmethod(spy))
    assert main(["chat", "--model_path", str(tiny_dir), "--device", "cpu", "--quant", "int8",
                 "--decoder_quant", "none", "--memory", "16", "--steps", "2", "--gen_length", "8", "hi"]) == 0
    assert (seen["quant"], seen["decoder_quant"], seen["memory"]) == ("int8", "none", "16")
    args = build_parser().parse_args(["serve", "--model", "tiny", "--memory", "24", "--decoder-quant", "fp8"])
    assert (args.memory, args.decoder_quant, args.quant) == ("24", "fp8", "auto")


def test_files_are_never_deleted_or_half_written(tmp_path, capsys, tiny_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["make-tiny", str(mine), "--overwrite"]) == 2
    assert (mine / "notes.txt").read_text() == "keep me" and "not replacing it" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert main(["make-tiny", str(tmp_path / "a-file")]) == 2
    assert "is a file" in capsys.readouterr().err
    ck = tmp_path / "ck"
    assert main(["make-tiny", str(ck)]) == 0
    assert main(["make-tiny", str(ck), "--overwrite"]) == 0  # its own earlier checkpoint: replaced
    demo = tmp_path / "demo" / "tiny-checkpoint"
    demo.mkdir(parents=True)
    (demo / "mine.txt").write_text("keep")
    assert main(["demo", "--output_dir", str(tmp_path / "demo"), "--quiet", "--size", "64"]) == 2
    assert (demo / "mine.txt").read_text() == "keep"
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit, match="is a folder"):
        main(["t2i", "--model_path", str(tiny_dir), "--device", "cpu", "--prompt", "p", "--output", str(out)])
    assert list(out.iterdir()) == [] and not list(tmp_path.glob("*.part"))


def test_both_spellings_and_global_flags_after_the_subcommand():
    from llada2uni.cli import build_parser
    a = build_parser().parse_args(["chat", "--model-path", "m", "--low-memory", "--gen-length", "8", "hi", "--quiet"])
    assert (a.model_path, a.low_memory, a.gen_length, a.quiet) == ("m", True, 8, True)
    b = build_parser().parse_args(["serve", "--model", "tiny", "--low_memory", "--max_batch", "4", "-v"])
    assert (b.low_memory, b.max_batch, b.verbose) == (True, 4, True)
    c = build_parser().parse_args(["--quiet", "chat", "--model_path", "m", "hi"])
    assert c.quiet is True and c.verbose is False  # a global flag before the subcommand still counts


def test_help_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, llada2uni, llada2uni.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

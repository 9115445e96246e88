import json

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
    assert main(["demo", "--output_dir", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "understand.json").read_text())
    assert result["task"] == "understand_image" and isinstance(result["answer"], str)


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["chat", "--model_path", str(tmp_path / "nope"), "hello"]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err

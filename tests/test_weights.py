import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llada2uni.weights import (CheckpointError, load_backbone, resolve_checkpoint, resolve_device,
                               resolve_dtype)

CPU = torch.device("cpu")


def _copy(tiny_dir, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(tiny_dir, dst)
    return dst


def _rewrite_shard(directory, mutate):
    """Apply ``mutate(dict)`` to the tensors of the first shard and save it back."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    with safe_open(str(directory / shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    mutate(tensors, index, shard)
    save_file(tensors, str(directory / shard))
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_loads_sharded_with_fp32_router(tiny_model):
    layer = tiny_model.model.layers[1].mlp
    assert layer.gate.weight.dtype == torch.float32
    assert layer.gate.expert_bias.dtype == torch.float32
    assert not any(p.is_meta for p in tiny_model.parameters())


def test_bf16_load_keeps_router_fp32(tiny_dir):
    m = load_backbone(tiny_dir, device=CPU, dtype=torch.bfloat16)
    assert m.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert m.model.layers[1].mlp.experts.w13.dtype == torch.bfloat16
    assert m.lm_head.weight.dtype == torch.bfloat16


def test_stacked_experts_hold_the_checkpoint_tensors(tiny_dir, tiny_model):
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    with safe_open(str(tiny_dir / index["weight_map"][name]), "pt") as f:
        up = f.get_tensor(name).float()
    i = tiny_model.config.moe_intermediate_size
    assert torch.equal(tiny_model.model.layers[2].mlp.experts.w13[5, i:], up)


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)

    def drop(tensors, index, shard):
        name = next(k for k in tensors if "attention.dense" in k)
        del tensors[name]
        del index["weight_map"][name]
        drop.name = name
    _rewrite_shard(d, drop)
    with pytest.raises(CheckpointError, match=f"missing tensor.*{drop.name.replace('.', '.')}"):
        load_backbone(d, device=CPU, dtype=torch.float32)


def test_unexpected_tensor_is_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)

    def add(tensors, index, shard):
        tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
        index["weight_map"]["model.layers.0.mlp.extra.weight"] = shard
    _rewrite_shard(d, add)
    with pytest.raises(CheckpointError, match="unexpected tensor.*model.layers.0.mlp.extra.weight"):
        load_backbone(d, device=CPU, dtype=torch.float32)


def test_misshaped_tensor_is_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)

    def reshape(tensors, index, shard):
        name = next(k for k in tensors if k.endswith("input_layernorm.weight"))
        tensors[name] = torch.ones(7)
        reshape.name = name
    _rewrite_shard(d, reshape)
    with pytest.raises(CheckpointError, match=f"{reshape.name}.*shape \\[7\\]"):
        load_backbone(d, device=CPU, dtype=torch.float32)


def test_missing_expert_bias_is_zero_filled(tiny_dir, tmp_path, caplog):
    d = _copy(tiny_dir, tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.gate.expert_bias"
    shard = index["weight_map"][name]
    with safe_open(str(d / shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != name}
    save_file(tensors, str(d / shard))
    del index["weight_map"][name]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    m = load_backbone(d, device=CPU, dtype=torch.float32)
    assert torch.count_nonzero(m.model.layers[1].mlp.gate.expert_bias) == 0
    assert "expert_bias" in caplog.text


def test_missing_shard_names_the_file(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        load_backbone(d, device=CPU, dtype=torch.float32)


def test_corrupt_index_names_the_file(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    (d / "model.safetensors.index.json").write_text('{"weight_map": [1, 2')
    with pytest.raises(CheckpointError, match="corrupt index .*model.safetensors.index.json"):
        load_backbone(d, device=CPU, dtype=torch.float32)


def test_corrupt_shard_names_the_file(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    (d / "model-00003-of-00003.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="model-00003-of-00003.safetensors"):
        load_backbone(d, device=CPU, dtype=torch.float32)


def test_offline_uncached_repo_id_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"), raising=False)
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        resolve_checkpoint("inclusionAI/LLaDA2.0-Uni")


def test_bad_local_path(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        resolve_checkpoint(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(f)


def test_unknown_device_and_dtype():
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")
    assert resolve_dtype("bf16") is torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_a_tensor_in_a_shard_but_not_in_the_index_is_refused(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    _rewrite_shard(d, lambda tensors, index, shard: tensors.__setitem__("stray.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="does not list: stray.weight"):
        load_backbone(d, device=CPU, dtype=torch.float32)


def test_an_integer_weight_is_refused_not_cast(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)

    def to_int(tensors, index, shard):
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].to(torch.int32)
    _rewrite_shard(d, to_int)
    with pytest.raises(CheckpointError, match="is I32, not a floating-point type"):
        load_backbone(d, device=CPU, dtype=torch.float32)


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", "64", "'hidden_size' must be int, got '64'"),
    ("num_hidden_layers", 3.5, "'num_hidden_layers' must be int, got 3.5"),
    ("use_qk_norm", "yes", "'use_qk_norm' must be bool"),
    ("num_experts", None, "lacks num_experts"),
])
def test_config_values_of_the_wrong_type_or_missing_are_named(tiny_dir, tmp_path, capsys, key, value, message):
    from llada2uni.cli import main
    from llada2uni.config import ConfigError
    d = _copy(tiny_dir, tmp_path)
    raw = json.loads((d / "config.json").read_text())
    if value is None:
        del raw[key]
    else:
        raw[key] = value
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message):
        load_backbone(d, device=CPU, dtype=torch.float32)
    assert main(["chat", "--model_path", str(d), "--device", "cpu", "hi"]) == 2  # a message, no traceback
    assert message.split(",")[0].strip("'") in capsys.readouterr().err


def test_unreadable_tensor_data_is_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / sorted(set(index["weight_map"].values()))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-64])  # the header intact, the last tensor's bytes cut short
    with pytest.raises(CheckpointError, match=shard.name):
        load_backbone(d, device=CPU, dtype=torch.float32)

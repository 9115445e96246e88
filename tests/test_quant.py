"""FP8 checkpoints: layout discovery, dequantization, the tiny FP8 writer and the loader."""

import json

import pytest
import torch

from llada2uni.quant import Fp8Layout, QuantError, dequantize, discover, quantizable, quantize_blockwise
from llada2uni.weights import CheckpointError, load_backbone

ATT = "model.layers.1.attention.query_key_value.weight"
EXPERT = "model.layers.1.mlp.experts.3.down_proj.weight"


def test_dequantize_block_channel_and_tensor_scales():
    w = torch.ones(3, 5).to(torch.float8_e4m3fn)
    block = dequantize(w, torch.tensor([[2.0, 3.0, 5.0], [7.0, 11.0, 13.0]]), Fp8Layout("block", (2, 2), "weight_scale_inv"))
    assert block.tolist() == [[2, 2, 3, 3, 5]] * 2 + [[7, 7, 11, 11, 13]]  # partial blocks at the edges
    channel = dequantize(w, torch.tensor([[2.0], [3.0], [4.0]]), Fp8Layout("channel", None, "weight_scale"))
    assert channel[:, 0].tolist() == [2, 3, 4]
    assert dequantize(w, torch.tensor(0.5), Fp8Layout("tensor", None, "weight_scale")).unique().tolist() == [0.5]


def test_block_quantization_round_trips_within_e4m3_precision():
    w = torch.randn(40, 72) * torch.logspace(-2, 1, 40)[:, None]  # rows of very different sizes
    q, scale = quantize_blockwise(w, (16, 32))
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 3)
    back = dequantize(q, scale, Fp8Layout("block", (16, 32), "weight_scale_inv"))
    # e4m3 keeps 3 mantissa bits: within 1/16 of each value, or of the block's smallest normal
    err = (back - w).abs()
    assert (err <= w.abs() / 16 + scale.repeat_interleave(16, 0)[:40].repeat_interleave(32, 1)[:, :72] * 2 ** -6).all()
    assert q.float().abs().amax() == torch.finfo(torch.float8_e4m3fn).max  # the block maximum hits the top


def _meta(**tensors):
    """(dtypes, shapes) of named (safetensors dtype, shape) pairs, with a bf16 router beside them."""
    tensors.setdefault("model.layers.1.mlp.gate.weight", ("F32", (16, 64)))
    return {n: d for n, (d, _) in tensors.items()}, {n: tuple(s) for n, (_, s) in tensors.items()}


def test_discover_accepts_the_plausible_layouts():
    cfg = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    inv = ATT.removesuffix("weight") + "weight_scale_inv"
    scale = ATT.removesuffix("weight") + "weight_scale"
    assert discover(None, *_meta()) is None  # a bf16 checkpoint
    assert discover(cfg, *_meta(**{ATT: ("F8_E4M3", (320, 2048)), inv: ("F32", (3, 16))})) == \
        Fp8Layout("block", (128, 128), "weight_scale_inv")
    # no quantization_config: DeepSeek-V3's default block, per-channel and per-tensor scales
    assert discover(None, *_meta(**{ATT: ("F8_E4M3", (320, 2048)), inv: ("F32", (3, 16))})).block == (128, 128)
    assert discover({"quant_method": "fbgemm_fp8"}, *_meta(**{ATT: ("F8_E4M3", (320, 2048)),
                                                              scale: ("F32", (320, 1))})).scheme == "channel"
    assert discover(None, *_meta(**{ATT: ("F8_E5M2", (320, 2048)), scale: ("BF16", ())})).scheme == "tensor"


@pytest.mark.parametrize("tensors, config, message", [
    ({ATT: ("F8_E4M3", (320, 2048))}, None, "no scale tensor"),
    ({ATT: ("F8_E4M3", (320, 2048)), ATT[:-6] + "weight_scale_inv": ("F32", (3, 8))}, None,
     "weight_scale_inv has shape [3, 8], expected [3, 16]"),
    ({"model.layers.1.mlp.gate.weight": ("F8_E4M3", (16, 64))}, None, "mlp.gate.weight is FP8"),
    ({ATT: ("BF16", (320, 2048)), ATT[:-6] + "weight_scale_inv": ("F32", (3, 16)),
      EXPERT: ("F8_E4M3", (64, 32)), EXPERT[:-6] + "weight_scale_inv": ("F32", (1, 1))}, None,
     "query_key_value.weight_scale_inv is a scale, but"),
    ({ATT: ("BF16", (320, 2048))}, {"quant_method": "gptq"}, "'gptq' is not supported"),
    ({ATT: ("BF16", (320, 2048))}, {"quant_method": "fp8"}, "no tensor is FP8"),
    ({ATT: ("F8_E4M3", (320, 2048)), ATT[:-6] + "weight_scale_inv": ("F32", (3, 16))},
     {"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
])
def test_discover_rejects_what_it_does_not_understand_naming_the_tensor(tensors, config, message):
    with pytest.raises(QuantError, match=message.replace("[", r"\[").replace("]", r"\]")):
        discover(config, *_meta(**tensors))


def test_which_tensors_may_be_fp8():
    assert all(quantizable(n) for n in (ATT, EXPERT, "model.layers.0.mlp.gate_proj.weight",
                                        "model.layers.2.mlp.shared_experts.up_proj.weight",
                                        "model.layers.0.attention.dense.weight"))
    assert not any(quantizable(n) for n in ("lm_head.weight", "model.word_embeddings.weight", "model.norm.weight",
                                            "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.expert_bias",
                                            "model.layers.1.attention.query_layernorm.weight",
                                            "model.layers.1.attention.dense.bias"))


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    from llada2uni.tiny import make_tiny
    return make_tiny(tmp_path_factory.mktemp("fp8") / "tiny", seed=0, image_side=False, fp8=(16, 16))


def test_tiny_fp8_checkpoint_loads_as_its_dequantized_weights(fp8_dir, tiny_model):
    from safetensors import safe_open

    from llada2uni.weights import shard_map
    cfg = json.loads((fp8_dir / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [16, 16]
    model = load_backbone(fp8_dir, device=torch.device("cpu"), dtype=torch.float32, quant="none")
    files = shard_map(fp8_dir)
    layout = Fp8Layout("block", (16, 16), "weight_scale_inv")
    with safe_open(str(files[EXPERT]), "pt") as f:
        w = f.get_tensor(EXPERT)
    with safe_open(str(files[EXPERT[:-6] + "weight_scale_inv"]), "pt") as f:
        s = f.get_tensor(EXPERT[:-6] + "weight_scale_inv")
    assert w.dtype == torch.float8_e4m3fn
    got = model.model.layers[1].mlp.experts.w2[3]
    assert torch.equal(got, dequantize(w, s, layout))
    ref = tiny_model.model.layers[1].mlp.experts.w2[3]  # the bf16 tiny of the same seed
    assert (got - ref).abs().max() <= ref.abs().max() / 8 and not torch.equal(got, ref)
    # high-precision tensors are the bf16 checkpoint's own
    assert torch.equal(model.lm_head.weight, tiny_model.lm_head.weight)
    assert torch.equal(model.model.layers[1].mlp.gate.weight, tiny_model.model.layers[1].mlp.gate.weight)
    # by default ("auto") the FP8 blocks stay resident as they are, scales alongside
    kept = load_backbone(fp8_dir, device=torch.device("cpu"), dtype=torch.float32)
    experts = kept.model.layers[1].mlp.experts
    assert kept.quant.name == "fp8" and kept.quant.block == (16, 16)
    assert experts.w2.dtype == torch.float8_e4m3fn and torch.equal(experts.w2[3].view(torch.uint8), w.view(torch.uint8))
    assert torch.equal(experts.w2_scale[3], s.float())


def test_the_fp8_tiny_runs_the_pipeline(fp8_dir):
    from llada2uni.pipeline import LLaDA2Uni
    pipe = LLaDA2Uni.from_pretrained(fp8_dir, device="cpu")
    out = pipe.chat([{"role": "user", "content": "Hi"}], gen_length=32, steps=8)
    assert isinstance(out, str)


def test_an_fp8_checkpoint_missing_a_scale_is_refused_by_name(fp8_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(fp8_dir, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    scale = EXPERT[:-6] + "weight_scale_inv"
    shard = broken / index["weight_map"].pop(scale)
    tensors = load_file(str(shard))
    del tensors[scale]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{EXPERT} is FP8 but {scale} is missing"):
        load_backbone(broken, device=torch.device("cpu"), dtype=torch.float32)


def test_make_tiny_fp8_from_the_command_line(tmp_path):
    from llada2uni.cli import main
    assert main(["make-tiny", str(tmp_path / "t"), "--fp8"]) == 0
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
    index = json.loads((tmp_path / "t" / "model.safetensors.index.json").read_text())["weight_map"]
    assert EXPERT[:-6] + "weight_scale_inv" in index and "lm_head.weight_scale_inv" not in index


# ---- resident quantization ----

def _logits(model, seed=0, length=40):
    from llada2uni.ops.attention import block_causal_mask
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    mask = block_causal_mask(0, length, torch.zeros(1, dtype=torch.long), 8)
    with torch.no_grad():
        return model(ids, torch.arange(length)[None], mask)


def test_resolve_mode_names_and_auto():
    from llada2uni.quant import MODES, resolve_mode
    assert resolve_mode("auto", None) is None and resolve_mode("none", Fp8Layout("block", (128, 128), "s")) is None
    auto = resolve_mode(None, Fp8Layout("block", (64, 32), "weight_scale_inv"))
    assert auto.dtype == torch.float8_e4m3fn and auto.block == (64, 32)  # the checkpoint's own blocks
    assert resolve_mode("auto", Fp8Layout("channel", None, "weight_scale")).block is None
    assert resolve_mode("INT8") is MODES["int8"]
    with pytest.raises(ValueError, match="quant must be one of"):
        resolve_mode("nf4")


@pytest.mark.parametrize("quant,dtype,bound", [("fp8", torch.float8_e4m3fn, 0.3),
                                               ("fp8-channel", torch.float8_e4m3fn, 0.4),
                                               ("int8", torch.int8, 0.1)])
def test_bf16_checkpoint_quantized_while_loading(tiny_dir, tiny_model, quant, dtype, bound):
    from llada2uni.quant import QuantLinear, quantized_bytes
    model = load_backbone(tiny_dir, device=torch.device("cpu"), dtype=torch.float32, quant=quant)
    layer = model.model.layers[1]
    assert model.quant.name == quant
    assert layer.mlp.experts.w13.dtype == dtype and layer.mlp.experts.w2_scale.dtype == torch.float32
    assert isinstance(layer.attention.query_key_value, QuantLinear)
    assert layer.attention.query_key_value.weight.dtype == dtype
    assert isinstance(model.model.layers[0].mlp.gate_proj, QuantLinear)  # the dense first layer
    # router, expert bias, LM head, embeddings and norms are untouched
    ours, theirs = model.state_dict(), tiny_model.state_dict()
    for name in ("lm_head.weight", "model.word_embeddings.weight", "model.norm.weight",
                 "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.expert_bias"):
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name])
    assert quantized_bytes(model) < quantized_bytes(tiny_model)
    ref, got = _logits(tiny_model), _logits(model)
    err = ((got - ref).norm() / ref.norm()).item()
    assert 0 < err < bound


def test_an_fp8_checkpoint_can_be_requantized_or_expanded(fp8_dir, tiny_model):
    model = load_backbone(fp8_dir, device=torch.device("cpu"), dtype=torch.float32, quant="int8")
    assert model.model.layers[1].mlp.experts.w13.dtype == torch.int8
    ref = _logits(load_backbone(fp8_dir, device=torch.device("cpu"), dtype=torch.float32, quant="none"))
    kept = _logits(load_backbone(fp8_dir, device=torch.device("cpu"), dtype=torch.float32))
    # the resident FP8 blocks compute what their dequantized weights compute
    assert torch.allclose(kept, ref, atol=1e-4, rtol=1e-4)
    assert ((_logits(model) - ref).norm() / ref.norm()) < 0.1


def test_random_backbone_quantized_is_the_bf16_one_quantized():
    from llada2uni.ops.qmm import dequantize
    from llada2uni.quant import quantize
    from llada2uni.tiny import tiny_config
    from llada2uni.weights import random_backbone
    cfg = tiny_config()
    full = random_backbone(cfg, dtype=torch.float32, seed=3)
    q = random_backbone(cfg, dtype=torch.float32, seed=3, quant="int8")
    ex, eq = full.model.layers[1].mlp.experts, q.model.layers[1].mlp.experts
    want_q, want_s = quantize(ex.w2[2], torch.int8, eq.blocks[1])
    assert torch.equal(eq.w2[2], want_q) and torch.equal(eq.w2_scale[2], want_s)
    lin = q.model.layers[1].attention.dense
    assert torch.allclose(dequantize(lin.weight, lin.weight_scale, lin.block, torch.float32),
                          full.model.layers[1].attention.dense.weight, atol=lin.weight_scale.max().item())


def test_the_pipeline_runs_on_a_quantized_backbone(tiny_dir):
    from llada2uni.pipeline import LLaDA2Uni
    pipe = LLaDA2Uni.from_pretrained(tiny_dir, device="cpu", quant="int8")
    assert pipe.model.quant.name == "int8"
    out = pipe.chat([{"role": "user", "content": "Hi"}], gen_length=32, steps=8)
    assert isinstance(out, str)

"""memory.py: groups taking turns in one arena, experts streamed through two slots, budgets."""

import pytest
import torch
from torch import nn

from llada2uni.memory import GIB, BudgetError, Held, Memory, parse_tier, place_backbone, plan_backbone, \
    streamed_layers
from llada2uni.weights import load_backbone


def _logits(model, seed=0, length=40):
    from llada2uni.ops.attention import block_causal_mask
    ids = torch.randint(0, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))
    pads = torch.tensor([0, 3])
    mask = block_causal_mask(0, length, pads, 8)
    from llada2uni.ops.attention import rope_positions
    with torch.no_grad():
        return model(ids, rope_positions(0, length, pads), mask)


def _bytes(module):
    from llada2uni.memory import footprint
    return footprint(module)


def _memory(nbytes):
    return Memory(nbytes / GIB, "cpu", reserve_gib=0)


def test_parse_tier_names():
    assert parse_tier(None) is None and parse_tier("80") is None and parse_tier("full") is None
    assert parse_tier("24") == 24 and parse_tier(16) == 16 and parse_tier("12GB") == 12
    with pytest.raises(ValueError, match="memory must be one of"):
        parse_tier("lots")
    with pytest.raises(ValueError, match="out of range"):
        parse_tier("1")


def test_groups_take_turns_and_keep_their_addresses(tiny_dir):
    model = load_backbone(tiny_dir, device=torch.device("cpu"), dtype=torch.float32)
    want = _logits(model)
    other = nn.Linear(64, 64)
    x = torch.randn(3, 64)
    other_want = other(x)
    mem = _memory(_bytes(model) + 4096)
    assert place_backbone(mem, model) is None  # it fits: nothing streams
    mem.add("other", other)  # the arena is shared: adding it overwrote the backbone's bytes
    assert mem.resident == "other"
    ptr = model.lm_head.weight.data_ptr()
    assert ptr - mem.arena.data_ptr() < mem.arena.numel()  # a view of the arena
    with mem.hold("backbone"):
        assert torch.equal(_logits(model), want)
    with mem.hold("other"):
        assert torch.allclose(other(x), other_want)
    with mem.hold("backbone"):
        assert torch.equal(_logits(model), want)
        assert model.lm_head.weight.data_ptr() == ptr  # same address: graphs over it stay valid
    assert mem.swaps == 5  # two adds, three switches
    assert mem.stats()["groups"].keys() == {"backbone", "other"}


def test_a_group_over_the_budget_is_refused_by_name(tiny_dir):
    model = load_backbone(tiny_dir, device=torch.device("cpu"), dtype=torch.float32)
    mem = _memory(_bytes(model) + 4096)
    with pytest.raises(BudgetError, match="big needs"):
        mem.add("big", nn.Linear(4096, 4096))
    assert "big" not in mem.groups


def _five():
    import dataclasses

    from llada2uni.tiny import tiny_config
    from llada2uni.weights import random_backbone
    model = random_backbone(dataclasses.replace(tiny_config(), num_hidden_layers=5), dtype=torch.float32, seed=1)
    moe = [m for m in model.modules() if hasattr(m, "experts")]
    assert len(moe) == 4
    return model, sum(t.numel() * t.element_size() for t in (moe[0].experts.w13, moe[0].experts.w2))


def test_streamed_experts_compute_the_resident_result():
    model, per = _five()
    want = _logits(model)
    mem = _memory(_bytes(model) - per // 2)  # just too small: two layers share one slot
    assert plan_backbone(model, mem.capacity) == 2
    stream = place_backbone(mem, model)
    assert stream is not None and streamed_layers(model) == 2 and len(stream.slots) == 1
    assert torch.equal(_logits(model), want)  # the first forward also prefetches the next one's first
    copies = stream.copies
    assert torch.equal(_logits(model, seed=1), _logits(model, seed=1))
    assert stream.copies - copies == 4  # then each streamed layer is copied once per forward
    mem.add("other", nn.Linear(8, 8))  # overwrites the slot
    with mem.hold("backbone"):
        assert torch.equal(_logits(model), want)
    # the budget is met: the arena holds the resident part and one slot, not every expert
    assert mem.arena.numel() <= mem.capacity < _bytes(model)


def test_the_plan_streams_the_fewest_layers_spread_out():
    from llada2uni.memory import spread
    model, per = _five()
    total = _bytes(model)
    assert plan_backbone(model, _memory(total).capacity) == 0
    assert plan_backbone(model, _memory(total - per).capacity) == 2
    assert plan_backbone(model, _memory(total - 2 * per).capacity) == 3
    assert plan_backbone(model, _memory(total - 3 * per).capacity) == 4
    assert spread(19, 7) == [1, 4, 6, 9, 12, 14, 17] and spread(4, 4) == [0, 1, 2, 3]


def test_a_budget_below_the_non_expert_part_is_refused(tiny_dir):
    model = load_backbone(tiny_dir, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(BudgetError, match="every expert streamed"):
        plan_backbone(model, 1024)


def test_held_calls_hold_their_group():
    mem = _memory(1 << 20)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    mem.add("a", a)
    mem.add("b", b)
    seen = []
    fn = Held(lambda: seen.append(mem.resident), mem, "a")
    fn.flag = 3  # attributes pass through to the wrapped callable
    fn()
    assert seen == ["a"] and mem.resident == "a"


# ---- the pipeline under a budget (CPU "device": the same arena logic, no pinned memory) ----

def _pipe(tiny_dir, **kw):
    from llada2uni.pipeline import LLaDA2Uni
    return LLaDA2Uni.from_pretrained(tiny_dir, device="cpu", dtype="float32", **kw)


def test_a_pipeline_with_streamed_experts_answers_as_the_resident_one(tiny_dir):
    resident = _pipe(tiny_dir, quant="int8")
    # the tiny backbone's tensors less a byte: the experts of its MoE layers must stream
    mem = _memory(_bytes(resident.model) - 1)
    pipe = _pipe(tiny_dir, quant="int8", memory=mem)
    assert pipe.memory is mem and streamed_layers(pipe.model) == 2
    assert mem.stats()["groups"].keys() == {"backbone"}
    for p in (resident, pipe):
        p.answers = [p.chat("Hello there", steps=8, gen_length=32, seed=0),
                     p.chat("And again", steps=4, gen_length=16, seed=1)]
    assert pipe.answers == resident.answers


def test_backbone_encoder_and_decoder_take_turns_with_the_resident_results(tiny_dir):
    from PIL import Image
    resident = _pipe(tiny_dir, decoder_quant="fp8")
    mem = _memory(2 * _bytes(resident.image_decoder.dit("turbo")))  # any one part fits, not all at once
    pipe = _pipe(tiny_dir, decoder_quant="fp8", memory=mem)
    picture = Image.new("RGB", (128, 96), (200, 30, 30))
    out = {}
    for name, p in (("resident", resident), ("budget", pipe)):
        t2i = p.generate_image("a red square", 128, 128, steps=4, seed=0)
        image = p.decode_tokens(t2i["token_ids"], t2i["h"], t2i["w"], mode="turbo", seed=0)
        tokens = p.encode_image(picture)
        answer = p.understand_image(picture, question="What?", steps=4, gen_length=8)
        again = p.decode_tokens(t2i["token_ids"], t2i["h"], t2i["w"], mode="turbo", seed=0)
        out[name] = (t2i["token_ids"], image.tobytes(), tokens, answer, again.tobytes())
    assert out["budget"] == out["resident"]
    stats = mem.stats()
    assert stats["groups"].keys() == {"backbone", "dit-turbo", "encoder"}
    assert stats["arena_gib"] * GIB < _bytes(pipe.model) + _bytes(pipe.image_decoder.dit("turbo"))
    # adds: backbone, dit (first decode), encoder; then back to the backbone and to the dit
    assert mem.swaps == 5
    from llada2uni.quant import QuantLinear
    assert any(isinstance(m, QuantLinear) for m in pipe.image_decoder.dit("turbo").modules())


def test_memory_option_validation(tiny_dir):
    with pytest.raises(ValueError, match="memory must be one of"):
        _pipe(tiny_dir, memory="lots")
    with pytest.raises(ValueError, match="decoder_quant must be one of"):
        _pipe(tiny_dir, decoder_quant="nf4")
    assert _pipe(tiny_dir, memory="24").memory is None  # a GPU budget: nothing to do on the CPU
    with pytest.raises(BudgetError, match="backbone needs"):
        _pipe(tiny_dir, memory=_memory(4096))


@pytest.mark.gpu
@pytest.mark.parametrize("stream", [False, True])
def test_fast_path_under_a_budget_matches_the_resident_fast_path_on_gpu(tiny_dir, stream):
    """CUDA graphs captured over the arena survive the DiT using it in between; streamed experts
    (compiled step, no graphs) give the resident result."""
    from llada2uni.pipeline import LLaDA2Uni
    kw = dict(device="cuda", dtype="bfloat16", quant="fp8", decoder_quant="fp8")
    resident = LLaDA2Uni.from_pretrained(tiny_dir, **kw)
    need = _bytes(resident.model) - 1 if stream else 2 * max(_bytes(resident.model),
                                                             _bytes(resident.image_decoder.dit("turbo")))
    pipe = LLaDA2Uni.from_pretrained(tiny_dir, memory=Memory(need / GIB, "cuda", reserve_gib=0), **kw)
    if stream:  # the tiny DiT is larger than the tiny backbone: it stays resident beside the arena
        pipe.image_decoder.memory = None
    assert (streamed_layers(pipe.model) > 0) == stream
    out = {}
    for name, p in (("resident", resident), ("budget", pipe)):
        a = p.chat("Hello there", steps=8, gen_length=32, seed=0)
        t2i = p.generate_image("a red square", 128, 128, steps=4, seed=0)
        image = p.decode_tokens(t2i["token_ids"], t2i["h"], t2i["w"], mode="turbo", seed=0)
        b = p.chat("Hello there", steps=8, gen_length=32, seed=0)  # after the DiT used the arena
        out[name] = (a, t2i["token_ids"], b, image.size)
    assert out["budget"] == out["resident"]


def test_a_full_precision_decoder_under_a_budget_decodes_as_the_resident_one(tiny_dir):
    resident = _pipe(tiny_dir)
    mem = _memory(2 * _bytes(resident.image_decoder.dit("turbo")))
    pipe = _pipe(tiny_dir, memory=mem)
    codes = list(range(16))
    want = resident.decode_tokens(codes, 4, 4, seed=0).tobytes()
    assert pipe.decode_tokens(codes, 4, 4, seed=0).tobytes() == want
    pipe.chat("hi", steps=2, gen_length=8)  # the backbone takes the arena back
    assert pipe.decode_tokens(codes, 4, 4, seed=0).tobytes() == want
    assert mem.stats()["groups"].keys() == {"backbone", "dit-turbo"}

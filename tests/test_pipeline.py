"""End to end on the tiny checkpoint: make-tiny -> from_pretrained -> understand_image / chat."""

import pytest
import torch

from llada2uni.pipeline import LLaDA2Uni
from llada2uni.sampling.block import DenoiseRequest, generate
from llada2uni.sampling.guidance import Guidance
from llada2uni.tokens import TokenError, align_rows


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return LLaDA2Uni.from_pretrained(tiny_dir, device="cpu", dtype="float32")


def _image(pipe, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, pipe.config.image_vocab_size, (h * w,), generator=g)
    return (codes + pipe.image_token_offset).tolist()


def test_round_trip_understand(pipe):
    answer = pipe.understand_image(_image(pipe, 4, 5), 4, 5, question="What is this?", steps=8,
                                   gen_length=40)
    assert isinstance(answer, str)
    again = pipe.understand_image(_image(pipe, 4, 5), 4, 5, question="What is this?", steps=8,
                                  gen_length=40)
    assert answer == again  # greedy decoding is deterministic


def test_multi_image_and_chat(pipe):
    a, b = _image(pipe, 2, 3, 1), _image(pipe, 3, 2, 2)
    assert isinstance(pipe.understand_image([a, b], [2, 3], [3, 2], question="Compare.", steps=4,
                                            gen_length=16), str)
    assert isinstance(pipe.chat("Hello there", steps=4, gen_length=16), str)


def test_cached_equals_uncached_generation(pipe):
    prompt = pipe.tokens.understand_prompt([(_image(pipe, 3, 3), 3, 3)], "Describe.")
    rows, pads = align_rows([prompt], pipe.tokens.ids.mask)
    outs = []
    for use_cache in (True, False):
        req = DenoiseRequest(rows=rows, pad_lens=pads, gen_length=70, steps=8, threshold=0.3)
        outs.append(generate(pipe.logits_fn, [req], mask_id=pipe.tokens.ids.mask, use_cache=use_cache))
    assert outs[0].tokens == outs[1].tokens
    assert outs[0].forwards == outs[1].forwards


def test_cfg_scale_one_equals_no_cfg(pipe):
    cond, uncond = pipe.tokens.t2i_prompts("a red cube", 2, 3)
    rows, pads = align_rows([cond, uncond], pipe.tokens.ids.mask)
    lo, hi = pipe.image_token_offset, pipe.config.vocab_size
    cfg = DenoiseRequest(rows=rows, pad_lens=pads, gen_length=6, steps=3, vocab=(lo, hi),
                         guidance=Guidance(kind="simple", scale=1.0))
    plain = DenoiseRequest(rows=[cond], pad_lens=[0], gen_length=6, steps=3, vocab=(lo, hi))
    mask = pipe.tokens.ids.mask
    a = generate(pipe.logits_fn, [cfg], mask_id=mask).tokens[0]
    b = generate(pipe.logits_fn, [plain], mask_id=mask).tokens[0]
    assert a == b and all(lo <= t < hi for t in a)
    c = generate(pipe.logits_fn, [DenoiseRequest(rows=rows, pad_lens=pads, gen_length=6, steps=3,
                 vocab=(lo, hi), guidance=Guidance(kind="simple", scale=4.0))], mask_id=mask).tokens[0]
    assert c != a  # guidance does something on this seed


def test_block_padded_request_equals_unpadded(pipe):
    # Left-padding a whole block keeps every token's block and position: same tokens.
    prompt = pipe.tokens.understand_prompt([(_image(pipe, 2, 2), 2, 2)], "Hi")
    mask = pipe.tokens.ids.mask
    plain = DenoiseRequest(rows=[prompt], pad_lens=[0], gen_length=40, steps=4)
    padded = DenoiseRequest(rows=[[mask] * 32 + prompt], pad_lens=[32], gen_length=40, steps=4)
    a = generate(pipe.logits_fn, [plain], mask_id=mask).tokens[0]
    b = generate(pipe.logits_fn, [padded], mask_id=mask).tokens[0]
    both = generate(pipe.logits_fn, [plain, padded], mask_id=mask).tokens
    assert a == b == both[0] == both[1]


def test_prompt_too_long_fails_before_compute(pipe, monkeypatch):
    import llada2uni.pipeline as pl
    calls = []
    monkeypatch.setattr(pl, "generate", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="exceeds the model's context of 4096"):
        pipe.understand_image(_image(pipe, 4, 4), 4, 4, question="x", gen_length=5000)
    assert not calls


def test_bad_image_tokens(pipe):
    raw_codes = [1, 2, 3, 4]
    with pytest.raises(TokenError):
        pipe.understand_image(raw_codes, 2, 2, question="x")  # codes without the offset
    with pytest.raises(TokenError):
        pipe.understand_image(_image(pipe, 2, 2), 3, 2, question="x")  # count != h*w
    with pytest.raises(TokenError):
        pipe.understand_image([pipe.config.vocab_size] * 4, 2, 2, question="x")  # past the vocab
    with pytest.raises(TokenError, match="h and w"):
        pipe.understand_image(_image(pipe, 2, 2), question="x")


def test_bad_device_and_dtype(tiny_dir):
    with pytest.raises(ValueError, match="unknown device"):
        LLaDA2Uni.from_pretrained(tiny_dir, device="tpu9")
    with pytest.raises(ValueError, match="unknown dtype"):
        LLaDA2Uni.from_pretrained(tiny_dir, device="cpu", dtype="int3")


def test_round_trip_image_codes_image(pipe):
    from PIL import Image
    picture = Image.new("RGB", (256, 192), (200, 30, 30))
    tokens, h, w = pipe.encode_image(picture)
    assert (h, w) == (192 // 16, 256 // 16) and len(tokens) == h * w
    assert all(pipe.tokens.ids.is_image(t) for t in tokens)
    codes = [t - pipe.image_token_offset for t in tokens]
    image = pipe.decode_tokens(codes, h, w, mode="turbo", seed=0)
    assert image.size == (w * 16 * 2, h * 16 * 2) and image.mode == "RGB"
    again = pipe.decode_tokens(codes, h, w, mode="turbo", seed=0)
    assert image.tobytes() == again.tobytes()
    small = pipe.decode_tokens(codes, h, w, mode="normal", steps=3, resolution_multiplier=1, seed=0)
    assert small.size == (w * 16, h * 16)


def test_understand_and_edit_accept_pictures(pipe):
    from PIL import Image
    picture = Image.new("RGBA", (128, 96), (10, 200, 30, 128))
    assert isinstance(pipe.understand_image(picture, question="What?", steps=4, gen_length=8), str)
    r = pipe.edit_image(picture, instruction="make it red", steps=4)
    # the output grid equals the source grid (edit crop of the source)
    src, h, w = pipe.encode_image(picture, mode="edit")
    assert (r["h"], r["w"]) == (h, w) and len(r["token_ids"]) == h * w


def test_block_length_reaches_the_attention_mask(pipe):
    # A block length other than 32 must change the mask the backbone sees, not only the sampler.
    prompt = pipe.tokens.understand_prompt([(_image(pipe, 2, 2), 2, 2)], "Hi")
    mask = pipe.tokens.ids.mask
    from llada2uni.pipeline import BackboneLogits
    ref = BackboneLogits(pipe.model, 16)
    expected = generate(ref, [DenoiseRequest(rows=[prompt], pad_lens=[0], gen_length=40, steps=4)],
                        mask_id=mask, block_length=16).tokens[0]
    got = pipe._denoise_text(prompt, gen_length=40, steps=4, block_length=16, threshold=0.95,
                             temperature=0.0, seed=None, stop_ids=frozenset())
    pipe.logits_fn.block_length = 32
    assert got == expected


def _understanding_and_a_late_t2i(pipe):
    """(mask id, a running understanding request, a T2I request with CFG rows that joins it)."""
    mask = pipe.tokens.ids.mask
    first = DenoiseRequest(rows=[pipe.tokens.understand_prompt([(_image(pipe, 2, 2), 2, 2)], "Hi")],
                           pad_lens=[0], gen_length=120, steps=4)
    cond, uncond = pipe.tokens.t2i_prompts("a red cube", 2, 3)
    rows, pads = align_rows([cond, uncond], mask)
    lo, hi = pipe.image_token_offset, pipe.config.vocab_size
    late = DenoiseRequest(rows=rows, pad_lens=pads, gen_length=6, steps=3, vocab=(lo, hi),
                          guidance=Guidance(kind="simple", scale=3.0))
    return mask, first, late


def test_joining_a_running_batch_is_exact_on_the_backbone(pipe):
    # Whole-block left padding + a prefill of the newcomer's rows: same tokens as decoding it alone.
    mask, first, late = _understanding_and_a_late_t2i(pipe)
    calls = []

    def admit(block, length, fits=None):
        if fits is not None:  # at block boundaries only
            return []
        calls.append(block)
        return [late] if len(calls) == 3 else []
    out = generate(pipe.logits_fn, [first], mask_id=mask, admit=admit)
    assert len(out.tokens) == 2
    alone = [generate(pipe.logits_fn, [r], mask_id=mask).tokens[0] for r in (first, late)]
    assert out.tokens == alone


def test_joining_in_the_middle_of_a_block_is_exact_on_the_backbone(pipe):
    # A T2I request joins between steps 1 and 2 of a block of the running understanding request (its
    # prefill covers the finished blocks; it counts its own steps): same tokens as decoding it alone.
    mask, first, late = _understanding_and_a_late_t2i(pipe)
    joined = []

    def admit(block, length, fits=None):
        if fits is None or joined or block < 2 or not fits(late):
            return []
        joined.append(block)
        return [late]
    out = generate(pipe.logits_fn, [first], mask_id=mask, admit=admit)
    assert joined and len(out.tokens) == 2 and max(out.steps_per_block) <= 4
    alone = [generate(pipe.logits_fn, [r], mask_id=mask).tokens[0] for r in (first, late)]
    assert out.tokens == alone


@pytest.mark.parametrize("call, message", [
    (lambda p: p.generate_image("a", 64, 64, cfg_scale=float("nan"), steps=2), "cfg_scale must be a finite"),
    (lambda p: p.generate_image("a", 64, 64, cfg_scale=float("inf"), steps=2), "cfg_scale must be a finite"),
    (lambda p: p.edit_image([p.image_token_offset] * 4, 2, 2, "x", cfg_text_scale=float("nan"),
                            cfg_image_scale=float("nan")), "cfg_text_scale must be a finite"),
    (lambda p: p.chat("hi", temperature=-1, steps=2, gen_length=8), "temperature must be a finite number >= 0"),
    (lambda p: p.chat("hi", temperature=float("nan"), steps=2, gen_length=8), "temperature must be"),
    (lambda p: p.generate_image([], 64, 64), "needs a prompt, or a non-empty list"),
    (lambda p: p.chat([{"role": "user", "content": None}]), "content must be a string or a list"),
    (lambda p: p.chat([]), "non-empty list"),
    (lambda p: p.understand_image([], question="q"), "needs an image"),
])
def test_bad_numbers_and_empty_inputs_are_named(pipe, call, message):
    with pytest.raises(ValueError, match=message):
        call(pipe)

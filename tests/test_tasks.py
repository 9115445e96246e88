"""The tasks at token level: generate_image (normal, thinking), edit_image, interleave.

Prompt layouts are pinned id-by-id in test_tokens.py; here we check what each task feeds the sampler
(rows, alignment, guidance, schedule) and what it returns, with the tiny model or a scripted mock.
"""

import pytest
import torch

from llada2uni.pipeline import LLaDA2Uni
from llada2uni.sampling import block as block_mod
from llada2uni.tiny import TINY_IMAGE_OFFSET
from llada2uni.tokens import TokenError


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return LLaDA2Uni.from_pretrained(tiny_dir, device="cpu", dtype="float32")


@pytest.fixture
def captured(monkeypatch):
    """Record every DenoiseRequest the pipeline hands to the sampler."""
    seen = []
    real = block_mod.generate

    def spy(logits_fn, requests, **kw):
        seen.append((requests, kw))
        return real(logits_fn, requests, **kw)
    import llada2uni.pipeline as pl
    monkeypatch.setattr(pl, "generate", spy)
    return seen


def _image(pipe, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, pipe.config.image_vocab_size, (h * w,), generator=g) + pipe.image_token_offset).tolist()


def test_generate_image_returns_codes_and_grid(pipe, captured):
    r = pipe.generate_image("a red cube", 128, 96, steps=4, cfg_scale=3.0, seed=0)
    assert set(r) == {"token_ids", "h", "w"}
    assert (r["h"], r["w"]) == (4, 3) and len(r["token_ids"]) == 12
    assert all(isinstance(t, int) and 0 <= t < pipe.config.image_vocab_size for t in r["token_ids"])
    (req,), kw = captured[0]
    cond, uncond = pipe.tokens.t2i_prompts("a red cube", 4, 3)
    # "<uncondition>" is several text tokens, so this short prompt's uncond row is the longer one:
    # the official cuts it on the left and keeps the conditional layout
    assert len(uncond) > len(cond)
    assert req.rows == [cond, uncond[len(uncond) - len(cond):]] and req.pad_lens == [0, 0]
    assert req.guidance.kind == "simple" and req.guidance.scale == 3.0 and req.guidance.rescale == 0.7
    assert req.vocab == (pipe.image_token_offset, pipe.config.vocab_size)
    assert req.steps == 4 and req.gen_length == 12 and kw["block_length"] == 32


def test_cfg_scale_one_runs_one_row(pipe, captured):
    pipe.generate_image("x", 64, 64, steps=2, cfg_scale=1.0)
    (req,), _ = captured[0]
    assert len(req.rows) == 1 and req.guidance.kind == "none"
    pipe.generate_image("x", 64, 64, steps=2, cfg_scale=0.5)  # below 1 still guides, as the official
    (req,), _ = captured[1]
    assert len(req.rows) == 2 and req.guidance.scale == 0.5


def test_official_defaults_and_sizes(pipe, captured):
    r = pipe.generate_image("a boat at sea", 100, 200)  # not multiples of 32: grid = side // 2 // 16
    assert (r["h"], r["w"]) == (3, 6)
    (req,), _ = captured[0]
    assert req.steps == 16 and req.guidance.scale == 4.0 and req.guidance.rescale == 0.7
    with pytest.raises(ValueError, match="multiple of 32"):
        pipe.generate_image("a boat", 100, 192, strict_sizes=True)
    # steps are clamped to gen_length // minimal_topk (the official canvas for T2I, h*w for edits)
    pipe.generate_image("a boat", 64, 64, steps=40, gen_length=20, minimal_topk=2)
    assert captured[1][0][0].steps == 10
    pipe.edit_image(_image(pipe, 2, 2), image_h=2, image_w=2, instruction="blue")  # official names
    (req,), _ = captured[2]
    assert req.steps == 4 and req.guidance.rescale == 0.7  # 8 steps clamped to the 4 codes
    with pytest.raises(ValueError, match="disagree"):
        pipe.edit_image(_image(pipe, 2, 2), 2, 2, "blue", image_h=3)


def test_same_seed_same_tokens(pipe):
    a = pipe.generate_image("a tree", 64, 64, steps=2, temperature=1.0, seed=7)
    b = pipe.generate_image("a tree", 64, 64, steps=2, temperature=1.0, seed=7)
    c = pipe.generate_image("a tree", 64, 64, steps=2, temperature=1.0, seed=8)
    assert a == b and a != c


def test_batch_of_prompts_equals_one_by_one(pipe):
    batch = pipe.generate_image(["a tree", "a red car on a road"], 64, 96, steps=2)
    single = [pipe.generate_image(p, 64, 96, steps=2) for p in ["a tree", "a red car on a road"]]
    assert batch == single


def test_thinking_stops_at_boi_and_image_starts_from_it(pipe, captured, monkeypatch):
    # Script phase 1: the model writes "ok", a header of a DIFFERENT size, then <boi>.
    ids = pipe.tokens.ids
    written = pipe.tokens.encode("ok") + [ids.soi, pipe.tokens.reserved_id(5), pipe.tokens.reserved_id(5), ids.boi]
    import llada2uni.pipeline as pl
    real = pl.LLaDA2Uni._denoise_text

    def scripted(self, prompt, **kw):
        assert kw["stop_ids"] == frozenset({ids.boi, ids.eos})
        assert kw["steps"] == 16 and kw["gen_length"] == 100 and kw["temperature"] == 0.3
        return written
    monkeypatch.setattr(pl.LLaDA2Uni, "_denoise_text", scripted)
    r = pipe.generate_image("a cat", 64, 96, steps=2, mode="thinking", thinking_steps=16, thinking_gen_length=100,
                            thinking_temperature=0.3)
    monkeypatch.setattr(pl.LLaDA2Uni, "_denoise_text", real)
    assert r["thinking"] == "ok" and (r["h"], r["w"]) == (2, 3) and len(r["token_ids"]) == 6
    (req,), _ = captured[-1]
    # the official: phase 2 continues phase 1 verbatim through <boi> (the model's 5x5 header stays);
    # the requested 2x3 grid is what gets generated
    assert req.rows[0] == pipe.tokens.thinking_prompt("a cat") + written and req.gen_length == 6
    monkeypatch.setattr(pl.LLaDA2Uni, "_denoise_text", lambda self, prompt, **kw: pipe.tokens.encode("no"))
    with pytest.raises(TokenError, match="<boi>"):
        pipe.generate_image("a cat", 64, 96, mode="thinking")


def test_edit_output_grid_is_source_grid(pipe, captured):
    src = _image(pipe, 3, 4)
    r = pipe.edit_image(src, 3, 4, "make it blue", steps=2)
    assert (r["h"], r["w"]) == (3, 4) and len(r["token_ids"]) == 12
    (req,), _ = captured[0]
    assert len(req.rows) == 2 and req.guidance.kind == "edit" and req.guidance.text_scale == 4.0
    r = pipe.edit_image(src, 3, 4, "make it blue", steps=2, cfg_image_scale=1.5)
    (req,), _ = captured[1]
    assert len(req.rows) == 3 and req.guidance.image_scale == 1.5


def test_multi_reference_edit(pipe, captured):
    a, b = _image(pipe, 2, 2, 1), _image(pipe, 3, 2, 2)
    r = pipe.edit_image([a, b], [2, 3], [2, 2], "combine them", steps=2, cfg_image_scale=1.0)
    assert (r["h"], r["w"]) == (2, 2)  # first reference's grid
    (req,), _ = captured[0]
    assert req.rows[0][-4 - 0:] == pipe.tokens.image_header(2, 2)
    expected = pipe.tokens.edit_prompts([(a, 2, 2), (b, 3, 2)], "combine them", 2, 2, image_guidance=True)
    assert req.rows[0] == expected[0]
    for row, pad, want in zip(req.rows[1:], req.pad_lens[1:], expected[1:]):  # aligned to the cond row
        assert row[pad:] == want[max(0, len(want) - len(row)):]
    r = pipe.edit_image([a, b], [2, 3], [2, 2], "combine", output_h=1, output_w=3, steps=2)
    assert (r["h"], r["w"]) == (1, 3)


class Scripted:
    """A mock logits_fn: at logical position p (phys - pad) of each row it predicts script[p] with a
    peak, else a filler text token; a weaker peak on an image id makes image canvases well defined."""

    def __init__(self, vocab, script, filler, image_offset, image_codes):
        self.vocab, self.script, self.filler = vocab, script, filler
        self.offset, self.codes = image_offset, image_codes

    def __call__(self, ids, start, pad_lens, cache, num_logits):
        r, t = ids.shape
        end = start + t
        out = torch.zeros(r, num_logits, self.vocab)
        for row in range(r):
            for j, phys in enumerate(range(end - num_logits, end)):
                p = phys - int(pad_lens[row])
                out[row, j, self.script.get(p, self.filler)] = 30.0
                out[row, j, self.offset + p % self.codes] = 20.0
        return out


def test_interleave_parses_model_written_headers(pipe, monkeypatch):
    tk = pipe.tokens
    ids = tk.ids
    prompt = tk.interleave_prompt("story")
    lp = len(prompt)
    text1 = tk.encode("Hi") + tk.image_header(2, 2)
    script = {lp + i: t for i, t in enumerate(text1)}
    img1_start = lp + len(text1)
    after1 = img1_start + 4 + 1  # 4 codes + <|/image|>
    text2 = tk.encode("Yo") + tk.image_header(1, 3)
    script.update({after1 + i: t for i, t in enumerate(text2)})
    after2 = after1 + len(text2) + 3 + 1
    script.update({after2: ids.eos})
    mock = Scripted(pipe.config.vocab_size, script, tk.encode("z")[0], pipe.image_token_offset,
                    pipe.config.image_vocab_size)
    monkeypatch.setattr(pipe, "logits_fn", mock)
    segs = pipe.interleave("story", max_frames=5, text_gen_length=40, steps=4, image_steps=2)
    assert [s["type"] for s in segs] == ["text", "image", "text", "image"]
    assert segs[0]["text"] == "Hi" and segs[2]["text"] == "Yo"
    assert (segs[1]["h"], segs[1]["w"]) == (2, 2) and len(segs[1]["token_ids"]) == 4
    assert (segs[3]["h"], segs[3]["w"]) == (1, 3) and len(segs[3]["token_ids"]) == 3
    # image codes follow the conditional row's image peak at their logical positions (CFG amplifies it)
    k = pipe.config.image_vocab_size
    assert segs[1]["token_ids"] == [(img1_start + i) % k for i in range(4)]
    # max_frames caps the images
    segs = pipe.interleave("story", max_frames=1, text_gen_length=40, steps=4, image_steps=2)
    assert [s["type"] for s in segs] == ["text", "image", "text"]


@pytest.mark.parametrize("call, message", [
    (lambda p: p.generate_image("", 64, 64), "non-empty"),
    (lambda p: p.generate_image("x", 20, 64), ">= 32"),
    (lambda p: p.generate_image("x", 100, 64, strict_sizes=True), "multiple of 32"),
    (lambda p: p.generate_image("x", 64, 64, steps=0), "steps"),
    (lambda p: p.generate_image("x", 64, 64, cfg_scale=float("nan")), "cfg_scale"),
    (lambda p: p.generate_image("x", 64, 64, cfg_rescale=1.5), "cfg_rescale"),
    (lambda p: p.generate_image("x", 64, 64, mode="fast"), "mode"),
    (lambda p: p.generate_image("x", 4096, 4096), "reserved token"),
    (lambda p: p.generate_image("x", 64, 64, mode="thinking", thinking_gen_length=5000), "context"),
    (lambda p: p.edit_image(None, 2, 2, "x"), "source image"),
    (lambda p: p.edit_image([], 2, 2, "x"), "source image"),
    (lambda p: p.edit_image([TINY_IMAGE_OFFSET] * 4, 2, 2, ""), "instruction"),
    (lambda p: p.edit_image([TINY_IMAGE_OFFSET] * 4, 2, 2, "x", cfg_image_scale=float("inf")), "cfg_image_scale"),
    (lambda p: p.edit_image([[TINY_IMAGE_OFFSET] * 1600] * 3, [40] * 3, [40] * 3, "x"), "context"),
    (lambda p: p.interleave(""), "non-empty"),
])
def test_bad_input_fails_before_compute(pipe, monkeypatch, call, message):
    import llada2uni.pipeline as pl
    monkeypatch.setattr(pl, "generate", lambda *a, **k: pytest.fail("sampler reached"))
    with pytest.raises(ValueError, match=message):
        call(pipe)

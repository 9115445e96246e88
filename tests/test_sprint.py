"""SPRINT (spec 6): adaptive unmasking, prefix reuse, pruning, fallback; mocks and the tiny model on CPU."""

import logging
import math

import pytest
import torch

from llada2uni.cli import build_parser
from llada2uni.ops.attention import block_causal_mask, rope_positions
from llada2uni.pipeline import LLaDA2Uni
from llada2uni.sampling.block import DenoiseRequest, generate
from llada2uni.sampling.guidance import Guidance
from llada2uni.sampling.sprint import Sprint, adaptive_k, keep_counts, keep_mask, max_prob, pins
from llada2uni.sampling.unmask import select_transfer, sprint_scores
from llada2uni.tokens import align_rows

V = 48
MASK = V - 1
B = 8


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return LLaDA2Uni.from_pretrained(tiny_dir, device="cpu", dtype="float32")


class PeakedModel:
    """Peaked logits: position p predicts 1 + p % 5. "Easy" positions (p % 4 != 0) put ~all the
    probability on it; "hard" ones split it evenly between two tokens (top-1 probability ~0.5)."""

    def __call__(self, ids, start, pad_lens, cache, num_logits):
        end = start + ids.shape[1]
        logits = torch.zeros(ids.shape[0], num_logits, V)
        for j, p in enumerate(range(end - num_logits, end)):
            logits[:, j, 1 + p % 5] = 30.0
            if p % 4 == 0:
                logits[:, j, 6 + p % 5] = 30.0
        return logits


class Recorder:
    """Wraps a logits_fn; records every window and the SPRINT view of the cache it ran under."""

    sprint_views = True

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def new_cache(self, rows, max_len):
        self.cache = self.inner.new_cache(rows, max_len)
        return self.cache

    def __call__(self, ids, start, pad_lens, cache, num_logits):
        view = cache.view
        snap = None
        if view is not None:
            # the kept keys in the compact buffer are the full cache's keys at those positions, per layer
            idx = view.idx
            for layer in range(cache.k.shape[0]):
                for r in range(idx.shape[1]):
                    assert torch.equal(view.k[layer, r, :, : view.kept], cache.k[layer, r, :, idx[layer, r]])
            snap = (idx.clone(), view.valid.clone())
        self.calls.append((start, ids.shape[1], num_logits, snap))
        return self.inner(ids, start, pad_lens, cache, num_logits)


def _image(pipe, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, pipe.config.image_vocab_size, (h * w,), generator=g) + pipe.image_token_offset).tolist()


def _aligned(pipe, prompt, block=32):
    """Left-pad a prompt with masks to a block multiple: no prompt-tail block."""
    pad = -len(prompt) % block
    return [pipe.tokens.ids.mask] * pad + prompt, pad


# ---- pure pieces ----


def test_sprint_params():
    s = Sprint()
    assert (s.keep_ratio, s.cache_warmup_steps, s.confidence_alpha, s.remasking) == (0.7, 2, 0.5, "low_confidence")
    # the official pinning: text when text_keep_ratio is None or >= 1, image only when >= 1
    assert s.pin_text and not s.pin_image
    assert not Sprint(text_keep_ratio=0.5).pin_text and Sprint(text_keep_ratio=1.0).pin_text
    assert Sprint(image_keep_ratio=1.0).pin_image and not Sprint(image_keep_ratio=0.9).pin_image
    assert Sprint(confidence_alpha=3.0).alpha == 1.0 and Sprint(confidence_alpha=-1.0).alpha == 0.0
    Sprint(remasking="random")
    for bad in ({"text_keep_ratio": -0.1}, {"cache_warmup_steps": -1}, {"remasking": "bogus"}):
        with pytest.raises(ValueError):
            Sprint(**bad)


def test_adaptive_k():
    # k = ceil(left / steps_left): 32 masks in 8 steps is 4 a step; the last step takes all that is left
    assert [int(adaptive_k(torch.tensor(m), 8, i)) for m, i in ((32, 0), (21, 0), (5, 6), (3, 7))] == [4, 3, 3, 3]
    left, ks = 32, []
    for i in range(8):  # with no threshold acceptance the block finishes exactly at its last step
        ks.append(int(adaptive_k(torch.tensor(left), 8, i)))
        left -= ks[-1]
    assert left == 0 and ks == [4] * 8
    # minimal_topk raises k, never above what is left
    assert int(adaptive_k(torch.tensor(30), 32, 0, minimal_topk=3)) == 3
    assert int(adaptive_k(torch.tensor(2), 32, 0, minimal_topk=3)) == 2


def test_keep_counts_and_pins():
    # max(int(L * ratio) or 1, pinned), all when ratio >= 1: int() truncates, as the official does
    assert keep_counts(64, torch.tensor([0, 10, 50, 64]), 0.7).tolist() == [44, 44, 50, 64]
    assert keep_counts(10, torch.tensor([0]), 0.7).tolist() == [7]  # 0.7 * 10 is 7.000000000000001
    assert keep_counts(3, torch.tensor([0]), 0.1).tolist() == [1]
    assert keep_counts(40, torch.tensor([0]), 1.0).tolist() == [40]
    ids = torch.tensor([[5, 6, 100, 101, 7]])  # image ids from 100
    assert pins(ids, 100, Sprint()).tolist() == [[True, True, False, False, True]]
    assert pins(ids, 100, Sprint(text_keep_ratio=0.5)).tolist() == [[False] * 5]
    assert pins(ids, 100, Sprint(text_keep_ratio=0.5, image_keep_ratio=1.0)).tolist() == [
        [False, False, True, True, False]]


def test_keep_mask_official_importance():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2, 12, 4, generator=g)  # [R, Hkv, L, D]
    conf = torch.rand(2, 12, generator=g)
    norm = keys.norm(dim=-1).mean(1)
    none = torch.zeros(2, 12, dtype=torch.bool)
    # no pins: alpha * norm / mean(norm) + (1 - alpha) * conf, top keep by it
    kept = keep_mask(keys, conf, none, torch.tensor([5, 5]), 0.5)
    score = 0.5 * norm / norm.mean(-1, keepdim=True) + 0.5 * conf
    for r in range(2):
        assert set(kept[r].nonzero().flatten().tolist()) == set(score[r].topk(5).indices.tolist())
    # alpha 1: key norms alone
    kept = keep_mask(keys, conf, none, torch.tensor([4, 4]), 1.0)
    assert set(kept[0].nonzero().flatten().tolist()) == set(norm[0].topk(4).indices.tolist())
    # the official NaN quirk: with any pin, pinned keys are kept and the rest ranked by confidence alone
    pin = torch.zeros(2, 12, dtype=torch.bool)
    pin[:, :3] = True
    kept = keep_mask(keys, conf, pin, torch.tensor([7, 7]), 0.5)
    for r in range(2):
        assert kept[r, :3].all()
        rest = conf[r, 3:].topk(4).indices + 3
        assert set(kept[r, 3:].nonzero().flatten().add(3).tolist()) == set(rest.tolist())


def test_keep_mask_of_every_layer_at_once_is_each_layers():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(5, 3, 2, 20, 8, generator=g)  # [layers, R, Hkv, L, D]
    conf = torch.rand(3, 20, generator=g)
    keep = torch.tensor([6, 9, 20])
    for pin in (torch.zeros(3, 20, dtype=torch.bool), torch.rand(3, 20, generator=g) < 0.2):
        for alpha in (0.5, 1.0):
            both = keep_mask(keys, conf, pin, keep, alpha)
            assert both.shape == (5, 3, 20)
            for layer in range(5):
                assert torch.equal(both[layer], keep_mask(keys[layer], conf, pin, keep, alpha))
            assert torch.equal(both.sum(-1), keep.expand(5, 3))


def test_max_prob_and_scores():
    logits = torch.randn(3, 9, generator=torch.Generator().manual_seed(2))
    p = torch.softmax(logits, -1)
    assert torch.allclose(max_prob(logits), p.amax(-1))
    active = torch.tensor([True, False, True])
    pred = logits.argmax(-1)
    score, top1 = sprint_scores(logits, pred, "low_confidence", active)
    assert torch.allclose(top1, p.amax(-1)) and score[1] == float("-inf") and torch.allclose(score[0], top1[0])
    margin, _ = sprint_scores(logits, pred, "top_k_margin", active)
    top2 = p.topk(2, -1).values
    assert torch.allclose(margin[2], top2[2, 0] - top2[2, 1])
    ent, _ = sprint_scores(logits, pred, "neg_entropy", active)
    h = -(p[0] * torch.log(p[0] + 1e-10)).sum()
    assert torch.allclose(ent[0], 1 - h / math.log(9))


def test_select_transfer_accepts_by_probability():
    score = torch.tensor([-2.0, -0.1, -1.0, -3.0])  # e.g. negative entropies
    prob = torch.tensor([0.97, 0.5, 0.6, 0.2])
    active = torch.ones(4, dtype=torch.bool)
    # top-1 by score is position 1; position 0 joins by its probability, not its score
    assert select_transfer(score, active, 1, 0.95, accept=prob).tolist() == [True, True, False, False]
    assert select_transfer(score, active, torch.tensor(2), 0.95, accept=prob).tolist() == [True, True, True, False]


# ---- the loop: adaptive unmasking ----


def test_peaked_model_fewer_forwards_per_block():
    prompt = list(range(1, 9))  # one full block: no prompt tail
    plain = DenoiseRequest(rows=[prompt], pad_lens=[0], gen_length=24, steps=4, threshold=2.0)
    out = generate(PeakedModel(), [plain], mask_id=MASK, block_length=B, sprint=Sprint())
    assert out.steps_per_block == [4, 4, 4] and out.forwards == 12
    # threshold 0.9: step 0 takes the 6 easy positions (k = 2 is inside them), then k = ceil(2/3) = 1 and
    # ceil(1/2) = 1 take the two hard ones: 3 forwards per block instead of 4
    peaked = DenoiseRequest(rows=[prompt], pad_lens=[0], gen_length=24, steps=4, threshold=0.9)
    out = generate(PeakedModel(), [peaked], mask_id=MASK, block_length=B, sprint=Sprint())
    assert out.steps_per_block == [3, 3, 3] and out.forwards == 9
    assert out.tokens[0] == [1 + p % 5 for p in range(8, 32)]


def test_peaked_backbone_one_forward_per_block(tiny_model):
    """The tiny backbone with a sharpened head: every top-1 probability passes the threshold."""
    import copy

    from llada2uni.pipeline import BackboneLogits
    sharp = copy.deepcopy(tiny_model)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(1e4)
    fn = BackboneLogits(sharp)
    prompt = list(range(3, 50))  # blocks 1 (prompt tail + masks), 2 and 3

    def req(threshold):
        return DenoiseRequest(rows=[prompt], pad_lens=[0], gen_length=80, steps=8, threshold=threshold)
    slow = generate(fn, [req(2.0)], mask_id=sharp.config.mask_token_id, sprint=Sprint())
    fast = generate(fn, [req(0.9)], mask_id=sharp.config.mask_token_id, sprint=Sprint())
    assert slow.steps_per_block == [8, 8, 8] and slow.forwards == 24
    assert fast.steps_per_block == [1, 1, 1] and fast.forwards == 3
    assert sharp.config.mask_token_id not in fast.tokens[0] and len(fast.tokens[0]) == 80


def test_strategies_run_and_fill():
    from test_sampling import MockModel
    for strategy in ("low_confidence", "top_k_margin", "neg_entropy"):
        r = DenoiseRequest(rows=[[1, 2, 3, 4, 5]], pad_lens=[0], gen_length=20, steps=4, vocab=(5, 30))
        out = generate(MockModel(), [r], mask_id=MASK, block_length=B, sprint=Sprint(remasking=strategy))
        assert len(out.tokens[0]) == 20 and all(5 <= t < 30 for t in out.tokens[0])
        assert all(s <= 4 for s in out.steps_per_block)


def test_use_false_is_the_baseline():
    from test_sampling import MockModel
    r = lambda: DenoiseRequest(rows=[[1, 2, 3]], pad_lens=[0], gen_length=20, steps=3)  # noqa: E731
    a = generate(MockModel(), [r()], mask_id=MASK, block_length=B)
    b = generate(MockModel(), [r()], mask_id=MASK, block_length=B, sprint=Sprint(use=False))
    assert a == b


# ---- exactness against the baseline ----


def test_keep_all_without_pads_reproduces_baseline(pipe):
    """Keep ratio 1.0, no CFG pads, threshold > 1, steps dividing the block, a prompt on a block
    boundary: the adaptive count equals the fixed schedule and the block against the whole cached
    prefix is the baseline: same tokens."""
    mask, off = pipe.tokens.ids.mask, pipe.image_token_offset
    prompt = pipe.tokens.understand_prompt([(_image(pipe, 6, 6), 6, 6)], "Describe.")
    # a prompt ending on a block boundary (the tiny tokenizer is byte-level: one token per letter)
    prompt = pipe.tokens.understand_prompt([(_image(pipe, 6, 6), 6, 6)], "Describe." + "!" * (-len(prompt) % 32))
    assert len(prompt) % 32 == 0
    for steps in (4, 8):
        def req():
            return DenoiseRequest(rows=[prompt], pad_lens=[0], gen_length=64, steps=steps, threshold=2.0)
        base = generate(pipe.logits_fn, [req()], mask_id=mask)
        for sprint in (Sprint(keep_ratio=1.0, cache_warmup_steps=1), Sprint(keep_ratio=1.0)):
            fn = Recorder(pipe.logits_fn)
            fast = generate(fn, [req()], mask_id=mask, sprint=sprint, image_offset=off)
            assert fast.tokens == base.tokens
            assert fast.steps_per_block == base.steps_per_block
            assert any(snap is not None for *_, snap in fn.calls)  # the reuse path did run


# ---- prefix reuse and pruning on the tiny model ----


def test_view_after_warmup_per_layer(pipe):
    """Steps before W-1 and step W-1 run the full prefix; later steps run the block alone against
    each layer's own kept keys; every row keeps max(int(L * ratio), pinned) keys in every layer."""
    mask, off = pipe.tokens.ids.mask, pipe.image_token_offset
    rows, pads = align_rows(pipe.tokens.t2i_prompts("a small red house by the sea at night", 4, 8), mask)
    assert pads[1] > 0
    for warmup in (1, 2):
        sprint = Sprint(keep_ratio=0.5, cache_warmup_steps=warmup, text_keep_ratio=0.5)
        fn = Recorder(pipe.logits_fn)
        req = DenoiseRequest(rows=rows, pad_lens=pads, gen_length=64, steps=4, threshold=2.0,
                             guidance=Guidance("simple", scale=2.0), vocab=(off, pipe.config.vocab_size))
        out = generate(fn, [req], mask_id=mask, sprint=sprint, image_offset=off)
        assert len(out.pruned) == len(out.steps_per_block)
        for stats in out.pruned:
            assert stats.kept == [max(1, int(stats.total[0] * 0.5))] * 2
        views = [(start, t, snap) for start, t, _, snap in fn.calls if snap is not None]
        assert len(views) == sum(s - warmup for s in out.steps_per_block)
        for start, t, (idx, valid) in views:
            assert start % 32 == 0 and t == 32  # the block alone
            assert valid.all() and idx.shape[0] == pipe.config.num_hidden_layers
            assert not all(torch.equal(idx[0], idx[i]) for i in range(1, idx.shape[0]))  # per layer


def test_warmup_zero_never_prunes(pipe):
    mask, off = pipe.tokens.ids.mask, pipe.image_token_offset
    prompt = pipe.tokens.understand_prompt([(_image(pipe, 6, 6), 6, 6)], "Describe.")
    fn = Recorder(pipe.logits_fn)
    req = DenoiseRequest(rows=[prompt], pad_lens=[0], gen_length=64, steps=4, threshold=2.0)
    out = generate(fn, [req], mask_id=mask, sprint=Sprint(keep_ratio=0.3, cache_warmup_steps=0), image_offset=off)
    assert not out.pruned and all(snap is None for *_, snap in fn.calls)


def test_pads_visible_after_warmup(tiny_model):
    """A cache view shows every kept key, pads included, and the whole window to every query."""
    m = tiny_model
    g = torch.Generator().manual_seed(3)
    rows, lo, hi = 2, 64, 96
    ids = torch.randint(0, 300, (rows, hi), generator=g)
    pad_lens = torch.tensor([0, 40])  # the second row's pads reach into nothing past lo
    positions = rope_positions(0, hi, pad_lens)
    with torch.inference_mode():
        cache = m.new_cache(rows, hi)
        m(ids, positions, block_causal_mask(0, hi, pad_lens, 32), cache=cache, start=0)
        keep = torch.zeros(rows, lo, dtype=torch.bool)
        keep[0, ::2] = True
        keep[1, 30:] = True  # includes pads 30..39
        counts = keep.sum(-1)
        idx = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[:, : int(counts.max())]
        valid = torch.arange(idx.shape[1])[None, :] < counts[:, None]
        layers = m.config.num_hidden_layers
        cache.set_view(lo, hi, idx[None].expand(layers, -1, -1), valid)
        got = m(ids[:, lo:], positions[:, lo:], block_causal_mask(lo, hi, pad_lens, 32), cache=cache, start=lo)
        cache.clear_view()
        ref_mask = block_causal_mask(0, hi, pad_lens, 32).clone()
        ref_mask[:, :, lo:, :lo] = keep[:, None, None, :]  # kept keys visible, pads too
        ref = m(ids, positions, ref_mask)[:, lo:]
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


def _mixed_requests(pipe):
    """An understanding request (1 row) and a CFG T2I request (2 left-aligned rows): 3 rows in all."""
    mask, off = pipe.tokens.ids.mask, pipe.image_token_offset
    rows, pads = align_rows(pipe.tokens.t2i_prompts("a cat", 2, 8), mask)
    return [
        DenoiseRequest(rows=[pipe.tokens.understand_prompt([(_image(pipe, 4, 4), 4, 4)], "What?")],
                       pad_lens=[0], gen_length=70, steps=4),
        DenoiseRequest(rows=rows, pad_lens=pads, gen_length=16, steps=8, vocab=(off, pipe.config.vocab_size),
                       guidance=Guidance("simple", scale=2.0)),
    ]


def test_batched_equals_alone_with_pruning(pipe):
    mask, off = pipe.tokens.ids.mask, pipe.image_token_offset
    sprint = Sprint(keep_ratio=0.5, cache_warmup_steps=1)

    batched = generate(pipe.logits_fn, _mixed_requests(pipe), mask_id=mask, sprint=sprint, image_offset=off)
    alone = [generate(pipe.logits_fn, [r], mask_id=mask, sprint=sprint, image_offset=off).tokens[0]
             for r in _mixed_requests(pipe)]
    assert batched.tokens == alone


# ---- fallback and the public API ----


def test_editing_guidance_falls_back(pipe, caplog):
    mask, off = pipe.tokens.ids.mask, pipe.image_token_offset
    rows = pipe.tokens.edit_prompts([(_image(pipe, 2, 3), 2, 3)], "make it blue", 2, 3, image_guidance=True)
    rows, pads = align_rows(rows, mask)

    def req():
        return DenoiseRequest(rows=rows, pad_lens=pads, gen_length=6, steps=4, vocab=(off, pipe.config.vocab_size),
                              guidance=Guidance("edit", text_scale=4.0, image_scale=1.5))
    base = generate(pipe.logits_fn, [req()], mask_id=mask)
    with caplog.at_level(logging.INFO, logger="llada2uni"):
        fast = generate(pipe.logits_fn, [req()], mask_id=mask, sprint=Sprint(keep_ratio=0.3), image_offset=off)
    said = [r for r in caplog.records if "SPRINT" in r.getMessage()]
    assert len(said) == 1 and "baseline" in said[0].getMessage()
    assert fast.tokens == base.tokens and fast.steps_per_block == base.steps_per_block and not fast.pruned
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llada2uni"):
        a = pipe.edit_image(_image(pipe, 2, 3), 2, 3, "make it blue", steps=4, use_sprint=True, keep_ratio=0.3)
    assert sum("SPRINT" in r.getMessage() for r in caplog.records) == 1
    assert a == pipe.edit_image(_image(pipe, 2, 3), 2, 3, "make it blue", steps=4)


def test_task_methods_take_sprint(pipe, monkeypatch):
    import llada2uni.pipeline as pl
    seen = []
    real = pl.generate
    monkeypatch.setattr(pl, "generate", lambda fn, reqs, **kw: seen.append(kw) or real(fn, reqs, **kw))
    r = pipe.generate_image("a boat", 64, 128, steps=4, cfg_scale=2.0, use_sprint=True, keep_ratio=0.5,
                            cache_warmup_steps=1, image_keep_ratio=0.6, remasking="top_k_margin")
    assert len(r["token_ids"]) == 8
    assert seen[-1]["sprint"] == Sprint(keep_ratio=0.5, cache_warmup_steps=1, image_keep_ratio=0.6,
                                        remasking="top_k_margin")
    assert seen[-1]["image_offset"] == pipe.image_token_offset
    answer = pipe.understand_image(_image(pipe, 3, 3), 3, 3, question="What?", steps=8, gen_length=40,
                                   use_sprint=True, threshold=0.93, keep_ratio=0.5, cache_warmup_steps=1,
                                   image_keep_ratio=1.0, text_keep_ratio=1.0)
    assert isinstance(answer, str) and seen[-1]["sprint"].text_keep_ratio == 1.0
    pipe.understand_image(_image(pipe, 3, 3), 3, 3, question="What?", steps=8, gen_length=40)
    assert seen[-1]["sprint"] is None
    with pytest.raises(ValueError, match="keep_ratio"):
        pipe.generate_image("x", 64, 64, use_sprint=True, keep_ratio=-2.0)


def test_cli_flags():
    parser = build_parser()
    for cmd, extra in (("t2i", ["--prompt", "x"]), ("understand", [])):
        args = parser.parse_args([cmd, "--model_path", "m", *extra, "--use_sprint", "--threshold", "0.93",
                                  "--keep_ratio", "0.5", "--cache_warmup_steps", "1", "--image_keep_ratio", "1.0",
                                  "--text_keep_ratio", "0.8"])
        assert args.use_sprint and (args.threshold, args.keep_ratio, args.cache_warmup_steps) == (0.93, 0.5, 1)
        assert (args.image_keep_ratio, args.text_keep_ratio) == (1.0, 0.8)
        plain = parser.parse_args([cmd, "--model_path", "m", *extra])
        assert not plain.use_sprint and plain.image_keep_ratio is None and plain.keep_ratio == 0.7


def test_cli_understand_with_sprint(tiny_dir, tmp_path, capsys):
    from llada2uni.cli import main
    tok = tmp_path / "img.pt"
    torch.save({"semantic_token_ids": torch.arange(16), "metadata": {"processed_size": [64, 64]}}, tok)
    assert main(["--quiet", "understand", "--model_path", str(tiny_dir), "--image_token", str(tok),
                 "--question", "hi", "--steps", "4", "--gen_length", "40", "--device", "cpu", "--use_sprint",
                 "--keep_ratio", "0.5", "--cache_warmup_steps", "1"]) == 0


def test_pipeline_keeps_sprint_on_a_fast_path_without_views(pipe, monkeypatch):
    """A logits_fn that bypasses the cache view (like the CUDA-graph path) is swapped for the clear
    path while SPRINT runs, so pruning still happens; editing keeps the fast path (it falls back)."""
    class NoViews:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def new_cache(self, rows, max_len):
            return self.inner.new_cache(rows, max_len)

        def __call__(self, *args):
            self.calls += 1
            return self.inner(*args)
    fast = NoViews(pipe.logits_fn)
    monkeypatch.setattr(pipe, "logits_fn", fast)
    pipe.understand_image(_image(pipe, 4, 4), 4, 4, question="What?", steps=4, gen_length=40, use_sprint=True,
                          keep_ratio=0.5, cache_warmup_steps=1)
    assert fast.calls == 0 and pipe.last_stats["pruned"]
    pipe.edit_image(_image(pipe, 2, 3), 2, 3, "make it blue", steps=2, use_sprint=True)
    assert fast.calls > 0


def test_fast_path_runs_the_pruned_steps_and_equals_the_clear_path(pipe):
    """SPRINT on ``runtime.FastBackboneLogits`` (pooled cache, rows padded to a bucket, the view in a
    persistent buffer of the cache's shape) commits the same tokens as on the clear path, pruning
    included; the pruned steps run on the fast path (no swap to the clear one)."""
    from llada2uni.runtime import FastBackboneLogits
    mask, off = pipe.tokens.ids.mask, pipe.image_token_offset
    sprint = Sprint(keep_ratio=0.5, cache_warmup_steps=1)

    # 3 rows: a bucket of 4, one padding row
    clear = generate(pipe.logits_fn, _mixed_requests(pipe), mask_id=mask, sprint=sprint, image_offset=off)
    fast = Recorder(FastBackboneLogits(pipe.model, eager=True))
    try:
        out = generate(fast, _mixed_requests(pipe), mask_id=mask, sprint=sprint, image_offset=off)
    finally:
        from llada2uni.ops.moe import experts_reference
        for m in pipe.model.modules():  # the module's pipe stays on the clear dispatch
            if hasattr(m, "dispatch"):
                m.dispatch = experts_reference
    assert fast.cache.rows == 4 and fast.cache.real_rows == 3
    assert out.pruned and [p.kept for p in out.pruned] == [p.kept for p in clear.pruned]
    assert sum(snap is not None for *_, snap in fast.calls) > 0  # pruned steps ran on the fast path
    assert out.tokens == clear.tokens and out.forwards == clear.forwards


def test_fast_path_slices_the_image_vocabulary_under_sprint_and_equals_the_clear_path(pipe):
    """Image canvases under SPRINT: the steps that return only the block's logits take the image ids'
    logits alone (with the full vocabulary's moments for cfg_rescale); the forward that also returns
    the newly final positions (their confidence is a softmax over every id) takes the full vocabulary.
    Same tokens as the clear path."""
    from llada2uni.runtime import FastBackboneLogits
    mask, off, V = pipe.tokens.ids.mask, pipe.image_token_offset, pipe.config.vocab_size
    sprint = Sprint(keep_ratio=0.5, cache_warmup_steps=1)

    def reqs():
        out = []
        for prompt in ("a cat", "a red boat at sea"):
            rows, pads = align_rows(pipe.tokens.t2i_prompts(prompt, 2, 8), mask)
            out.append(DenoiseRequest(rows=rows, pad_lens=pads, gen_length=16, steps=8, vocab=(off, V),
                                      guidance=Guidance("simple", scale=2.0, rescale=0.7)))
        return out
    clear = generate(pipe.logits_fn, reqs(), mask_id=mask, sprint=sprint, image_offset=off)
    inner = FastBackboneLogits(pipe.model, eager=True)
    calls = []

    class Spy:
        sprint_views, vocab_slices, new_cache = True, True, inner.new_cache

        def __call__(self, ids, start, pad_lens, cache, num_logits, **kw):
            calls.append((num_logits, kw.get("vocab")))
            return inner(ids, start, pad_lens, cache, num_logits, **kw)
    try:
        out = generate(Spy(), reqs(), mask_id=mask, sprint=sprint, image_offset=off)
    finally:
        from llada2uni.ops.moe import experts_reference
        for m in pipe.model.modules():
            if hasattr(m, "dispatch"):
                m.dispatch = experts_reference
    assert out.pruned and out.tokens == clear.tokens and out.forwards == clear.forwards
    assert any(v == (off, V) for _, v in calls) and any(v is None and n > 32 for n, v in calls)
    assert all(v is None for n, v in calls if n > 32)

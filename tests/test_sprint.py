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
from llada2uni.sampling.sprint import Sprint, adaptive_k, importance, keep_count, select_kept
from llada2uni.sampling.unmask import select_transfer

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
        if view is not None and view.idx is not None:
            # the kept keys in the compact buffer must be the full cache's keys at those positions
            gathered = cache.k[:, torch.arange(cache.rows)[:, None], :, view.idx]  # [R, K, L, H, D]
            assert torch.equal(view.k[:, :, :, : view.kept], gathered.permute(2, 0, 3, 1, 4))
            snap = (view.idx.clone(), view.valid.clone())
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
    assert s.image_ratio == s.text_ratio == 0.7 and s.prunes and s.warmup == 2
    s = Sprint(keep_ratio=0.5, image_keep_ratio=1.0, cache_warmup_steps=0)
    assert (s.image_ratio, s.text_ratio, s.warmup) == (1.0, 0.5, 1)
    assert not Sprint(keep_ratio=1.0).prunes
    for bad in ({"keep_ratio": 1.5}, {"text_keep_ratio": -0.1}, {"cache_warmup_steps": -1},
                {"remasking": "random"}, {"confidence_alpha": 2.0}):
        with pytest.raises(ValueError):
            Sprint(**bad)


def test_adaptive_k_and_keep_count():
    # k = ceil(left / steps_left): 32 masks in 8 steps is 4 a step; the last step takes all that is left
    assert [int(adaptive_k(torch.tensor(m), 8, i)) for m, i in ((32, 0), (21, 0), (5, 6), (3, 7))] == [4, 3, 3, 3]
    left, ks = 32, []
    for i in range(8):  # with no threshold acceptance the block finishes exactly at its last step
        ks.append(int(adaptive_k(torch.tensor(left), 8, i)))
        left -= ks[-1]
    assert left == 0 and ks == [4] * 8
    assert keep_count(torch.tensor([10, 0, 3, 7]), 0.7).tolist() == [7, 0, 3, 5]  # 0.7*10 is 7, not 8


def test_select_kept_per_modality():
    g = torch.Generator().manual_seed(0)
    score = torch.rand(3, 40, generator=g)
    is_image = torch.rand(3, 40, generator=g) < 0.4
    candidate = torch.ones(3, 40, dtype=torch.bool)
    candidate[1, :5] = False  # pads
    candidate[2] = False  # a finished row keeps nothing
    keep = select_kept(score, candidate, is_image, image_ratio=0.25, text_ratio=0.6)
    for r in range(2):
        for member, ratio in ((candidate[r] & is_image[r], 0.25), (candidate[r] & ~is_image[r], 0.6)):
            n = int(member.sum())
            kept = keep[r] & member
            assert int(kept.sum()) == math.ceil(ratio * n - 1e-9)
            if kept.any() and (member & ~kept).any():  # the kept ones score highest
                assert score[r][kept].min() >= score[r][member & ~kept].max()
    assert not keep[2].any() and not (keep & ~candidate).any()
    # ties go to the lower position
    flat = select_kept(torch.zeros(1, 6), torch.ones(1, 6, dtype=torch.bool), torch.zeros(1, 6, dtype=torch.bool),
                       1.0, 0.5)
    assert flat.tolist() == [[True, True, True, False, False, False]]


def test_importance_blend():
    attn = torch.tensor([[0.01, 0.04, 0.02, 0.5]])
    conf = torch.tensor([[1.0, 0.5, 0.0, 1.0]])
    candidate = torch.tensor([[True, True, True, False]])
    # attention normalised by the max over candidates (0.04), then alpha * conf + (1 - alpha) * attn
    out = importance(attn, conf, candidate, 0.25)
    assert torch.allclose(out[0, :3], 0.25 * conf[0, :3] + 0.75 * torch.tensor([0.25, 1.0, 0.5]))
    assert torch.allclose(importance(attn, conf, candidate, 1.0)[0, :3], conf[0, :3])


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


@pytest.mark.parametrize("cfg", [False, True])
def test_keep_all_reproduces_baseline(pipe, cfg):
    """Keep ratios 1.0, threshold > 1, prompt on a block boundary and steps dividing the block: the
    adaptive count equals the fixed schedule and reuse of completed blocks is exact: same tokens."""
    mask, off = pipe.tokens.ids.mask, pipe.image_token_offset
    if cfg:
        from llada2uni.tokens import align_left
        rows, pads = align_left(pipe.tokens.t2i_prompts("a red cube", 3, 4), mask)
        pad = -len(rows[0]) % 32
        rows, pads = [[mask] * pad + r for r in rows], [p + pad for p in pads]
        extra = dict(guidance=Guidance("simple", scale=3.0), vocab=(off, pipe.config.vocab_size))
    else:
        row, pad = _aligned(pipe, pipe.tokens.understand_prompt([(_image(pipe, 6, 6), 6, 6)], "Describe."))
        rows, pads, extra = [row], [pad], {}
    for steps in (4, 8):
        def req():
            return DenoiseRequest(rows=rows, pad_lens=pads, gen_length=64, steps=steps, threshold=2.0, **extra)
        base = generate(pipe.logits_fn, [req()], mask_id=mask)
        for sprint in (Sprint(keep_ratio=1.0, cache_warmup_steps=1), Sprint(keep_ratio=1.0)):
            fast = generate(pipe.logits_fn, [req()], mask_id=mask, sprint=sprint, image_offset=off)
            assert fast.tokens == base.tokens
            assert fast.steps_per_block == base.steps_per_block == [steps] * 2


# ---- prefix reuse and pruning on the tiny model ----


def test_prompt_tail_frozen_after_warmup(pipe):
    """Block 4 holds the prompt tail (128..150) and the first masks; after the warm-up steps only the
    generated positions are computed (the frozen tail is the approximation); later blocks are whole."""
    mask = pipe.tokens.ids.mask
    prompt = list(range(3, 154))  # Lp = 151
    fn = Recorder(pipe.logits_fn)
    req = DenoiseRequest(rows=[prompt], pad_lens=[0], gen_length=41, steps=4, threshold=2.0)
    out = generate(fn, [req], mask_id=mask, sprint=Sprint(keep_ratio=1.0, cache_warmup_steps=2))
    windows = [(start, length) for start, length, _, _ in fn.calls]
    assert windows == [(0, 160), (128, 32), (151, 9), (151, 9),  # block 4: prefill, warm, then reuse
                       (128, 64), (160, 32), (160, 32), (160, 32)]  # block 5 starts by writing block 4
    assert out.steps_per_block == [4, 4] and len(out.tokens[0]) == 41


def test_pruned_sizes_per_modality(pipe):
    """Each pruned block keeps ceil(ratio * n) of each modality's prefix keys, per row; rows keep
    different counts (CFG prompts differ) and the shorter ones are padded with invisible keys."""
    mask, off = pipe.tokens.ids.mask, pipe.image_token_offset
    from llada2uni.tokens import align_left
    rows, pads = align_left(pipe.tokens.t2i_prompts("a small red house by the sea", 4, 8), mask)
    sprint = Sprint(keep_ratio=0.7, image_keep_ratio=0.5, text_keep_ratio=0.25, cache_warmup_steps=1)
    fn = Recorder(pipe.logits_fn)
    req = DenoiseRequest(rows=rows, pad_lens=pads, gen_length=96, steps=4, guidance=Guidance("simple", scale=2.0),
                         vocab=(off, pipe.config.vocab_size))
    out = generate(fn, [req], mask_id=mask, sprint=sprint, image_offset=off)
    assert out.first_block > 0 and len(out.pruned) == len(out.steps_per_block)
    saw_image = False
    for stats in out.pruned:
        for r in range(2):
            assert stats.text_kept[r] == math.ceil(0.25 * stats.text_total[r] - 1e-9)
            assert stats.image_kept[r] == math.ceil(0.5 * stats.image_total[r] - 1e-9)
            lo = stats.block * 32
            assert stats.text_total[r] + stats.image_total[r] == lo - pads[r]  # pads are never candidates
        saw_image |= stats.image_total[0] > 0
    assert saw_image  # generated image tokens became prunable prefix
    views = [snap for _, _, _, snap in fn.calls if snap is not None]
    assert len(views) == sum(s - 1 for s in out.steps_per_block)  # every step after warm-up
    for idx, valid in views:
        counts = valid.sum(-1)
        for r in range(2):
            kept = idx[r, : counts[r]]
            assert (kept[1:] > kept[:-1]).all() and (kept >= pads[r]).all()  # ascending physical indices


def test_kept_keys_keep_their_positions(tiny_model):
    """A pruned forward equals the uncached model run over the whole sequence with the dropped keys
    hidden from the block's queries: kept keys attend at their original RoPE positions."""
    m = tiny_model
    g = torch.Generator().manual_seed(3)
    rows, lo, hi = 2, 64, 96
    ids = torch.randint(0, 300, (rows, hi), generator=g)
    pad_lens = torch.tensor([0, 5])
    full_mask = block_causal_mask(0, hi, pad_lens, 32)
    positions = rope_positions(0, hi, pad_lens)
    keep = torch.rand(rows, lo, generator=g) < 0.4
    keep[1, :5] = False  # pads are not kept
    keep[1, 30:] = False  # the second row keeps fewer: padded slots
    with torch.inference_mode():
        cache = m.new_cache(rows, hi)
        m(ids, positions, full_mask, cache=cache, start=0)  # exact prefix KV
        for view_keep in (keep, None):  # pruned, and the plain reuse of every key
            cache.set_view(lo, hi, view_keep, None)
            got = m(ids[:, lo:], positions[:, lo:], block_causal_mask(lo, hi, pad_lens, 32), cache=cache, start=lo)
            cache.clear_view()
            ref_mask = full_mask.clone()
            if view_keep is not None:
                ref_mask[:, :, lo:, :lo] &= view_keep[:, None, None, :]
            ref = m(ids, positions, ref_mask)[:, lo:]
            assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
        # a frozen window column keeps its cached KV
        before = cache.k[:, :, :, lo:hi].clone()
        frozen = torch.zeros(rows, hi - lo, dtype=torch.bool)
        frozen[0, :7] = True
        cache.set_view(lo, hi, None, frozen)
        m(torch.randint(0, 300, (rows, hi - lo), generator=g), positions[:, lo:],
          block_causal_mask(lo, hi, pad_lens, 32), cache=cache, start=lo)
        cache.clear_view()
        assert torch.equal(cache.k[:, 0, :, lo:lo + 7], before[:, 0, :, :7])
        assert not torch.equal(cache.k[:, 0, :, lo + 7:hi], before[:, 0, :, 7:])


def test_probe_is_an_attention_distribution(tiny_model):
    m = tiny_model
    ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(1))
    pad_lens = torch.tensor([0, 9])
    with torch.inference_mode():
        cache = m.new_cache(2, 64)
        queries = torch.ones(2, 32, dtype=torch.bool)
        cache.begin_probe(queries, 64)  # every key: each query's probabilities sum to 1
        m(ids, rope_positions(0, 64, pad_lens), block_causal_mask(0, 64, pad_lens, 32), cache=cache)
        mass = cache.end_probe()
    assert torch.allclose(mass.sum(-1), torch.ones(2), atol=1e-5)
    assert (mass[1, :9] == 0).all() and (mass[:, :32] > 0).any()  # pads receive nothing


def test_batched_equals_alone_with_pruning(pipe):
    mask, off = pipe.tokens.ids.mask, pipe.image_token_offset
    from llada2uni.tokens import align_left
    sprint = Sprint(keep_ratio=0.5, cache_warmup_steps=1)

    def requests():
        rows, pads = align_left(pipe.tokens.t2i_prompts("a cat", 2, 8), mask)
        return [
            DenoiseRequest(rows=[pipe.tokens.understand_prompt([(_image(pipe, 4, 4), 4, 4)], "What?")],
                           pad_lens=[0], gen_length=70, steps=4),
            DenoiseRequest(rows=rows, pad_lens=pads, gen_length=16, steps=8, vocab=(off, pipe.config.vocab_size),
                           guidance=Guidance("simple", scale=2.0)),
        ]
    batched = generate(pipe.logits_fn, requests(), mask_id=mask, sprint=sprint, image_offset=off)
    alone = [generate(pipe.logits_fn, [r], mask_id=mask, sprint=sprint, image_offset=off).tokens[0]
             for r in requests()]
    assert batched.tokens == alone


# ---- fallback and the public API ----


def test_editing_guidance_falls_back(pipe, caplog):
    mask, off = pipe.tokens.ids.mask, pipe.image_token_offset
    rows = pipe.tokens.edit_prompts([(_image(pipe, 2, 3), 2, 3)], "make it blue", 2, 3, image_guidance=True)
    from llada2uni.tokens import align_left
    rows, pads = align_left(rows, mask)

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
    assert isinstance(answer, str) and seen[-1]["sprint"].text_ratio == 1.0
    pipe.understand_image(_image(pipe, 3, 3), 3, 3, question="What?", steps=8, gen_length=40)
    assert seen[-1]["sprint"] is None
    with pytest.raises(ValueError, match="keep_ratio"):
        pipe.generate_image("x", 64, 64, use_sprint=True, keep_ratio=2.0)


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

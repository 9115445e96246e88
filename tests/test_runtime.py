"""The fast path against the clear path: same logits, same tokens."""

import pytest
import torch

from llada2uni.ops.attention import block_causal_mask, rope_positions
from llada2uni.pipeline import BackboneLogits, LLaDA2Uni
from llada2uni.runtime import FastBackboneLogits, accelerate
from llada2uni.sampling.unmask import VocabMoments


def _window_logits(fn, ids, pads, spans):
    cache = fn.new_cache(ids.shape[0], ids.shape[1] + 32)
    outs = []
    for start, end in spans:
        outs.append(fn(ids[:, start:end], start, pads, cache, 32).clone())  # a graph's buffer is reused
        cache.length = end - 32
    return outs


def test_static_step_equals_clear_cached_forward(tiny_model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 160), generator=g)
    pads = torch.tensor([0, 9])
    spans = [(0, 96), (64, 128), (96, 128), (96, 160)]
    clear = _window_logits(BackboneLogits(tiny_model), ids, pads, spans)
    fast = _window_logits(FastBackboneLogits(tiny_model, eager=True), ids, pads, spans)
    for a, b in zip(clear, fast):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # and both equal the uncached window
    full = tiny_model(ids[:, :160], rope_positions(0, 160, pads), block_causal_mask(0, 160, pads, 32))
    torch.testing.assert_close(fast[-1], full[:, -32:], rtol=1e-4, atol=1e-4)
    for m in tiny_model.modules():  # leave the shared fixture on the clear dispatch
        if hasattr(m, "dispatch"):
            from llada2uni.ops.moe import experts_reference
            m.dispatch = experts_reference


def test_fast_pipeline_tokens_equal_clear_tokens(tiny_dir):
    pipe = LLaDA2Uni.from_pretrained(tiny_dir, device="cpu", dtype="float32")
    clear_t2i = pipe.generate_image("a red cube", 96, 64, steps=4, cfg_scale=3.0)
    clear_text = pipe.understand_image(list(range(pipe.image_token_offset, pipe.image_token_offset + 6)), 2, 3,
                                       question="What?", steps=8, gen_length=80)
    assert accelerate(pipe, eager=True)
    assert pipe.generate_image("a red cube", 96, 64, steps=4, cfg_scale=3.0) == clear_t2i
    assert pipe.understand_image(list(range(pipe.image_token_offset, pipe.image_token_offset + 6)), 2, 3,
                                 question="What?", steps=8, gen_length=80) == clear_text


@pytest.mark.gpu
def test_cuda_graph_tokens_equal_eager_tokens(tiny_dir):
    pipe = LLaDA2Uni.from_pretrained(tiny_dir, device="cuda", dtype="bfloat16")
    accelerate(pipe, eager=True)
    eager = pipe.generate_image(["a red cube", "two cats"], 128, 128, steps=4, cfg_scale=3.0)
    accelerate(pipe, eager=False, compile_step=False)  # graphs alone are exact
    assert pipe.logits_fn.graphs
    graphed = pipe.generate_image(["a red cube", "two cats"], 128, 128, steps=4, cfg_scale=3.0)
    assert graphed == eager
    # the image ids' logits alone (with the vocabulary's moments), graphed and eager
    accelerate(pipe, eager=True)
    pipe.logits_fn.vocab_slices = True
    eager = pipe.generate_image(["a red cube", "two cats"], 128, 128, steps=4, cfg_scale=3.0)
    accelerate(pipe, eager=False, compile_step=False)
    pipe.logits_fn.vocab_slices = True
    assert pipe.generate_image(["a red cube", "two cats"], 128, 128, steps=4, cfg_scale=3.0) == eager


@pytest.mark.gpu
def test_joining_rows_prefill_without_a_graph_and_decode_as_alone(tiny_dir):
    """Rows joining a running batch (at a boundary and mid-block) prefill 32- and 64-token windows on a
    cache of their own, used once: no graph is captured on it (it would be kept, and leak); every
    graph belongs to a pooled cache."""
    from llada2uni.sampling.block import DenoiseRequest, generate
    pipe = LLaDA2Uni.from_pretrained(tiny_dir, device="cuda", dtype="bfloat16", fast=False)
    accelerate(pipe, eager=False, compile_step=False)
    fast, mask = pipe.logits_fn, pipe.tokens.ids.mask

    def text(q, n=64):
        return DenoiseRequest(rows=[pipe.tokens.chat_prompt([{"role": "user", "content": q}])], pad_lens=[0], gen_length=n, steps=4)
    start, late = [text("Hi", 160)], [text("late one", 40), text("and another", 40)]
    offered = []

    def admit(block, length, fits=None):
        if block >= 2 and late and (fits is None or all(fits(r) for r in late[:1])):
            offered.append((block, fits is None))
            return [late.pop(0)]
        return []
    out = generate(fast, start, mask_id=mask, admit=admit, device=pipe.device)
    assert len(offered) == 2
    pooled = {id(c.k) for c in fast._pool.values()}
    assert fast._graphs and {key[3] for key in fast._graphs} <= pooled
    # every request complete (exactness of joining is the CPU tests' job, in fp32: in bf16 a batch of
    # other row counts rounds differently)
    assert [len(t) for t in out.tokens] == [160, 40, 40]


@pytest.mark.gpu
def test_grouped_moe_matches_reference_on_gpu():
    from llada2uni.ops.moe import experts_grouped, experts_reference
    for n, e, k in [(64, 256, 8), (1024, 256, 8), (7, 64, 4)]:
        g = torch.Generator(device="cuda").manual_seed(n)
        x = torch.randn(n, 2048, device="cuda", generator=g).bfloat16()
        w13 = (torch.randn(e, 1024, 2048, device="cuda", generator=g) / 45).bfloat16()
        w2 = (torch.randn(e, 2048, 512, device="cuda", generator=g) / 22).bfloat16()
        ids = torch.rand(n, e, device="cuda", generator=g).topk(k, dim=-1).indices
        w = torch.rand(n, k, device="cuda", generator=g)
        ref = experts_reference(x, ids, w, w13, w2)
        out = experts_grouped(x, ids, w, w13, w2)
        rel = (out - ref).norm() / ref.norm()
        assert rel < 1e-2, rel


@pytest.mark.gpu
def test_compiled_step_matches_eager_step(tiny_dir):
    from llada2uni.weights import load_backbone
    model = load_backbone(tiny_dir, device=torch.device("cuda"), dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 128), generator=g).cuda()
    pads = torch.tensor([0, 5], device="cuda")
    spans = [(0, 96), (64, 128), (96, 128)]
    eager = _window_logits(FastBackboneLogits(model, eager=True), ids, pads, spans)
    fast = _window_logits(FastBackboneLogits(model, eager=False, compile=True), ids, pads, spans)
    # bf16: fused kernels round differently and a near-tie in the router can pick another expert for
    # a token, so compare the predictions, not the bits (fp32 agreement is checked on CPU in development:
    # 4e-7 relative)
    for a, b in zip(eager, fast):
        agree = (a.argmax(-1) == b.argmax(-1)).float().mean()
        assert agree > 0.9, agree


@pytest.mark.gpu
def test_image_side_on_another_device(tiny_dir):
    # The backbone on the GPU, the image side elsewhere (here the CPU; a second GPU in practice).
    pipe = LLaDA2Uni.from_pretrained(tiny_dir, device="cuda", dtype="bfloat16", image_device="cpu")
    r = pipe.generate_image("a red cube", 64, 64, steps=2)
    image = pipe.decode_tokens(r["token_ids"], r["h"], r["w"], mode="turbo", seed=0)
    assert image.size == (64, 64)
    assert next(pipe.image_decoder.vae.parameters()).device.type == "cpu"
    assert pipe.model.device.type == "cuda"


def test_compiled_step_never_recompiles_or_fails_under_traffic_shapes(tiny_model):
    """Many prompt lengths, row counts and cache sizes through the compiled step (Dynamo's guards, the
    eager backend so the test is fast) with the recompile limit lowered to 2: no failure, no fallback,
    a bounded number of graphs, and the logits of the uncompiled step."""
    import torch._dynamo

    from llada2uni.runtime import StaticStep, reset_compiled
    reset_compiled()
    eager = FastBackboneLogits(tiny_model, eager=True)
    fast = FastBackboneLogits(tiny_model, eager=True)
    fast.step = StaticStep(tiny_model, compile=True, backend="eager")
    g = torch.Generator().manual_seed(5)
    with torch._dynamo.config.patch(recompile_limit=2):
        for rows, prompt in [(1, 40), (2, 75), (3, 130), (2, 33), (5, 64), (1, 200), (4, 97), (7, 20)]:
            ids = torch.randint(0, tiny_model.config.vocab_size, (rows, prompt + 64), generator=g)
            pads = torch.randint(0, 5, (rows,), generator=g)
            start = prompt // 32 * 32
            spans = [(0, start + 32), (start, start + 64), (start + 32, start + 64)]  # prefill, 64 and 32
            for a, b in zip(_window_logits(eager, ids, pads, spans), _window_logits(fast, ids, pads, spans)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        parts = (fast.step.attention, fast.step.router, fast.step.combine)
        assert not any(p.failed for p in parts)
        assert all(p.compiles <= 2 for p in parts)  # one dynamic graph, plus the one-row specialisation
        # more steps of their own (a second pipeline, a benchmark's variants) share those graphs: no
        # recompiles, so the limit is never reached however many there are
        before = fast.step.compiles
        for _ in range(4):
            other = FastBackboneLogits(tiny_model, eager=True)
            other.step = StaticStep(tiny_model, compile=True, backend="eager")
            for a, b in zip(_window_logits(eager, ids, pads, spans), _window_logits(other, ids, pads, spans)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert other.step.compiles == before and not any(p.failed for p in parts)


def test_compiled_step_falls_back_to_eager_when_compilation_fails(tiny_model, monkeypatch, caplog):
    import logging

    import torch._dynamo

    from llada2uni.runtime import StaticStep
    monkeypatch.setattr("llada2uni.runtime._SHARED", {})  # this test's broken parts stay its own
    step = StaticStep(tiny_model, compile=True, backend="eager")

    def broken(*args):
        raise torch._dynamo.exc.FailOnRecompileLimitHit("recompile limit hit")
    monkeypatch.setattr(step.router, "fn", broken)
    fast = FastBackboneLogits(tiny_model, eager=True)
    ref = FastBackboneLogits(tiny_model, eager=True)
    fast.step = step
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1))
    pads = torch.tensor([0, 3])
    with caplog.at_level(logging.WARNING, logger="llada2uni"):
        got = _window_logits(fast, ids, pads, [(0, 96)])
    assert step.router.failed and "eagerly" in caplog.text
    torch.testing.assert_close(got[0], _window_logits(ref, ids, pads, [(0, 96)])[0], rtol=1e-5, atol=1e-5)


def test_row_buckets_pool_and_admission_on_the_fast_path(tiny_dir):
    """Rows padded to power-of-two buckets, caches pooled across generations, rows joining in place
    or into a larger bucket: the fast path's tokens equal the clear path's throughout."""
    from llada2uni.sampling.block import DenoiseRequest, generate
    from llada2uni.sampling.guidance import Guidance
    from llada2uni.tokens import align_rows
    pipe = LLaDA2Uni.from_pretrained(tiny_dir, device="cpu", dtype="float32")
    clear = BackboneLogits(pipe.model)
    fast = FastBackboneLogits(pipe.model, eager=True)
    mask, lo, hi = pipe.tokens.ids.mask, pipe.image_token_offset, pipe.config.vocab_size
    assert [fast.row_bucket(r) for r in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]

    def text(q, n=70):
        image = list(range(lo, lo + 4))
        return DenoiseRequest(rows=[pipe.tokens.understand_prompt([(image, 2, 2)], q)], pad_lens=[0],
                              gen_length=n, steps=4)

    def t2i(p):
        rows, pads = align_rows(pipe.tokens.t2i_prompts(p, 2, 3), mask)
        return DenoiseRequest(rows=rows, pad_lens=pads, gen_length=6, steps=3, vocab=(lo, hi),
                              guidance=Guidance(kind="simple", scale=3.0))
    batch = [text("Hi"), t2i("a red cube")]  # 3 rows: a bucket of 4
    assert generate(fast, batch, mask_id=mask).tokens == generate(clear, batch, mask_id=mask).tokens
    first = fast._pool[(4, 512)]
    assert first.rows == 4 and first.real_rows == 3
    three = [text("Yo"), text("What?"), text("Who?")]  # 3 rows again: the same pooled cache
    assert generate(fast, three, mask_id=mask).tokens == generate(clear, three, mask_id=mask).tokens
    assert fast._pool[(4, 512)] is first
    for joining in ([text("late")], [t2i("two cats"), t2i("a dog")]):
        calls = []

        def admit(block, length, fits=None, joining=joining):
            if fits is not None:  # at block boundaries only
                return []
            calls.append(block)
            return list(joining) if len(calls) == 2 else []
        start = [text("Hi", 120), t2i("a boat")]  # 3 rows; +1 fits the bucket, +4 needs a larger one
        out = generate(fast, start, mask_id=mask, admit=admit)
        alone = [generate(clear, [r], mask_id=mask).tokens[0] for r in (*start, *joining)]
        assert out.tokens == alone


def test_extend_cache_keeps_every_row(tiny_model):
    fast = FastBackboneLogits(tiny_model, eager=True)
    g = torch.Generator().manual_seed(0)
    for ra, rb in ((3, 1), (3, 4)):  # fits the bucket of 4 in place; needs the bucket of 8
        cache = fast.new_cache(ra, 100)
        extra = fast.new_rows(rb, 100)
        for c in (cache, extra):
            c.k.copy_(torch.randn(c.k.shape, generator=g))
            c.v.copy_(torch.randn(c.v.shape, generator=g))
        cache.length = 64
        want_k = torch.cat([cache.k[:, :ra], extra.k[:, :rb]], dim=1).clone()
        want_v = torch.cat([cache.v[:, :ra], extra.v[:, :rb]], dim=1).clone()
        out = fast.extend_cache(cache, extra)
        assert (out is cache) == (ra + rb <= 4) and out.rows == fast.row_bucket(ra + rb)
        assert out.real_rows == ra + rb and out.length == 64
        assert torch.equal(out.k[:, : ra + rb], want_k) and torch.equal(out.v[:, : ra + rb], want_v)


def test_warm_up_fills_the_pool_that_generations_then_reuse(tiny_dir):
    from llada2uni.sampling.block import DenoiseRequest, generate
    pipe = LLaDA2Uni.from_pretrained(tiny_dir, device="cpu", dtype="float32")
    fast = FastBackboneLogits(pipe.model, eager=True, vocab_slices=False)
    assert [fast.length_bucket(n) for n in (1, 512, 513, 1500, 2049)] == [512, 512, 1024, 2048, 4096]
    picks = []
    fast.greedy_pick = lambda guidance, rows, vocab, moments=None: picks.append(
        (guidance.kind, rows.shape[:2], vocab, moments is not None))
    report = fast.warm_up(rows=(1, 2, 3, 8), lengths=(300, 1500), image_lengths=(300,))
    image = (pipe.image_token_offset, pipe.config.vocab_size)
    # the batched greedy choice of each guidance kind is compiled too
    assert picks == [("none", (1, 2), None, False), ("simple", (2, 2), image, False), ("edit", (2, 2), image, False)]
    picks.clear()
    fast.vocab_slices = True  # and over the image ids alone, with moments
    fast.warm_up(rows=(1,), lengths=(), image_lengths=(300,))
    assert ("simple", (2, 2), image, True) in picks and ("edit", (2, 2), image, True) in picks
    fast.vocab_slices = False
    fast.greedy_pick = None
    keys = [(1, 512), (1, 2048), (2, 512), (2, 2048), (4, 512), (4, 2048), (8, 512), (8, 2048)]
    assert report["caches"] == keys and sorted(fast._pool) == keys
    assert fast.POOL >= len(keys)  # none of the warmed caches is evicted by the next ones
    warmed = dict(fast._pool)
    image = list(range(pipe.image_token_offset, pipe.image_token_offset + 4))
    reqs = [DenoiseRequest(rows=[pipe.tokens.understand_prompt([(image, 2, 2)], q)], pad_lens=[0],
                           gen_length=40, steps=4) for q in ("a", "b", "c")]
    out = generate(fast, reqs, mask_id=pipe.tokens.ids.mask)
    assert out.tokens == generate(BackboneLogits(pipe.model), reqs, mask_id=pipe.tokens.ids.mask).tokens
    assert fast._pool == warmed and all(fast._pool[k] is warmed[k] for k in keys)  # reused, not new


def test_finished_requests_leave_and_late_ones_grow_the_canvas(tiny_dir):
    """Continuous batching: a request whose canvas completes leaves the forward (its cache rows
    dropped, the row bucket shrinking), and a request joining after the batch's canvas would have
    ended grows it within the cache's length bucket; every request decodes as it would alone."""
    from llada2uni.sampling.block import DenoiseRequest, admission_end, generate
    pipe = LLaDA2Uni.from_pretrained(tiny_dir, device="cpu", dtype="float32")
    mask, lo = pipe.tokens.ids.mask, pipe.image_token_offset
    clear = BackboneLogits(pipe.model)

    class Recording(FastBackboneLogits):
        def __call__(self, ids, start, pad_lens, cache, num_logits):
            self.seen.append((ids.shape[0], cache.rows if cache is not None else 0))
            return super().__call__(ids, start, pad_lens, cache, num_logits)

    def text(q, n):
        image = list(range(lo, lo + 4))
        return DenoiseRequest(rows=[pipe.tokens.understand_prompt([(image, 2, 2)], q)], pad_lens=[0],
                              gen_length=n, steps=4)
    # 4 rows (bucket 4): the short one leaves first (the rest move up in place), the late one outlives
    # the long ones (alone in a 1-row cache)
    start = [text("a", 20), text("Hi", 64), text("Yo", 64), text("Who?", 64)]
    late = [text("late", 90)]
    canvas = max(admission_end(r, 0, 32) for r in start)
    limits = []

    def admit(block, limit, fits=None):
        if fits is not None:  # at block boundaries only
            return []
        limits.append((block, limit))
        return list(late) if len(limits) == 3 else []
    fast = Recording(pipe.model, eager=True)
    fast.seen = []
    out = generate(fast, start, mask_id=mask, admit=admit)
    alone = [generate(clear, [r], mask_id=mask).tokens[0] for r in (*start, *late)]
    assert out.tokens == alone
    join_block = limits[2][0]
    assert limits[2][1] == 512 and admission_end(late[0], join_block, 32) > canvas  # it needed the room
    rows = [r for r, _ in fast.seen]
    assert rows[0] == 4 and 3 in rows and 1 in rows  # the short one left; the late one ran on
    assert (1, 1) in fast.seen  # ... in a cache of the 1-row bucket (cheaper graphs)
    assert out.row_forwards == sum(rows)
    # the clear path: finished requests leave too (no growth: it has no canvas_limit)
    out = generate(clear, start, mask_id=mask)
    assert out.tokens == alone[:4] and out.row_forwards < 4 * out.forwards


def test_retire_rows_moves_the_kept_rows_to_the_front(tiny_model):
    fast = FastBackboneLogits(tiny_model, eager=True)
    g = torch.Generator().manual_seed(0)
    for keep, bucket in (([1, 2, 3], 4), ([0, 1], 2), ([2], 1)):  # in place; smaller buckets
        cache = fast.new_cache(4, 100)
        cache.k.copy_(torch.randn(cache.k.shape, generator=g))
        cache.v.copy_(torch.randn(cache.v.shape, generator=g))
        cache.length = 64
        want_k, want_v = cache.k[:, keep].clone(), cache.v[:, keep].clone()
        out = fast.retire_rows(cache, keep)
        assert (out is cache) == (bucket == 4) and out.rows == bucket and out.real_rows == len(keep)
        assert out.length == 64 and out.max_len == cache.max_len
        assert torch.equal(out.k[:, : len(keep)], want_k) and torch.equal(out.v[:, : len(keep)], want_v)


GUIDANCES = [("none", {}), ("simple", dict(scale=4.0)), ("simple", dict(scale=4.0, rescale=0.7)),
             ("edit", dict(text_scale=7.5, rescale=0.7)), ("edit", dict(text_scale=7.5, image_scale=1.5, rescale=0.7)),
             ("edit", dict(text_scale=5.0, image_scale=1.5))]


def _pick_cases(device, dtype, v=300):
    from llada2uni.sampling.guidance import Guidance
    g = torch.Generator(device="cpu").manual_seed(0)
    for kind, kw in GUIDANCES:
        guidance = Guidance(kind, **kw)
        for vocab in (None, (100, 260)):
            for shape in ((3, 32), (3, 5, 32)):  # one request [R, B, V]; a run of five [R, G, B, V]
                rows = (torch.randn(*shape, v, generator=g) * 3).to(device, dtype)
                yield guidance, rows, vocab


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_greedy_pick_equals_greedy_pick(dtype):
    from llada2uni.runtime import FusedGreedyPick
    from llada2uni.sampling.unmask import greedy_pick, row_moments
    fused = FusedGreedyPick(backend="eager")  # the maths; the inductor build is checked on the GPU
    for guidance, rows, vocab in _pick_cases("cpu", dtype):
        pred, conf = greedy_pick(guidance, rows, vocab)
        fpred, fconf = fused(guidance, rows, vocab)
        assert torch.equal(pred, fpred), (guidance, vocab, rows.shape)
        torch.testing.assert_close(fconf, conf, rtol=1e-5, atol=1e-7)
        if vocab is not None:
            assert ((pred >= vocab[0]) & (pred < vocab[1])).all()
            # the logits of the slice alone, with the full vocabulary's moments
            flat = rows if rows.dim() == 3 else rows.transpose(0, 1).reshape(-1, *rows.shape[2:])
            runs = 1 if rows.dim() == 3 else rows.shape[1]
            moments = row_moments(flat).select(0, rows.shape[0], runs)
            if rows.dim() == 3:  # one request: [R, B] sums, [B, R, R] cross
                moments = type(moments)(moments.sums[:, 0], moments.cross[0], moments.vocab_size)
            spred, sconf = fused(guidance, rows[..., vocab[0]:vocab[1]], vocab, moments)
            assert torch.equal(spred, pred), (guidance, rows.shape)
            torch.testing.assert_close(sconf, conf, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="needs 2 rows"):
        from llada2uni.sampling.guidance import Guidance
        fused(Guidance("simple", scale=2.0), torch.zeros(1, 4, 10), None)


def test_generate_takes_the_logits_fns_fused_pick(tiny_model):
    from llada2uni.runtime import FusedGreedyPick
    from llada2uni.sampling.block import DenoiseRequest, generate
    from llada2uni.sampling.guidance import Guidance
    mask = tiny_model.config.mask_token_id
    reqs = [DenoiseRequest(rows=[[5, 6, 7 + i], [mask, mask, 9]], pad_lens=[0, 2], gen_length=40, steps=4,
                           guidance=Guidance("simple", scale=3.0, rescale=0.7), vocab=(50, 200)) for i in range(2)]
    reqs.append(DenoiseRequest(rows=[[8, 9]], pad_lens=[0], gen_length=40, steps=8))
    fast = FastBackboneLogits(tiny_model, eager=True)
    assert fast.greedy_pick is None  # only with compile=True
    plain = generate(fast, reqs, mask_id=mask).tokens
    calls = []
    inner = FusedGreedyPick(backend="eager")
    fast.greedy_pick = lambda *a: (calls.append(a[1].shape), inner(*a))[1]
    assert generate(fast, reqs, mask_id=mask).tokens == plain
    # [CFG rows, requests, B, V]: the run of two guided requests, the unguided one alone
    assert {c[:3] for c in calls} == {(2, 2, 32), (1, 1, 32)}
    for m in tiny_model.modules():
        if hasattr(m, "dispatch"):
            from llada2uni.ops.moe import experts_reference
            m.dispatch = experts_reference


def test_router_gemm_reads_a_lossless_low_precision_gate():
    from llada2uni.runtime import _lossless_gate, router_logits
    w = torch.randn(16, 64)
    assert _lossless_gate(w, torch.bfloat16) is w  # fp32 values bf16 cannot hold: kept fp32
    exact = w.bfloat16().float()
    low = _lossless_gate(exact, torch.bfloat16)
    assert low.dtype == torch.bfloat16 and torch.equal(low.float(), exact)
    assert _lossless_gate(exact, torch.float32) is exact
    x = torch.randn(5, 64).bfloat16()
    ref = torch.nn.functional.linear(x.float(), exact)
    torch.testing.assert_close(router_logits(x, exact), ref)  # CPU: the fp32 GEMM
    assert router_logits(x, low).dtype == torch.float32


@pytest.mark.gpu
def test_fused_pick_and_router_gemm_on_gpu():
    from llada2uni.runtime import FusedGreedyPick, router_logits
    from llada2uni.sampling.unmask import greedy_pick
    fused = FusedGreedyPick()  # inductor
    for guidance, rows, vocab in _pick_cases("cuda", torch.bfloat16, v=20000):
        pred, conf = greedy_pick(guidance, rows, vocab)
        fpred, fconf = fused(guidance, rows, vocab)
        assert (pred == fpred).float().mean() > 0.99, (guidance, vocab)  # fp32 rounding may flip a near-tie
        torch.testing.assert_close(fconf, conf, rtol=1e-4, atol=1e-6)
    assert not any(p.failed for p in fused.parts.values())
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1024, 2048, device="cuda", generator=g).bfloat16()
    w = (torch.randn(256, 2048, device="cuda", generator=g) / 45).bfloat16()
    ref = x.double() @ w.double().T
    out = router_logits(x, w)
    assert out.dtype == torch.float32
    # fp32 accumulation (measured 2.6e-6 of the largest logit); bf16 output would be ~2e-3
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_a_warmed_fused_pick_does_not_recompile_for_larger_runs(tiny_model):
    """warm_up's picks (two requests) leave graphs that every later run of requests reuses: the
    same layout as the sampler's (a view of adjacent rows), the run length symbolic."""
    from llada2uni.runtime import FusedGreedyPick, reset_compiled
    from llada2uni.sampling.guidance import Guidance
    reset_compiled()  # the parts are process-wide: other tests' layouts and dtypes are not this one's
    fast = FastBackboneLogits(tiny_model, eager=True)
    fast.greedy_pick = FusedGreedyPick(backend="eager")
    fast.warm_up(rows=(1,), lengths=(64,))
    before = {k: p.compiles for k, p in fast.greedy_pick.parts.items()}
    v, lo = tiny_model.config.vocab_size, tiny_model.config.image_token_offset
    for g in (3, 8, 17):
        with torch.inference_mode():  # g T2I requests, as the forward returns them (inference tensors)
            logits = torch.randn(2 * g, 32, v)
            text = torch.randn(g, 32, v)
            part = logits[..., lo:].contiguous()  # as the sliced step returns it
            moments = VocabMoments(torch.randn(2 * g, 32), torch.rand(32, 2 * g, 2 * g) + 10.0, v)
        fast.greedy_pick(Guidance("simple", scale=4.0, rescale=0.7), logits.view(g, 2, 32, v).transpose(0, 1),
                         (lo, v))
        fast.greedy_pick(Guidance(), text.view(g, 1, 32, v).transpose(0, 1), None)
        # and the image ids alone, with the full vocabulary's moments (vocab_slices)
        fast.greedy_pick(Guidance("simple", scale=4.0, rescale=0.7), part.view(g, 2, 32, v - lo).transpose(0, 1),
                         (lo, v), moments.select(0, 2, g))
    assert {k: p.compiles for k, p in fast.greedy_pick.parts.items()} == before
    assert not any(p.failed for p in fast.greedy_pick.parts.values())
    # a SPRINT batch of T2I requests too: its first forward of a block also returns the newly final
    # block's logits, so the block's own are a slice of them
    from llada2uni.sampling.block import DenoiseRequest, generate
    from llada2uni.sampling.sprint import Sprint
    mask = tiny_model.config.mask_token_id
    reqs = [DenoiseRequest(rows=[[5, 6, 7 + i, 8], [mask, 8, 9, 10]], pad_lens=[0, 1], gen_length=40, steps=4,
                           guidance=Guidance("simple", scale=3.0, rescale=0.7), vocab=(lo, v)) for i in range(3)]
    out = generate(fast, reqs, mask_id=mask, sprint=Sprint(keep_ratio=0.5, cache_warmup_steps=1), image_offset=lo)
    assert out.pruned and {k: p.compiles for k, p in fast.greedy_pick.parts.items()} == before
    for m in tiny_model.modules():
        if hasattr(m, "dispatch"):
            from llada2uni.ops.moe import experts_reference
            m.dispatch = experts_reference


def test_vocab_slice_step_returns_the_full_vocab_moments(tiny_model):
    """The fast path's image-canvas step: logits of ids [lo, hi) only, and moments (from the LM head's
    Gram matrix) equal to those of the full logits; the sampler asks for it and decodes the same."""
    from llada2uni.sampling.block import DenoiseRequest, generate
    from llada2uni.sampling.guidance import Guidance
    from llada2uni.sampling.unmask import row_moments
    g = torch.Generator().manual_seed(1)
    cfg = tiny_model.config
    ids = torch.randint(0, cfg.vocab_size, (3, 96), generator=g)
    pads = torch.tensor([0, 4, 9])
    lo, hi = cfg.image_token_offset, cfg.vocab_size
    fast = FastBackboneLogits(tiny_model, eager=True)
    full = _window_logits(fast, ids, pads, [(0, 64), (64, 96)])[-1]
    cache = fast.new_cache(3, 128)
    fast(ids[:, :64], 0, pads, cache, 32)
    part, moments = fast(ids[:, 64:96], 64, pads, cache, 32, vocab=(lo, hi))
    torch.testing.assert_close(part, full[..., lo:hi], rtol=1e-4, atol=1e-4)
    ref = row_moments(full)
    torch.testing.assert_close(moments.sums, ref.sums, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(moments.cross, ref.cross, rtol=1e-4, atol=1e-2)
    assert moments.vocab_size == cfg.vocab_size
    with pytest.raises(ValueError, match="need a cache"):
        fast(ids[:, :32], 0, pads, None, 32, vocab=(lo, hi))
    with pytest.raises(ValueError, match="not a range of ids"):
        fast(ids[:, 64:96], 64, pads, cache, 32, vocab=(lo, hi + 1))
    # the loop slices when every request is a greedy image canvas, and decodes as the full logits do
    mask = cfg.mask_token_id
    reqs = [DenoiseRequest(rows=[[5, 6, 7 + i], [mask, 8, 9]], pad_lens=[0, 1], gen_length=40, steps=4,
                           guidance=Guidance("simple", scale=3.0, rescale=0.7), vocab=(lo, hi)) for i in range(2)]
    calls = []
    inner = fast.__call__

    class Spy:
        vocab_slices, new_cache, extend_cache = True, fast.new_cache, fast.extend_cache

        def __call__(self, *a, **kw):
            calls.append(kw.get("vocab"))
            return inner(*a, **kw)
    sliced = generate(Spy(), reqs, mask_id=mask).tokens
    assert calls and all(c == (lo, hi) for c in calls)
    assert sliced == generate(BackboneLogits(tiny_model), reqs, mask_id=mask).tokens
    # a request that samples (its own draw over every allowed id) keeps the whole forward unsliced
    calls.clear()
    sampled = DenoiseRequest(rows=[[5, 6, 9], [mask, 8, 9]], pad_lens=[0, 1], gen_length=40, steps=4,
                             guidance=Guidance("simple", scale=3.0, rescale=0.7), vocab=(lo, hi), temperature=1.0,
                             generator=torch.Generator().manual_seed(0))
    generate(Spy(), reqs + [sampled], mask_id=mask)
    assert calls and all(c is None for c in calls)
    for m in tiny_model.modules():
        if hasattr(m, "dispatch"):
            from llada2uni.ops.moe import experts_reference
            m.dispatch = experts_reference


def test_background_precompile_leaves_the_real_steps_nothing_to_compile(tiny_model):
    """``Precompile`` compiles the step parts in a thread on a small random model of the config's
    shapes; the real model's steps (one row and several, graph windows and prefills) then reuse those
    graphs: the compile count does not move, and the logits are the uncompiled step's."""
    from llada2uni.runtime import Precompile, reset_compiled
    reset_compiled()
    report = Precompile(tiny_model.config, "cpu", torch.float32, backend="eager", prefill=100).join()
    assert "error" not in report and report["compiled"] >= 4  # attention + combine, one row and several
    eager = FastBackboneLogits(tiny_model, eager=True)
    fast = FastBackboneLogits(tiny_model, eager=True, compile=True, compile_backend="eager")
    before = fast.step.compiles
    g = torch.Generator().manual_seed(3)
    for rows, prompt in [(2, 75), (1, 40), (3, 130), (1, 97)]:
        ids = torch.randint(0, tiny_model.config.vocab_size, (rows, prompt + 64), generator=g)
        pads = torch.randint(0, 5, (rows,), generator=g)
        start = prompt // 32 * 32
        spans = [(0, start + 32), (start, start + 64), (start + 32, start + 64)]
        for a, b in zip(_window_logits(eager, ids, pads, spans), _window_logits(fast, ids, pads, spans)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert fast.step.compiles == before

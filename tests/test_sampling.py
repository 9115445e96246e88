"""Sampling: schedules, unmasking, guidance and the block loop, against mock models on CPU."""

import math

import pytest
import torch

from llada2uni.sampling.block import DenoiseRequest, admission_end, generate
from llada2uni.sampling.guidance import Guidance, cfg_edit, cfg_rescale, cfg_simple, combine
from llada2uni.sampling.schedules import tokens_per_step
from llada2uni.sampling.unmask import (
    restrict_vocab,
    sample_tokens,
    select_transfer,
)

V = 48
MASK = V - 1
B = 8


class MockModel:
    """Deterministic stand-in for the backbone. A position's "KV" is emb[id] + pos_emb[rope position];
    a query adds the mean of the visible keys (block-causal, pad keys hidden) to its own feature and
    projects to V logits. Supports an exact KV cache, and records every window it is shown."""

    def __init__(self, block=B, sharpness=3.0, seed=0, max_len=256, dim=16):
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(V, dim, generator=g)
        self.pos = torch.randn(max_len, dim, generator=g)
        self.out = torch.randn(dim, V, generator=g) * sharpness
        self.block, self.dim = block, dim
        self.calls = []  # (start, ids)

    def new_cache(self, rows, max_len):
        return torch.zeros(rows, max_len, self.dim)

    def __call__(self, ids, start, pad_lens, cache, num_logits):
        self.calls.append((start, ids.clone()))
        end = start + ids.shape[1]
        phys = torch.arange(start, end)
        pos = (phys[None] - pad_lens[:, None]).clamp(min=0)
        h = self.emb[ids] + self.pos[pos]  # [R, W, D]
        if cache is None:
            assert start == 0
            keys = h
        else:
            cache[:, start:end] = h
            keys = cache[:, :end]
        kphys = torch.arange(end)
        visible = (kphys[None, :] // self.block) <= (phys[:, None] // self.block)  # [W, end]
        visible = visible[None] & (kphys[None, None, :] >= pad_lens[:, None, None])  # [R, W, end]
        vis = visible.float()
        ctx = (vis @ keys) / vis.sum(-1, keepdim=True).clamp(min=1)
        return (torch.tanh(h + ctx) @ self.out)[:, -num_logits:]


class PositionModel:
    """Peaked logits: physical position p predicts token_at(p) with probability ~1."""

    def __init__(self, token_at, peak=30.0):
        self.token_at, self.peak = token_at, peak
        self.calls = []

    def __call__(self, ids, start, pad_lens, cache, num_logits):
        self.calls.append((start, ids.clone()))
        end = start + ids.shape[1]
        logits = torch.zeros(ids.shape[0], num_logits, V)
        for j, p in enumerate(range(end - num_logits, end)):
            logits[:, j, self.token_at(p)] = self.peak
        return logits


def req(prompt, gen, steps, **kw):
    return DenoiseRequest(rows=[prompt], pad_lens=[0], gen_length=gen, steps=steps, **kw)


# ---- schedules ----


def test_tokens_per_step():
    assert tokens_per_step(32, 8) == [4] * 8
    assert tokens_per_step(32, 5) == [7, 7, 6, 6, 6]
    for steps in (1, 3, 7, 31, 32):
        s = tokens_per_step(32, steps)
        assert sum(s) == 32 and len(s) == steps and min(s) >= 1
    # as the official: steps past the block length are scheduled 0 (threshold-only) steps
    assert tokens_per_step(32, 40) == [1] * 32 + [0] * 8
    with pytest.raises(ValueError):
        tokens_per_step(32, 0)


# ---- unmask ----


def test_restrict_vocab():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    out = restrict_vocab(logits, 10, 20)
    assert torch.equal(out[:, 10:20], logits[:, 10:20])
    assert torch.isneginf(out[:, :10]).all() and torch.isneginf(out[:, 20:]).all()


def test_sample_tokens_greedy_and_filters():
    # distinct values: no argmax ties
    logits = torch.randperm(V, generator=torch.Generator().manual_seed(0)).repeat(5, 1).to(torch.bfloat16) / 8
    pred, conf = sample_tokens(logits)
    probs = torch.softmax(logits.float(), -1)
    assert pred.dtype == torch.long and conf.dtype == torch.float32
    assert torch.equal(pred, probs.argmax(-1))
    assert torch.allclose(conf, probs.max(-1).values)
    g = torch.Generator().manual_seed(0)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        pred_k, conf_k = sample_tokens(logits, temperature=1.0, generator=g, **kw)
        assert torch.equal(pred_k, pred) and torch.allclose(conf_k, torch.ones(5))


def test_sample_tokens_temperature_seeded():
    logits = torch.randn(64, V, generator=torch.Generator().manual_seed(0))
    a = sample_tokens(logits, 1.0, generator=torch.Generator().manual_seed(3))
    b = sample_tokens(logits, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    probs = torch.softmax(logits, -1)
    assert torch.allclose(a[1], probs.gather(-1, a[0][:, None])[:, 0])  # confidence = drawn token's prob
    top = sample_tokens(logits, 1.0, top_k=3, generator=torch.Generator().manual_seed(3))[0]
    assert torch.isin(top[:, None], logits.topk(3, -1).indices).any(-1).all()


def test_select_transfer():
    conf = torch.tensor([0.2, 0.99, 0.5, 0.97, 0.1, 0.3])
    active = torch.tensor([True, False, True, True, True, True])
    # top-2 of active = {3, 2}; threshold 0.96 adds nothing new; the inactive 0.99 is never chosen
    assert select_transfer(conf, active, 2, 0.96).tolist() == [False, False, True, True, False, False]
    # union: top-1 = {3} plus everything active above 0.25 -> {2, 3, 5}
    assert select_transfer(conf, active, 1, 0.25).tolist() == [False, False, True, True, False, True]
    # k larger than the active count selects all active, nothing else
    assert torch.equal(select_transfer(conf, active, 99, 2.0), active)
    assert not select_transfer(conf, torch.zeros(6, dtype=torch.bool), 3, 0.0).any()
    # k = 0: threshold alone
    assert select_transfer(conf, active, 0, 0.9).tolist() == [False, False, False, True, False, False]
    # ties go to the lower position, also when inactive positions share the score
    tie = torch.full((6,), 0.5)
    act = torch.tensor([False, True, False, True, True, True])
    assert select_transfer(tie, act, 2, 0.9).tolist() == [False, True, False, True, False, False]
    # active positions with -inf scores still fill k before any inactive one
    neg = torch.tensor([float("-inf")] * 4)
    assert select_transfer(neg, torch.tensor([False, True, False, True]), 2, 0.9).tolist() == [
        False, True, False, True,
    ]


# ---- guidance ----


def test_guidance_formulas():
    c, u, n = torch.randn(3, 4, V, generator=torch.Generator().manual_seed(1)).unbind(0)
    assert torch.allclose(cfg_simple(c, u, 2.5), u + 2.5 * (c - u), atol=1e-5)
    assert torch.allclose(cfg_edit(c, u, n, 3.0, 1.5), u + 3.0 * (c - u) + 1.5 * (u - n), atol=1e-5)
    # the official evaluation order, bit for bit (near-tied argmaxes follow the floats)
    assert torch.equal(cfg_simple(c, u, 2.5), u + 2.5 * (c - u))
    assert torch.equal(cfg_edit(c, u, n, 3.0, 1.5), u + 3.0 * (c - u) + 1.5 * (u - n))
    rows = torch.stack([c, u, n])
    assert torch.equal(combine(Guidance(), rows[:1]), c)
    assert torch.allclose(combine(Guidance("simple", scale=2.0), rows[:2]), u + 2 * (c - u), atol=1e-5)
    edit3 = Guidance("edit", text_scale=4.0, image_scale=1.5)
    assert torch.allclose(combine(edit3, rows), u + 4 * (c - u) + 1.5 * (u - n), atol=1e-5)
    edit2 = Guidance("edit", text_scale=4.0)
    assert torch.allclose(combine(edit2, rows[:2]), u + 4 * (c - u), atol=1e-5)
    assert [Guidance().num_rows, Guidance("simple").num_rows, edit2.num_rows, edit3.num_rows] == [1, 2, 2, 3]
    with pytest.raises(ValueError):
        Guidance("weird")
    with pytest.raises(ValueError):
        combine(edit3, rows[:2])


def test_cfg_rescale():
    c, u = torch.randn(2, 4, V, generator=torch.Generator().manual_seed(2)).unbind(0)
    g = cfg_simple(c, u, 4.0)
    assert torch.equal(cfg_rescale(g, c, 0.0), g)
    full = cfg_rescale(g, c, 1.0)
    assert torch.allclose(full.std(-1), c.std(-1), rtol=1e-4)
    assert torch.allclose(full, g * c.std(-1, keepdim=True) / g.std(-1, keepdim=True), rtol=1e-4)
    half = cfg_rescale(g, c, 0.7)
    assert torch.equal(half, 0.7 * (g * (c.std(-1, keepdim=True) / (g.std(-1, keepdim=True) + 1e-6))) + 0.3 * g)
    half = combine(Guidance("simple", scale=4.0, rescale=0.5), torch.stack([c, u]))
    assert torch.allclose(half, 0.5 * full + 0.5 * g, atol=1e-5)


# ---- block loop ----


def test_steps_per_block_absolute_blocks():
    # Lp = 12 with B = 8: block 1 holds 4 masks (12..15), block 2 holds 8 (16..23).
    prompt = list(range(1, 13))
    for steps, expect in ((8, [4, 8]), (4, [2, 4]), (100, [4, 8])):
        model = MockModel()
        out = generate(model, [req(prompt, 10, steps, threshold=2.0)], mask_id=MASK, block_length=B)
        assert out.first_block == 1 and out.steps_per_block == expect and out.forwards == sum(expect)
        assert len(out.tokens[0]) == 10
    # the cached window starts at 0 (prefill), then at the first non-final block
    assert [s for s, _ in model.calls] == [0, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16]
    assert [ids.shape[1] for _, ids in model.calls][:5] == [16, 8, 8, 8, 16]


def test_block_length_32_default_and_steps():
    out = generate(MockModel(block=32), [req(list(range(1, 33)), 64, 8, threshold=2.0)], mask_id=MASK)
    assert out.steps_per_block == [8, 8] and out.forwards == 16


def test_threshold_commits_more_than_k():
    model = PositionModel(lambda p: 1 + p % 7)
    out = generate(model, [req([1, 2, 3, 4, 5, 6, 7, 8], 24, 8, threshold=0.9)], mask_id=MASK, block_length=B)
    assert out.steps_per_block == [1, 1, 1] and out.tokens[0] == [1 + p % 7 for p in range(8, 32)]


def test_cached_equals_uncached():
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    model = MockModel()
    outs = [
        generate(fn, [req(prompt, 21, 4)], mask_id=MASK, block_length=B, use_cache=uc)
        # a callable without new_cache runs uncached even when use_cache is asked for
        for fn, uc in ((model, True), (model, False), (lambda *a: model(*a), True))
    ]
    assert outs[0].tokens == outs[1].tokens == outs[2].tokens
    assert outs[0].forwards == outs[1].forwards
    assert MASK not in outs[0].tokens[0]


def _mixed_requests():
    m = MASK
    return [
        req([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 13, 4),
        DenoiseRequest(  # simple CFG; the conditional row is the left-padded one
            rows=[[m, m, 3, 4, 5], [9, 8, 7, 6, 5]], pad_lens=[2, 0], gen_length=20, steps=8,
            guidance=Guidance("simple", scale=2.5, rescale=0.5),
        ),
        DenoiseRequest(  # editing CFG, image-code vocabulary, seeded temperature sampling
            rows=[list(range(1, 31)), [m] * 4 + list(range(5, 31)), list(range(2, 32))],
            pad_lens=[0, 4, 0], gen_length=9, steps=3,
            guidance=Guidance("edit", text_scale=3.0, image_scale=1.5), vocab=(10, 30),
            temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(11),
        ),
        req([20, 21, 22], 30, 8, stop_ids=frozenset({5, 6})),
    ]


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_equals_alone(use_cache):
    batched = generate(MockModel(), _mixed_requests(), mask_id=MASK, block_length=B, use_cache=use_cache)
    alone = [
        generate(MockModel(), [r], mask_id=MASK, block_length=B, use_cache=use_cache).tokens[0]
        for r in _mixed_requests()
    ]
    assert batched.tokens == alone
    assert all(10 <= t < 30 for t in batched.tokens[2])
    assert all(MASK not in t for t in batched.tokens)


def test_cfg_scale_one_equals_no_cfg():
    prompt = [4, 8, 15, 16, 23, 42, 1, 2, 3]
    plain = generate(MockModel(), [req(prompt, 20, 4)], mask_id=MASK, block_length=B)
    cfg1 = DenoiseRequest(
        rows=[prompt, [9, 9, 9, 9, 9, 9, 9, 9, 9]], pad_lens=[0, 0], gen_length=20, steps=4,
        guidance=Guidance("simple", scale=1.0),
    )
    assert generate(MockModel(), [cfg1], mask_id=MASK, block_length=B).tokens == plain.tokens
    strong = DenoiseRequest(**{**cfg1.__dict__, "guidance": Guidance("simple", scale=5.0)})
    assert generate(MockModel(), [strong], mask_id=MASK, block_length=B).tokens != plain.tokens


@pytest.mark.parametrize("pad, lp", [(2, 5), (9, 12)])  # the pads reach into the first decoded block
def test_left_padded_cfg_row(pad, lp):
    m = MASK
    model = MockModel()
    r = DenoiseRequest(
        rows=[[m] * pad + list(range(1, lp - pad + 1)), list(range(11, 11 + lp))],
        pad_lens=[pad, 0], gen_length=15, steps=4, guidance=Guidance("simple", scale=3.0),
    )
    for use_cache in (True, False):
        out = generate(model, [r], mask_id=MASK, block_length=B, use_cache=use_cache)
        assert len(out.tokens[0]) == 15 and MASK not in out.tokens[0]
    for start, ids in model.calls:
        assert (ids[0, : max(pad - start, 0)] == m).all()  # pads are never committed
        lo = max(lp - start, 0)
        assert torch.equal(ids[0, lo:], ids[1, lo:])  # CFG rows share the canvas


def test_vocab_restriction_keeps_range():
    for temperature in (0.0, 1.5):
        g = torch.Generator().manual_seed(0)
        r = req([1, 2, 3], 40, 4, vocab=(5, 12), temperature=temperature, generator=g)
        out = generate(MockModel(), [r], mask_id=MASK, block_length=B)
        assert all(5 <= t < 12 for t in out.tokens[0])


def test_stop_id():
    stop = 2
    # stop at generated index 13 (physical 21, block 2); everything else is not a stop id
    model = PositionModel(lambda p: stop if p in (21, 30) else 10 + p % 5)
    prompt = [1] * 8
    full = generate(model, [req(prompt, 40, 8)], mask_id=MASK, block_length=B)
    cut = generate(model, [req(prompt, 40, 8, stop_ids=frozenset({stop}))], mask_id=MASK, block_length=B)
    assert len(full.tokens[0]) == 40 and not full.stopped[0]
    assert cut.tokens[0] == full.tokens[0][:14] and cut.tokens[0][-1] == stop and cut.stopped[0]
    assert cut.forwards < full.forwards and cut.forwards == 2
    # a stopped request does not hold back the others
    reqs = [req(prompt, 40, 8, stop_ids=frozenset({stop})), req(prompt, 40, 8)]
    both = generate(model, reqs, mask_id=MASK, block_length=B)
    assert both.tokens == [cut.tokens[0], full.tokens[0]]


def test_temperature_reproducible():
    def run(seed):
        r = req([5, 6, 7], 30, 4, temperature=1.0, generator=torch.Generator().manual_seed(seed))
        return generate(MockModel(sharpness=0.5), [r], mask_id=MASK, block_length=B).tokens[0]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_progress_and_validation():
    seen = []
    progress = lambda done, total: seen.append((done, total))  # noqa: E731
    generate(MockModel(), [req([1] * 10, 20, 4)], mask_id=MASK, block_length=B, progress=progress)
    assert seen == [(1, math.ceil(30 / B) - 1), (2, 3), (3, 3)]
    with pytest.raises(ValueError):
        generate(MockModel(), [DenoiseRequest([[1], [2]], [0, 0], 4, 4)], mask_id=MASK)  # 2 rows, no CFG



def test_on_tokens_reports_committed_prefixes_after_each_block():
    seen = {}
    reqs = [DenoiseRequest(rows=[[1, 2, 3]], pad_lens=[0], gen_length=20, steps=4),
            DenoiseRequest(rows=[[4, 5, 6, 7, 8, 9, 10, 11, 12, 13]], pad_lens=[0], gen_length=9, steps=2)]
    out = generate(MockModel(), reqs, mask_id=MASK, block_length=B,
                   on_tokens=lambda r, ids: seen.setdefault(r, []).append(ids))
    for r, req in enumerate(reqs):
        prefixes = seen[r]
        assert len(prefixes) >= 2  # one report per block the request spans
        assert all(b[:len(a)] == a and len(b) > len(a) for a, b in zip(prefixes, prefixes[1:]))
        assert prefixes[-1] == out.tokens[r]
        assert MASK not in prefixes[0]  # only committed tokens are reported


def test_on_finish_reports_each_request_when_its_canvas_completes():
    order = []
    reqs = [DenoiseRequest(rows=[[1, 2, 3]], pad_lens=[0], gen_length=40, steps=4),
            DenoiseRequest(rows=[[4, 5, 6]], pad_lens=[0], gen_length=5, steps=4)]
    out = generate(MockModel(), reqs, mask_id=MASK, block_length=B,
                   on_finish=lambda r, ids: order.append((r, ids)))
    assert [r for r, _ in order] == [1, 0]  # the short request leaves first
    assert dict(order) == {0: out.tokens[0], 1: out.tokens[1]}


class _ExtendableMock(MockModel):
    @staticmethod
    def extend_cache(cache, extra):
        return torch.cat([cache, extra[:, : cache.shape[1]]])


@pytest.mark.parametrize("use_cache", [True, False])
def test_requests_joining_at_a_block_boundary_decode_as_alone(use_cache):
    base = DenoiseRequest(rows=[[1, 2, 3]], pad_lens=[0], gen_length=60, steps=4)
    late = [DenoiseRequest(rows=[[4, 5, 6, 7, 8]], pad_lens=[0], gen_length=12, steps=2),
            DenoiseRequest(rows=[[9, 10], [MASK, 11]], pad_lens=[0, 1], gen_length=9, steps=3,
                           guidance=Guidance("simple", scale=2.0))]
    joined_at = []

    def admit(block, length, fits=None):
        if fits is not None:  # at block boundaries only
            return []
        if block == 3 and not joined_at:
            joined_at.append(block)
            return late
        return []
    model = _ExtendableMock()
    out = generate(model, [base], mask_id=MASK, block_length=B, use_cache=use_cache, admit=admit)
    assert joined_at == [3] and len(out.tokens) == 3
    alone = [generate(_ExtendableMock(), [r], mask_id=MASK, block_length=B).tokens[0] for r in [base, *late]]
    assert out.tokens == alone


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_request_joins_mid_block_when_its_part_of_the_block_fills_in_time(use_cache):
    """Two requests arrive before step 3 of block 2 (8 steps of one token): one whose part of that block
    is a prompt tail with 4 masks (its prefill skips its pad block) (its schedule 3, 3, 2: 2 steps, so it joins now and counts its own
    steps), one with 6 masks at one a step (3 + 6 > 8 steps: it waits for the boundary). Joining never
    lengthens a block, and every request decodes as it would alone."""
    base = DenoiseRequest(rows=[[1, 2, 3]], pad_lens=[0], gen_length=40, steps=8)
    fits_now = DenoiseRequest(rows=[[4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]], pad_lens=[0], gen_length=10,
                              steps=3)  # 12 tokens: a whole block of left pad, then 20 + 4 masks
    waits = DenoiseRequest(rows=[[10, 11]], pad_lens=[0], gen_length=7, steps=8)
    pending, joins, mid_calls, calls_then = [], [], [], []

    def admit(block, limit, fits=None):
        if fits is not None and block == 2:
            mid_calls.append(block)
            if len(mid_calls) == 3 and not joins:  # both arrive before step 3
                pending.extend([waits, fits_now])
        taken = [r for r in pending if fits is None or fits(r)]
        for r in taken:
            pending.remove(r)
            joins.append((r is fits_now, block, fits is None))
            calls_then.append(len(model.calls))
        return taken
    model = _ExtendableMock()
    out = generate(model, [base], mask_id=MASK, block_length=B, use_cache=use_cache, admit=admit)
    assert joins == [(True, 2, False), (False, 3, True)]  # mid-block, then at the next boundary
    if use_cache:  # its prefill: the finished block after its whole block of pads ([B, 2B)), its row alone
        start, ids = model.calls[calls_then[0]]  # the forward right after it joined
        assert (start, tuple(ids.shape)) == (B, (1, B))
    assert max(out.steps_per_block) <= 8
    alone = [generate(_ExtendableMock(), [r], mask_id=MASK, block_length=B).tokens[0]
             for r in (base, fits_now, waits)]  # results in join order
    assert out.tokens == alone


class _ContinuousMock(_ExtendableMock):
    """A mock whose cache holds its whole position table, so a running canvas may grow, and whose
    finished rows can leave."""

    def new_cache(self, rows, max_len):
        return torch.zeros(rows, self.pos.shape[0], self.dim)

    @staticmethod
    def canvas_limit(cache, length):
        return max(length, cache.shape[1])

    @staticmethod
    def retire_rows(cache, keep):
        return cache[keep]


def test_finished_requests_leave_and_a_late_one_grows_the_canvas():
    reqs = [DenoiseRequest(rows=[[1, 2, 3]], pad_lens=[0], gen_length=10, steps=2),
            DenoiseRequest(rows=[[4, 5], [MASK, 6]], pad_lens=[0, 1], gen_length=40, steps=4,
                           guidance=Guidance("simple", scale=2.0)),
            DenoiseRequest(rows=[[7, 8, 9, 10]], pad_lens=[0], gen_length=12, steps=3),
            DenoiseRequest(rows=[[11, 12]], pad_lens=[0], gen_length=41, steps=4)]
    late = DenoiseRequest(rows=[[13, 14, 15]], pad_lens=[0], gen_length=50, steps=5)
    canvas = max(admission_end(r, 0, B) for r in reqs)
    seen = []

    def admit(block, limit, fits=None):
        if fits is not None:  # at block boundaries only
            return []
        seen.append((block, limit))
        return [late] if block == 2 else []
    model = _ContinuousMock()
    out = generate(model, reqs, mask_id=MASK, block_length=B, admit=admit)
    assert admission_end(late, 2, B) > canvas and seen[2] == (2, 256)  # the canvas had to grow
    rows = [ids.shape[0] for _, ids in model.calls]
    assert rows[0] == 5 and min(rows) == 1  # the short ones left, the late one ran on alone
    assert out.row_forwards == sum(rows)
    alone = [generate(_ExtendableMock(), [r], mask_id=MASK, block_length=B).tokens[0] for r in [*reqs, late]]
    assert out.tokens == alone


def test_greedy_requests_of_one_kind_step_together_and_decode_as_alone(monkeypatch):
    import llada2uni.sampling.block as block
    calls = []
    real = block._greedy_step
    monkeypatch.setattr(block, "_greedy_step", lambda run, *a: (calls.append(list(run)), real(run, *a)))
    cfg = Guidance("simple", scale=2.0, rescale=0.7)
    reqs = [DenoiseRequest(rows=[[1, 2, 3 + i]], pad_lens=[0], gen_length=40, steps=4) for i in range(3)]
    reqs += [DenoiseRequest(rows=[[4, 5 + i], [MASK, 6]], pad_lens=[0, 1], gen_length=30, steps=4, guidance=cfg,
                            vocab=(3, 40)) for i in range(3)]
    reqs.append(DenoiseRequest(rows=[[7, 8]], pad_lens=[0], gen_length=40, steps=8))  # another schedule
    out = generate(MockModel(), reqs, mask_id=MASK, block_length=B)
    # the odd one out takes its greedy steps alone (a run of one)
    assert [0, 1, 2] in calls and [3, 4, 5] in calls and all(c == [6] for c in calls if 6 in c)
    alone = [generate(MockModel(), [r], mask_id=MASK, block_length=B).tokens[0] for r in reqs]
    assert out.tokens == alone
    assert len({tuple(t) for t in alone}) == len(reqs)  # distinct: rows cannot be swapped unnoticed


def test_greedy_pick_over_a_vocab_slice_with_moments_equals_the_full_pick():
    """An image canvas's logits held over the image ids only, with the full vocabulary's moments:
    the same picks and confidences as the full logits (cfg_rescale's stds are over every id)."""
    from llada2uni.sampling.unmask import greedy_pick, row_moments
    g = torch.Generator().manual_seed(0)
    v, lo, hi = 500, 300, 500
    for guidance in [Guidance(), Guidance("simple", scale=4.0, rescale=0.7), Guidance("simple", scale=4.0),
                     Guidance("edit", text_scale=7.5, image_scale=1.5, rescale=0.7),
                     Guidance("edit", text_scale=5.0, rescale=0.7)]:
        n, runs = guidance.num_rows, 3
        logits = torch.randn(1 + n * runs, 32, v, generator=g) * 3 + 1.5  # row 0: another request's
        moments = row_moments(logits).select(1, n, runs)
        rows = logits[1:].view(runs, n, 32, v).transpose(0, 1)
        pred, conf = greedy_pick(guidance, rows, (lo, hi))
        spred, sconf = greedy_pick(guidance, rows[..., lo:hi], (lo, hi), moments)
        assert torch.equal(pred, spred), guidance
        torch.testing.assert_close(sconf, conf, rtol=1e-5, atol=1e-6)
    # the moments' std is torch's unbiased std of the weighted rows
    logits = torch.randn(10, 32, v, generator=g) * 2 - 4.0
    m = row_moments(logits).select(1, 3, 3)
    w = torch.tensor([7.5, -5.0, -1.5])
    ref = (w[:, None, None, None] * logits[1:].view(3, 3, 32, v).transpose(0, 1)).sum(0).std(-1)
    torch.testing.assert_close(m.std(w), ref, rtol=1e-4, atol=1e-4)


def test_sprint_greedy_requests_step_together_and_decode_as_one_by_one(monkeypatch):
    """SPRINT's greedy, confidence-ranked step batched over a run of requests (each with its own
    adaptive k) commits what the per-request step commits; other rankings keep the per-request step."""
    import llada2uni.sampling.block as block
    from llada2uni.sampling.sprint import Sprint
    cfg = Guidance("simple", scale=2.0)
    reqs = [DenoiseRequest(rows=[[1, 2, 3 + i]], pad_lens=[0], gen_length=40, steps=4, threshold=0.3)
            for i in range(3)]
    reqs += [DenoiseRequest(rows=[[4, 5 + i], [MASK, 6]], pad_lens=[0, 1], gen_length=30, steps=4, guidance=cfg,
                            vocab=(3, 40), threshold=0.3) for i in range(2)]
    sprint = Sprint(keep_ratio=0.7)
    calls = []
    real = block._sprint_greedy_step
    monkeypatch.setattr(block, "_sprint_greedy_step", lambda run, *a: (calls.append(list(run)), real(run, *a)))
    together = generate(MockModel(sharpness=8.0), reqs, mask_id=MASK, block_length=B, sprint=sprint)
    assert [0, 1, 2] in calls and [3, 4] in calls
    # the same, every request stepping alone
    monkeypatch.setattr(block, "_runs", lambda live, alive, *a: [[r] for r in live if alive[r]])
    alone = generate(MockModel(sharpness=8.0), reqs, mask_id=MASK, block_length=B, sprint=sprint)
    assert together.tokens == alone.tokens and together.forwards == alone.forwards
    # other rankings keep the per-request step
    calls.clear()
    monkeypatch.setattr(block, "_sprint_greedy_step", lambda *a: calls.append("batched"))
    generate(MockModel(sharpness=8.0), reqs, mask_id=MASK, block_length=B,
             sprint=Sprint(keep_ratio=0.7, remasking="top_k_margin"))
    assert not calls
    monkeypatch.undo()
    one = [generate(MockModel(sharpness=8.0), [r], mask_id=MASK, block_length=B, sprint=sprint).tokens[0]
           for r in reqs]
    assert together.tokens == one
    # why it is the per-request step: at temperature 0, sprint_sample is the argmax and sprint_scores'
    # score and top-1 are its probability, greedy_pick's (pred, conf), bit for bit
    from llada2uni.sampling.unmask import greedy_pick, sprint_sample, sprint_scores
    g = torch.randn(32, V, generator=torch.Generator().manual_seed(3)) * 4
    active = torch.rand(32, generator=torch.Generator().manual_seed(4)) < 0.6
    pred = sprint_sample(g)
    score, top1 = sprint_scores(g, pred, "low_confidence", active)
    gpred, conf = greedy_pick(Guidance(), g[None], None)
    assert torch.equal(pred, gpred) and torch.equal(top1, conf)
    assert torch.equal(score, conf.masked_fill(~active, float("-inf")))

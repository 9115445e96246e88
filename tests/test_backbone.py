import math

import torch

from llada2uni.models.backbone import apply_partial_rope, rope_cos_sin
from llada2uni.ops.attention import block_causal_mask, rope_positions


def test_partial_rope_hand_computed():
    theta, d, rd, p = 10000.0, 6, 4, 3
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    cos, sin = rope_cos_sin(torch.tensor([[p]]), rd, theta, torch.float32)
    y = apply_partial_rope(x.view(1, 1, 1, d), cos, sin).flatten()
    f0, f1 = 1.0, theta ** (-2 / 4)
    a0, a1 = p * f0, p * f1
    expected = [
        1 * math.cos(a0) - 3 * math.sin(a0),
        2 * math.cos(a1) - 4 * math.sin(a1),
        3 * math.cos(a0) + 1 * math.sin(a0),
        4 * math.cos(a1) + 2 * math.sin(a1),
        5.0, 6.0,
    ]
    torch.testing.assert_close(y, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_block_mask_and_positions():
    pads = torch.tensor([0, 3])
    m = block_causal_mask(0, 8, pads, block_length=4)[:, 0].int()
    expected0 = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]] * 4 + [[1] * 8] * 4)
    assert torch.equal(m[0], expected0)
    # row 1: keys 0..2 are pads: invisible to every query (a pad query then sees the real key 3 of
    # its block, or nothing: ``attend`` gives such a query a zero output, as the official SDPA does)
    expected1 = torch.tensor([
        [0, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1, 1],
    ])
    assert torch.equal(m[1], expected1)
    # window [4, 8): same rows of the full mask
    assert torch.equal(block_causal_mask(4, 8, pads, 4)[:, 0].int(), m[:, 4:])
    assert rope_positions(0, 6, pads).tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 2]]


def test_attend_query_with_no_key_gets_zero():
    from llada2uni.ops.attention import attend
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 1, :] = False
    out = attend(q, k, v, mask, 8 ** -0.5)
    assert torch.isfinite(out).all() and (out[:, :, 1] == 0).all()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # CPU: zero too
    assert torch.allclose(out, ref, atol=1e-6)


def _logits(model, ids, pads, start=0, cache=None, num_logits=None):
    end = start + ids.shape[1]
    return model(ids, rope_positions(start, end, pads), block_causal_mask(start, end, pads, 32),
                 cache=cache, start=start, num_logits=num_logits)


def _ids(model, rows, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (rows, length), generator=g)


def test_later_blocks_do_not_change_earlier_logits(tiny_model):
    ids = _ids(tiny_model, 1, 96)
    pads = torch.zeros(1, dtype=torch.long)
    full = _logits(tiny_model, ids, pads)
    prefix = _logits(tiny_model, ids[:, :64], pads)
    torch.testing.assert_close(full[:, :64], prefix, rtol=1e-5, atol=1e-5)
    # but a token inside the same block does change its block-mates (bidirectional)
    ids2 = ids.clone()
    ids2[0, 63] = (ids2[0, 63] + 1) % tiny_model.config.vocab_size
    changed = _logits(tiny_model, ids2[:, :64], pads)
    assert not torch.allclose(changed[0, 32], prefix[0, 32])
    torch.testing.assert_close(changed[0, :32], prefix[0, :32], rtol=1e-5, atol=1e-5)


def test_cached_equals_uncached(tiny_model):
    ids = _ids(tiny_model, 2, 128, seed=1)
    pads = torch.tensor([0, 5])
    full = _logits(tiny_model, ids, pads)
    cache = tiny_model.new_cache(2, 128)
    _logits(tiny_model, ids[:, :64], pads, cache=cache)  # writes blocks 0-1
    cache.length = 64
    # next window: blocks 2 and 3 together (the finished block's KV written with the next block)
    out = _logits(tiny_model, ids[:, 64:128], pads, start=64, cache=cache)
    torch.testing.assert_close(out, full[:, 64:], rtol=1e-4, atol=1e-4)
    cache.length = 96
    out = _logits(tiny_model, ids[:, 96:128], pads, start=96, cache=cache, num_logits=32)
    torch.testing.assert_close(out, full[:, 96:], rtol=1e-4, atol=1e-4)


def test_batched_equals_single(tiny_model):
    ids = _ids(tiny_model, 3, 70, seed=2)
    pads = torch.zeros(3, dtype=torch.long)
    batched = _logits(tiny_model, ids, pads)
    for r in range(3):
        single = _logits(tiny_model, ids[r:r + 1], pads[:1])
        torch.testing.assert_close(batched[r:r + 1], single, rtol=1e-4, atol=1e-4)


def test_left_padded_row_equals_unpadded(tiny_model):
    # A row left-padded by p (not a block multiple) sees exactly the real keys with positions from 0;
    # compare against the unpadded row placed at the same block alignment (pad = 32 is exact).
    mask_id = tiny_model.config.mask_token_id
    real = _ids(tiny_model, 1, 60, seed=3)
    for pad in (32, 7):
        padded = torch.cat([torch.full((1, pad), mask_id), real], dim=1)
        out = _logits(tiny_model, padded, torch.tensor([pad]))
        assert not out.isnan().any()
        if pad == 32:
            ref = _logits(tiny_model, real, torch.tensor([0]))
            torch.testing.assert_close(out[:, pad:], ref, rtol=1e-4, atol=1e-4)
        else:
            # pad 7: same result as padding with different (garbage) ids: pads are invisible
            junk = torch.cat([torch.randint(0, 100, (1, pad)), real], dim=1)
            torch.testing.assert_close(_logits(tiny_model, junk, torch.tensor([pad]))[:, pad:],
                                       out[:, pad:], rtol=1e-5, atol=1e-5)


def test_bf16_forward_is_finite(tiny_dir):
    from llada2uni.weights import load_backbone
    m = load_backbone(tiny_dir, device=torch.device("cpu"), dtype=torch.bfloat16)
    out = _logits(m, _ids(m, 2, 40), torch.tensor([0, 3]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()

"""Window attention (``ops/attention_triton.py``): the (key_ok, kv_lim) visibility equals the
block-causal mask, and the Triton kernels equal the SDPA reference (under Triton's CPU interpreter
here, on the GPU in bf16 at full size)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llada2uni.ops.attention import block_causal_mask
from llada2uni.ops.attention_triton import (window_attention, window_attention_reference, window_limits,
                                            window_mask)


def visibility(start, end, pads, block, cache_len):
    """What the fast path passes for a window: real keys per row, per-query key limit."""
    key_ok = torch.arange(cache_len)[None, :] >= pads[:, None]
    return key_ok, window_limits(start, end, block)


@pytest.mark.parametrize("start,end", [(0, 48), (64, 128), (96, 128), (0, 7), (32, 40)])
def test_visibility_is_the_block_causal_mask(start, end):
    pads = torch.tensor([0, 3, 45])
    key_ok, kv_lim = visibility(start, end, pads, 32, 160)
    mask = window_mask(key_ok, kv_lim)
    assert torch.equal(mask[..., :end], block_causal_mask(start, end, pads, 32))
    assert not mask[..., end:].any()  # nothing past the window, whatever the cache holds


def test_custom_op_is_the_reference_on_cpu_and_compiles():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 32, 16, generator=g)
    k, v = torch.randn(2, 2, 96, 16, generator=g), torch.randn(2, 2, 96, 16, generator=g)
    key_ok, kv_lim = visibility(32, 64, torch.tensor([0, 40]), 32, 96)
    ref = window_attention_reference(q, k, v, key_ok, kv_lim, 0.25)
    out = window_attention(q, k, v, key_ok, kv_lim, 0.25)
    torch.testing.assert_close(out, ref)
    assert out.transpose(1, 2).is_contiguous()  # [R, T, H, D] storage: the output projection's reshape is free
    compiled = torch.compile(window_attention, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, key_ok, kv_lim, 0.25), ref)
    # stale keys past kv_lim never leak in
    k2 = k.clone()
    k2[:, :, 64:] = 1e4
    torch.testing.assert_close(window_attention(q, k2, v, key_ok, kv_lim, 0.25), ref)


INTERPRETED = textwrap.dedent("""
    import torch
    from llada2uni.ops.attention_triton import (window_attention_reference, window_attention_triton,
                                                window_limits)
    g = torch.Generator().manual_seed(0)
    # rows, q heads, kv heads, window start, length, cache, head dim, key splits, left pads
    cases = [(2, 4, 2, 96, 32, 192, 32, 1, [0, 40]), (2, 4, 2, 96, 32, 192, 32, 2, [0, 40]),
             (1, 4, 1, 64, 64, 256, 16, 4, [0]), (3, 2, 2, 0, 48, 128, 16, 2, [0, 5, 40]),
             (1, 2, 1, 0, 7, 64, 16, 1, [0]), (2, 2, 1, 32, 16, 128, 16, 8, [0, 36]), (1, 8, 2, 32, 32, 192, 16, 2, [3]),
             (1, 8, 2, 96, 32, 192, 16, 1, [3], (128, 128, 8, 3)), (3, 4, 2, 96, 48, 160, 16, 1, [0, 1, 40])]
    for r, hq, hkv, start, t, s, d, splits, pads, *config in cases:  # the last two: the large tiles
        config = config[0] if config else None
        q = torch.randn(r, t, hq, d, generator=g).transpose(1, 2)
        k, v = torch.randn(r, hkv, s, d, generator=g), torch.randn(r, hkv, s, d, generator=g)
        pads = torch.tensor(pads)
        key_ok = torch.arange(s)[None, :] >= pads[:, None]
        kv_lim = window_limits(start, start + t, 32)
        ref = window_attention_reference(q, k, v, key_ok, kv_lim, d ** -0.5)
        out = window_attention_triton(q, k, v, key_ok, kv_lim, d ** -0.5, splits=splits, config=config)
        err = (out - ref).abs().max().item()
        assert err < 1e-4, (r, hq, hkv, start, t, s, splits, err)
        # a SPRINT view: arbitrary kept keys, the whole window visible
        keep = torch.rand(r, s, generator=g) < 0.5
        lim = torch.full((t,), s, dtype=torch.int32)
        ref = window_attention_reference(q, k, v, keep, lim, d ** -0.5)
        out = window_attention_triton(q, k, v, keep, lim, d ** -0.5, splits=splits, config=config)
        assert (out - ref).abs().max().item() < 1e-4
    print("ok", len(cases))
""")


def test_triton_kernels_equal_the_reference_in_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")  # read when the kernels are defined: a fresh process
    run = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ok 9" in run.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("rows,start,t,cache", [(1, 1088, 32, 2048), (2, 1056, 64, 2048), (32, 1088, 32, 2048),
                                                 (1, 0, 1120, 2048), (4, 2560, 32, 4096)])
def test_triton_window_attention_matches_reference_on_gpu(rows, start, t, cache):
    from llada2uni.ops.attention_triton import supported, window_attention_triton
    g = torch.Generator(device="cuda").manual_seed(rows + t)
    q = torch.randn(rows, t, 16, 128, device="cuda", generator=g).bfloat16().transpose(1, 2)
    k = torch.randn(rows, 4, cache, 128, device="cuda", generator=g).bfloat16()
    v = torch.randn(rows, 4, cache, 128, device="cuda", generator=g).bfloat16()
    assert supported(q, k)
    pads = torch.randint(0, 40, (rows,), device="cuda", generator=g)
    key_ok = torch.arange(cache, device="cuda")[None, :] >= pads[:, None]
    kv_lim = window_limits(start, start + t, 32, "cuda")
    ref = window_attention_reference(q.float(), k.float(), v.float(), key_ok, kv_lim, 128 ** -0.5)
    out = window_attention_triton(q, k, v, key_ok, kv_lim, 128 ** -0.5)
    assert (out.float() - ref).abs().max() < 2e-2
    # graph-capturable: the window moves by new device inputs only
    static = kv_lim.clone()
    graph = torch.cuda.CUDAGraph()
    window_attention_triton(q, k, v, key_ok, static, 128 ** -0.5)
    with torch.cuda.graph(graph):
        captured = window_attention_triton(q, k, v, key_ok, static, 128 ** -0.5)
    static.copy_(kv_lim - 32)
    graph.replay()
    ref2 = window_attention_reference(q.float(), k.float(), v.float(), key_ok, kv_lim - 32, 128 ** -0.5)
    assert (captured.float() - ref2).abs().max() < 2e-2

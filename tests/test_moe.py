import torch

from llada2uni.ops.moe import experts_reference, route, swiglu


def test_bias_steers_selection_but_not_weights():
    # spec 3.4 / SGLang test: bias [-2,-2,0.8,0.2], logits [3,2,0,0] -> experts {2,3}, weights 1.25 each
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    bias = torch.tensor([-2.0, -2.0, 0.8, 0.2])
    ids, w = route(logits, bias, n_group=1, topk_group=1, top_k=2, routed_scaling_factor=2.5)
    assert sorted(ids[0].tolist()) == [2, 3]
    torch.testing.assert_close(w[0], torch.tensor([1.25, 1.25]))
    # without the bias the unbiased winners are chosen
    ids0, _ = route(logits, torch.zeros(4), n_group=1, topk_group=1, top_k=2, routed_scaling_factor=2.5)
    assert sorted(ids0[0].tolist()) == [0, 1]


def test_group_limit_uses_sum_of_top2_biased_scores():
    # 4 groups of 2 experts; keep 2 groups. Expert 0 has the single highest score, but its group's
    # top-2 sum loses to groups 1 and 2, so it must not be chosen.
    s = torch.tensor([[0.99, 0.01, 0.8, 0.8, 0.7, 0.7, 0.3, 0.3]])
    logits = torch.logit(s)
    ids, w = route(logits, torch.zeros(8), n_group=4, topk_group=2, top_k=2, routed_scaling_factor=1.0)
    assert sorted(ids[0].tolist()) == [2, 3]
    # top-4 must come from the kept groups only, even though expert 0 beats 4 and 5
    ids4, w4 = route(logits, torch.zeros(8), n_group=4, topk_group=2, top_k=4, routed_scaling_factor=2.5)
    assert sorted(ids4[0].tolist()) == [2, 3, 4, 5]
    torch.testing.assert_close(w4.sum(), torch.tensor(2.5))
    torch.testing.assert_close(w4[0], 2.5 * s[0, ids4[0]] / s[0, [2, 3, 4, 5]].sum())


def test_negative_biased_scores_never_leak_from_excluded_groups():
    # All biased scores in the kept groups are negative; a 0.0 fill for excluded experts would wrongly
    # pick them.
    logits = torch.zeros(1, 4)
    bias = torch.tensor([-0.9, -0.9, -2.0, -2.0])
    ids, _ = route(logits, bias, n_group=2, topk_group=1, top_k=2, routed_scaling_factor=1.0)
    assert sorted(ids[0].tolist()) == [0, 1]


def test_experts_reference_matches_per_token_loop():
    g = torch.Generator().manual_seed(0)
    n, h, i, e, k = 13, 8, 6, 5, 3
    x = torch.randn(n, h, generator=g)
    w13 = torch.randn(e, 2 * i, h, generator=g)
    w2 = torch.randn(e, h, i, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    w = torch.rand(n, k, generator=g)
    out = experts_reference(x, ids, w, w13, w2)
    expected = torch.zeros(n, h)
    for t in range(n):
        for j in range(k):
            ex = ids[t, j]
            gate, up = (w13[ex] @ x[t]).chunk(2)
            expected[t] += w[t, j] * (w2[ex] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32


def test_swiglu_gate_rows_first():
    x = torch.tensor([[1.0, 2.0]])
    w13 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # gate = x0, up = x1
    w2 = torch.tensor([[1.0]])
    torch.testing.assert_close(swiglu(x, w13, w2), torch.nn.functional.silu(torch.tensor([[1.0]])) * 2.0)


import pytest

from llada2uni.ops.moe import experts_grouped, grouped_supported


@pytest.mark.parametrize("n, h, i, e, k, dtype", [
    (1, 64, 32, 8, 2, torch.float32),
    (37, 64, 32, 16, 4, torch.float32),
    (64, 128, 64, 32, 8, torch.bfloat16),
    (5, 64, 32, 64, 8, torch.bfloat16),  # most experts get no token
])
def test_grouped_equals_reference(n, h, i, e, k, dtype):
    g = torch.Generator().manual_seed(n + e)
    x = torch.randn(n, h, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=g) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g) / i ** 0.5).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    w = torch.rand(n, k, generator=g)
    assert grouped_supported(x, w13)
    ref = experts_reference(x, ids, w, w13, w2)
    out = experts_grouped(x, ids, w, w13, w2)
    assert out.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("slots,experts,block_m", [(256, 256, 16), (64, 8, 16), (1000, 16, 32), (7, 64, 16),
                                                   (16, 4, 64)])
def test_align_blocks_covers_every_slot_once_with_one_expert_per_block(slots, experts, block_m):
    from llada2uni.ops.moe_triton import align_blocks
    g = torch.Generator().manual_seed(slots)
    flat = torch.randint(0, experts, (slots,), generator=g)
    if experts == 64:
        flat[:] = 5  # all slots on one expert: several blocks of it
    order, bexp, bstart, brows = align_blocks(flat, experts, block_m)
    assert bexp.numel() == slots // block_m + min(experts, slots) + 1  # static, routing-independent
    assert sorted(order.tolist()) == list(range(slots))
    seen = []
    for e, start, rows in zip(bexp.tolist(), bstart.tolist(), brows.tolist()):
        assert 0 <= rows <= block_m
        block = order[start:start + rows]
        assert (flat[block] == e).all()
        seen += block.tolist()
    assert sorted(seen) == list(range(slots))  # each slot in exactly one block
    assert int((brows > 0).sum()) == sum(-(-int(c) // block_m) for c in torch.bincount(flat) if c > 0)


@pytest.mark.gpu
@pytest.mark.parametrize("n,e,k", [(32, 256, 8), (64, 256, 8), (1024, 256, 8), (2048, 256, 8), (7, 64, 4)])
def test_fused_triton_moe_matches_reference_on_gpu(n, e, k):
    from llada2uni.ops.moe_triton import experts_fused, supported
    g = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(n, 2048, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(e, 1024, 2048, device="cuda", generator=g) / 45).bfloat16()
    w2 = (torch.randn(e, 2048, 512, device="cuda", generator=g) / 22).bfloat16()
    assert supported(x, w13, w2)
    ids = torch.rand(n, e, device="cuda", generator=g).topk(k, dim=-1).indices
    w = torch.rand(n, k, device="cuda", generator=g)
    ref = experts_reference(x, ids, w, w13, w2)
    out = experts_fused(x, ids, w, w13, w2)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    rel = (out - ref).norm() / ref.norm()
    assert rel < 1e-2, rel
    # and it is CUDA-graph capturable (no host sync): replay with new routing gives the new result
    ids2 = torch.rand(n, e, device="cuda", generator=g).topk(k, dim=-1).indices
    static_ids = ids.clone()
    experts_fused(x, static_ids, w, w13, w2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = experts_fused(x, static_ids, w, w13, w2)
    static_ids.copy_(ids2)
    graph.replay()
    rel2 = (captured - experts_reference(x, ids2, w, w13, w2)).norm() / ref.norm()
    assert rel2 < 1e-2, rel2


INTERPRETED = """
import torch
from llada2uni.ops.moe import experts_reference, route
from llada2uni.ops.moe_triton import align_blocks, align_triton, experts_fused, route_triton
g = torch.Generator().manual_seed(0)
for n, e, groups, keep, k in [(37, 256, 8, 4, 8), (5, 64, 4, 2, 4), (16, 32, 1, 1, 6)]:
    logits, bias = torch.randn(n, e, generator=g), torch.randn(e, generator=g) * 0.1
    kw = dict(n_group=groups, topk_group=keep, top_k=k, routed_scaling_factor=2.5)
    ref_ids, ref_w = route(logits, bias, **kw)
    ids, w = route_triton(logits, bias, **kw)
    a, b = ref_ids.sort(1), ids.long().sort(1)
    assert torch.equal(a.values, b.values), (n, e)
    assert torch.allclose(ref_w.gather(1, a.indices), w.gather(1, b.indices), atol=1e-6), (n, e)
for s, e, block_m in [(256, 256, 16), (8192, 256, 64), (40, 8, 16), (300, 64, 32)]:
    flat = torch.full((s,), 5) if s == 40 else torch.randint(0, e, (s,), generator=g)
    order, bexp, bstart, brows = align_triton(flat, e, block_m)
    ref_order, ref_exp, ref_start, ref_rows = align_blocks(flat, e, block_m)
    used = ref_rows > 0
    assert torch.equal(brows, ref_rows) and torch.equal(bexp[used], ref_exp[used])
    assert torch.equal(bstart[used], ref_start[used])
    assert torch.equal(flat[order.long()], flat[ref_order]) and sorted(order.tolist()) == list(range(s))
x = torch.randn(20, 128, generator=g)
w13, w2 = torch.randn(16, 256, 128, generator=g) / 11, torch.randn(16, 128, 128, generator=g) / 11
ids, w = torch.rand(20, 16, generator=g).topk(4, dim=-1).indices, torch.rand(20, 4, generator=g)
ref = experts_reference(x, ids, w, w13, w2)
assert ((experts_fused(x, ids, w, w13, w2) - ref).norm() / ref.norm()) < 1e-5
print("ok")
"""


def test_triton_router_alignment_and_dispatch_in_the_interpreter():
    # Triton's CPU interpreter runs the kernels' own code on the CPU (fp32): routing equals ``route``,
    # the block table equals ``align_blocks`` (slot order within an expert is free), the dispatch
    # equals the reference.
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")  # read when the kernels are defined: a fresh process
    run = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [32, 1024, 4096])
def test_triton_router_matches_route_on_gpu(n):
    from llada2uni.ops.moe_triton import route_triton
    g = torch.Generator(device="cuda").manual_seed(n)
    logits = torch.randn(n, 256, device="cuda", generator=g)
    bias = torch.randn(256, device="cuda", generator=g) * 0.1
    kw = dict(n_group=8, topk_group=4, top_k=8, routed_scaling_factor=2.5)
    ref_ids, ref_w = route(logits, bias, **kw)
    ids, w = route_triton(logits, bias, **kw)
    a, b = ref_ids.sort(1), ids.long().sort(1)
    assert torch.equal(a.values, b.values)
    torch.testing.assert_close(ref_w.gather(1, a.indices), w.gather(1, b.indices))

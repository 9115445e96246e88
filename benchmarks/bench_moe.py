"""The routed-expert dispatch alone: grouped GEMM (``torch._grouped_mm``) vs the fused Triton kernels.

    python benchmarks/bench_moe.py            # full-size expert shapes (256 x 2048 x 512), CUDA

Tokens come from the real router maths (sigmoid, group-limited top-8 with a random bias) on random
hidden states, at the token counts a denoising step sends: 32 (1 row), 64 (T2I, 2 rows), 256 (8 rows),
1024 (32 rows) and 2048 (64 rows). Every variant is checked against ``experts_reference`` and timed
as a CUDA-graph replay (launch overhead excluded, as in the step). Floor = bytes of the touched
experts' weights / measured copy bandwidth. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

sys.path.insert(0, "benchmarks")
from bench_backbone import copy_bandwidth, git_commit, timer  # noqa: E402

from llada2uni.ops.moe import experts_grouped, experts_reference, route  # noqa: E402
from llada2uni.ops.moe_triton import CONFIGS, experts_fused, pick_config  # noqa: E402


def graphed(fn):
    fn()  # compile / warm outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


GATE_UP_GRID = list(itertools.product((64, 128), (64, 128), (4, 8), (3, 4)))  # BN, BK, warps, stages
DOWN_GRID = list(itertools.product((64, 128, 256), (64, 128), (4, 8), (3, 4)))


def sweep_variants(x, ids, w, w13, w2, default):
    (bm, *_), down = default
    out = {}
    for b in (32, 64, 128):  # the block size itself, tiles as at 64 (8 warps for 128 rows)
        c = ((b, *CONFIGS[64][0][1:3], 8 if b == 128 else 4, 3), (*CONFIGS[64][1][:2], 8 if b == 128 else 4, 3))
        out[f"block{c}".replace(" ", "")] = (lambda c=c: experts_fused(x, ids, w, w13, w2, config=c))
    for bn, bk, warps, st in GATE_UP_GRID:
        c = ((bm, bn, bk, warps, st), down)
        out[f"gate_up{c[0]}".replace(" ", "")] = (lambda c=c: experts_fused(x, ids, w, w13, w2, config=c))
    for bn, bk, warps, st in DOWN_GRID:
        c = (default[0], (bn, bk, warps, st))
        out[f"down{c[1]}".replace(" ", "")] = (lambda c=c: experts_fused(x, ids, w, w13, w2, config=c))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="32,64,256,1024,2048")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of tile configs")
    ap.add_argument("--sweep-from", type=int, default=1024, help="sweep only from this token count on")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    E, H, INTER, K = 256, 2048, 512, 8
    w13 = (torch.randn(E, 2 * INTER, H, device=dev) * H ** -0.5).bfloat16()
    w2 = (torch.randn(E, H, INTER, device=dev) * INTER ** -0.5).bfloat16()
    gate = torch.randn(E, H, device=dev) * H ** -0.5
    bias = torch.randn(E, device=dev) * 0.01
    bw = copy_bandwidth(dev)
    expert_bytes = 3 * H * INTER * 2
    rows = []
    for n in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(n, H, device=dev).bfloat16()
        ids, w = route(x.float() @ gate.T, bias, n_group=8, topk_group=4, top_k=K, routed_scaling_factor=2.5)
        unique = int(ids.unique().numel())
        floor_ms = unique * expert_bytes / (bw * 1e9) * 1e3
        ref = experts_reference(x, ids, w, w13, w2)
        row = {"tokens": n, "experts": unique, "floor_ms": round(floor_ms, 4)}
        variants = {"grouped": lambda: experts_grouped(x, ids, w, w13, w2),
                    "fused": lambda: experts_fused(x, ids, w, w13, w2)}
        if args.sweep and n >= args.sweep_from:
            # each kernel's tiles with the other kernel at its default, at pick_config's block size
            variants.update(sweep_variants(x, ids, w, w13, w2, pick_config(n * K, E)))
        best = {}  # swept kernel -> (variant, ms)
        for name, fn in list(variants.items()):
            swept = name.split("(")[0] if "(" in name else None
            try:
                err = (fn() - ref).abs().max().item() / ref.abs().max().item()
                ms = timer(graphed(fn), dev, warmup=3, reps=20)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
                if swept is None:
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            if swept is not None:
                if err < 2e-2 and (swept not in best or ms < best[swept][1]):
                    best[swept] = (name, ms)
                continue
            row[f"{name}_ms"] = round(ms, 4)
            row[f"{name}_rel_err"] = float(f"{err:.2e}")
        for swept, (name, ms) in best.items():
            row[f"best_{swept}"], row[f"best_{swept}_ms"] = name, round(ms, 4)
        for name in ("grouped", "fused", "best_block", "best_gate_up", "best_down"):
            if f"{name}_ms" in row:
                row[f"{name}_x_floor"] = round(row[f"{name}_ms"] / floor_ms, 2)
        rows.append(row)
        print(row, flush=True)
    card = torch.cuda.get_device_name(dev)
    commit = git_commit()
    print(f"\ncard: {card}   copy bandwidth {bw:.0f} GB/s   expert {expert_bytes / 1e6:.1f} MB   configs {CONFIGS}")
    print(f"{'tokens':>6s} {'experts':>7s} {'floor ms':>8s} {'grouped':>8s} {'x':>5s} {'fused':>8s} {'x':>5s} "
          f"{'err':>8s}  best swept (block; gate/up, down: the other at its default)")
    for r in rows:
        print(f"{r['tokens']:>6d} {r['experts']:>7d} {r['floor_ms']:>8.3f} {r.get('grouped_ms', float('nan')):>8.3f} "
              f"{r.get('grouped_x_floor', float('nan')):>5.2f} {r.get('fused_ms', float('nan')):>8.3f} "
              f"{r.get('fused_x_floor', float('nan')):>5.2f} {r.get('fused_rel_err', float('nan')):>8.1e}  "
              f"{r.get('best_block', '')} {r.get('best_block_ms', '')}  "
              f"{r.get('best_gate_up', '')} {r.get('best_gate_up_ms', '')}  {r.get('best_down', '')} "
              f"{r.get('best_down_ms', '')}")
    print(json.dumps({"bench": "moe", "card": card, "commit": commit, "copy_gbs": round(bw), "results": rows}))


if __name__ == "__main__":
    main()

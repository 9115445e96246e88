"""Where a cached backbone step spends its time: torch.profiler over CUDA-graph-free steps.

    python benchmarks/profile_step.py [--rows 2 --prefix 1088] [--compile] [--attention sdpa]

Prints the top CUDA kernels by total time (grouped by name) for one eager cached step with the
default (fused) MoE, compiled step parts with ``--compile``, so the RESULTS file can say where the
time goes relative to the memory floor.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from llada2uni.config import BackboneConfig
from llada2uni.runtime import FastBackboneLogits
from llada2uni.weights import make_random


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=1088)
    ap.add_argument("--compile", action="store_true", help="the compiled step parts (no graph)")
    ap.add_argument("--attention", default="auto", choices=("auto", "sdpa"))
    ap.add_argument("--graph", action="store_true", help="profile CUDA-graph replays (the serving path)")
    args = ap.parse_args()
    cfg = BackboneConfig()
    model = make_random(cfg, device="cuda", dtype=torch.bfloat16)
    fast = FastBackboneLogits(model, eager=not args.graph, compile=args.compile or args.graph,
                              attention=args.attention)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.rows, args.prefix + 32), generator=g).cuda()
    pads = torch.zeros(args.rows, dtype=torch.long, device="cuda")
    cache = fast.new_cache(args.rows, args.prefix + 64)
    fast(ids[:, :args.prefix], 0, pads, cache, 32)
    for _ in range(3):
        fast(ids[:, args.prefix:], args.prefix, pads, cache, 32)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fast(ids[:, args.prefix:], args.prefix, pads, cache, 32)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    print(table)
    total = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages()) / 5 / 1e3
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        fast(ids[:, args.prefix:], args.prefix, pads, cache, 32)
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end) / 10
    # busy < wall: idle gaps between kernels (launch latency; inside a graph, node-to-node latency)
    print(f"GPU busy time per step: {total:.2f} ms; wall per step {wall:.2f} ms ({wall - total:.2f} ms idle)")


if __name__ == "__main__":
    main()

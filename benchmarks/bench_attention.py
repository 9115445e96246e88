"""Window attention of one layer at the step's shapes: the Triton window kernels vs SDPA under the
whole cache's mask (the baseline), against the floor of reading the visible K/V once.

    python benchmarks/bench_attention.py            # CUDA, full-size heads (16 q / 4 kv x 128)
    python benchmarks/bench_attention.py --sweep    # also every tile / split variant per case

Cases: a steady 32-token block step and a 64-token first-of-block step after a 1.1k-token prefix, in a
2048-token cache, at 1, 2, 32 and 64 rows; an understanding step (2.6k prefix, 4096 cache). Every
variant is checked against the SDPA reference and timed as a CUDA-graph replay. Floor = bytes of the
visible K/V (rows x visible keys x 4 KV heads x 128 x 2 x 2 B) / measured copy bandwidth. Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

sys.path.insert(0, "benchmarks")
from bench_backbone import copy_bandwidth, git_commit, timer  # noqa: E402
from bench_moe import graphed  # noqa: E402

from llada2uni.ops.attention_triton import (window_attention_reference,  # noqa: E402
                                            window_attention_triton, window_limits)

CASES = [  # name, rows, window start, window length, cache length
    ("t2i step", 2, 1088, 32, 2048), ("t2i first", 2, 1056, 64, 2048), ("1 row", 1, 1088, 32, 2048),
    ("32 rows", 32, 1088, 32, 2048), ("64 rows", 64, 1088, 32, 2048), ("mmu step", 1, 2592, 32, 4096),
]


def inputs(rows, start, t, cache, device):
    g = torch.Generator(device=device).manual_seed(rows * 7 + t)
    q = torch.randn(rows, t, 16, 128, device=device, generator=g).bfloat16().transpose(1, 2)
    k = torch.randn(rows, 4, cache, 128, device=device, generator=g).bfloat16()
    v = torch.randn(rows, 4, cache, 128, device=device, generator=g).bfloat16()
    key_ok = torch.ones(rows, cache, dtype=torch.bool, device=device)
    key_ok[1:, :7] = False  # a left-padded CFG row
    kv_lim = window_limits(start, start + t, 32, device)
    return q, k, v, key_ok, kv_lim


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    scale = 128 ** -0.5
    results = []
    for name, rows, start, t, cache in CASES:
        q, k, v, key_ok, kv_lim = inputs(rows, start, t, cache, device)
        ref = window_attention_reference(q.float(), k.float(), v.float(), key_ok, kv_lim, scale)
        floor_ms = rows * (start + t) * 4 * 128 * 2 * 2 / (bw * 1e9) * 1e3
        row = {"case": name, "rows": rows, "keys": start + t, "cache": cache, "floor_ms": round(floor_ms, 4)}
        row["sdpa_ms"] = timer(graphed(lambda: window_attention_reference(q, k, v, key_ok, kv_lim, scale)),
                               device, warmup=3, reps=20)
        out = window_attention_triton(q, k, v, key_ok, kv_lim, scale)
        row["max_err"] = round(float((out.float() - ref).abs().max()), 4)
        row["triton_ms"] = timer(graphed(lambda: window_attention_triton(q, k, v, key_ok, kv_lim, scale)),
                                 device, warmup=3, reps=20)
        if args.sweep:
            best = None
            for bm, bn, warps, stages, splits in itertools.product((64, 128), (64, 128), (4, 8), (2, 3),
                                                                   (1, 2, 4, 8)):
                cfg = (bm, bn, warps, stages)
                try:
                    err = float((window_attention_triton(q, k, v, key_ok, kv_lim, scale, splits, cfg).float()
                                 - ref).abs().max())
                    if err > 2e-2:
                        continue
                    ms = timer(graphed(lambda: window_attention_triton(q, k, v, key_ok, kv_lim, scale, splits,
                                                                       cfg)), device, warmup=2, reps=10)
                except Exception:  # noqa: BLE001 - a tile that does not fit (shared memory, registers)
                    continue
                if best is None or ms < best[0]:
                    best = (ms, cfg, splits)
            if best is not None:
                row["swept_best_ms"], row["swept_config"], row["swept_splits"] = round(best[0], 4), best[1], best[2]
        row["x_floor"] = round(row["triton_ms"] / floor_ms, 2)
        results.append(row)
        print(row, flush=True)
    card = torch.cuda.get_device_name(device)
    commit = git_commit()
    print(f"\ncard: {card}   copy bandwidth: {bw:.0f} GB/s")
    print(f"{'case':10s} {'rows':>4s} {'keys':>5s} {'floor ms':>9s} {'sdpa ms':>8s} {'triton ms':>9s} {'x floor':>7s} "
          f"{'swept ms':>8s}  swept (bm, bn, warps, stages) / splits")
    for r in results:
        print(f"{r['case']:10s} {r['rows']:>4d} {r['keys']:>5d} {r['floor_ms']:>9.4f} {r['sdpa_ms']:>8.4f} "
              f"{r['triton_ms']:>9.4f} {r['x_floor']:>7.2f} {r.get('swept_best_ms', float('nan')):>8.4f}  "
              f"{r.get('swept_config', '')} / {r.get('swept_splits', '')}")
    print(json.dumps({"bench": "attention", "card": card, "commit": commit, "copy_gbs": round(bw),
                      "results": results}))


if __name__ == "__main__":
    main()

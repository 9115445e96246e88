"""Where SPRINT's extra time per forward goes: torch.profiler over one generate, baseline vs SPRINT.

    python benchmarks/profile_sprint.py                          # tiny checkpoint on CPU (smoke)
    python benchmarks/profile_sprint.py --device cuda --full     # full-size random backbone, fast path

The task is ``bench_sprint.py``'s T2I (two CFG rows, an image canvas, 8 steps a block). For each config
("baseline", "reuse" = SPRINT keeping every key, "sprint" = the official defaults) one untimed run,
then one profiled run: wall ms, forwards, ms per forward, the host-side syncs (``aten::item`` and
``aten::_local_scalar_dense`` counts), and the top ops by self device time (CUDA) or self CPU time,
so a per-block or per-step cost that SPRINT adds shows as a row the baseline lacks. Prints the tables,
then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "benchmarks")
import bench_sprint as bs  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--sharpen", type=float, default=16.0)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    args.mmu_grid, args.mmu_gen, args.mmu_steps, args.t2i_grid, args.t2i_steps = 16, 64, 32, 16, 8
    device = torch.device(args.device)
    model, cfg, mmu, t2i = (bs.full_setup if args.full else bs.tiny_setup)(args)
    with torch.no_grad():
        model.lm_head.weight.mul_(args.sharpen)
    if device.type == "cuda":
        from llada2uni.runtime import FastBackboneLogits
        fn = FastBackboneLogits(model, compile=True)
    else:
        from llada2uni.runtime import FastBackboneLogits
        fn = FastBackboneLogits(model, eager=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    results = []
    for name in ("baseline", "reuse", "sprint"):
        reqs = bs.requests("t2i", cfg, mmu, t2i, args)
        bs.run(fn, reqs, cfg, bs.CONFIGS[name], device)  # captures, compiles
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            out, _ = bs.run(fn, reqs, cfg, bs.CONFIGS[name], device)
            wall = (time.perf_counter() - t) * 1e3
        events = prof.key_averages()
        syncs = sum(e.count for e in events if e.key in ("aten::item", "aten::_local_scalar_dense"))
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:args.top]
        row = {"config": name, "wall_ms": round(wall, 1), "forwards": out.forwards,
               "ms_per_forward": round(wall / out.forwards, 2), "syncs": syncs,
               "top": [(e.key[:60], e.count, round(getattr(e, key, 0) / 1e3, 2)) for e in top]}
        results.append(row)
        print(f"\n{name}: {wall:.1f} ms, {out.forwards} forwards, {wall / out.forwards:.2f} ms/forward, "
              f"{syncs} host syncs")
        print(f"  {'op':60s} {'calls':>6s} {'self ms':>8s}")
        for k, n, ms in row["top"]:
            print(f"  {k:60s} {n:>6d} {ms:>8.2f}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"bench": "profile_sprint", "device": name, "commit": bs.commit(), "sharpen": args.sharpen,
                      "results": results}))


if __name__ == "__main__":
    main()

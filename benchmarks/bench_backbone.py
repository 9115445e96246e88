"""Backbone denoising step: clear path vs fast path, against the memory floor.

    python benchmarks/bench_backbone.py                 # full-size random model on CUDA
    python benchmarks/bench_backbone.py --tiny          # smoke run on CPU

Cases (each timed after warm-up, median of repeats, CUDA events on GPU):
  t2i   : one 32-token block, 2 CFG rows (cond + left-padded uncond), ~1.1k-token cached prefix
  mmu   : one 32-token block, 1 row, ~2.6k-token cached prefix (800x800 image + question)
  prefill of the 1.1k-token T2I prompt+prefix, and batching 1/4/16/32 sequences at the t2i shape.
Paths: "clear" = our reference path that recomputes the whole window each step with the
expert-by-expert MoE (what the remote code does, minus its extra host syncs); "eager" = cached step,
default MoE dispatch (the fused Triton kernels on CUDA); "graph" = the same captured in a CUDA graph;
"compiled" = with the compiled step parts (the pipeline's path); "grouped" = the compiled graph with the
grouped-GEMM dispatch instead, the baseline in the same run; "sdpa" = the compiled graph with SDPA under
the whole cache's mask instead of the window-attention kernels (the attention baseline). The floor counts the bytes a step must read:
attention/dense/shared/router weights, the routed experts actually touched (counted from this run's
routing), the lm_head, and the KV cache; divided by the measured copy bandwidth.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import torch

from llada2uni.config import BackboneConfig
from llada2uni.models.backbone import MoE
from llada2uni.ops.attention import block_causal_mask, rope_positions
from llada2uni.ops.moe import experts_reference
from llada2uni.runtime import FastBackboneLogits
from llada2uni.tiny import tiny_config
from llada2uni.weights import make_random


def timer(fn, device, warmup=2, reps=7):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def git_commit() -> str:
    """The short commit of the tree the benchmark runs (for its JSON line)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def copy_bandwidth(device) -> float:
    """Measured device-to-device copy GB/s (bytes read + written)."""
    if device.type != "cuda":
        return 20.0
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = timer(lambda: y.copy_(x), device, warmup=2, reps=10)
    return 2 * 2 * 1024**3 / (ms / 1e3) / 1e9


class ExpertCounter:
    """Wrap each MoE dispatch to record the unique experts a forward touches."""

    def __init__(self, model):
        self.moes = [m for m in model.modules() if isinstance(m, MoE)]
        self.unique = []

    def __enter__(self):
        for m in self.moes:
            inner = m.dispatch

            def wrapped(x, ids, w, w13, w2, scales=None, inner=inner):
                self.unique.append(int(ids.unique().numel()))
                return inner(x, ids, w, w13, w2, scales)
            m._saved, m.dispatch = inner, wrapped
        return self

    def __exit__(self, *exc):
        for m in self.moes:
            m.dispatch = m._saved


def step_bytes(cfg: BackboneConfig, unique_experts: list[int], rows: int, prefix: int, elt: int = 2) -> dict:
    h = cfg.hidden_size
    attn = cfg.num_hidden_layers * (cfg.qkv_size * h + h * cfg.num_attention_heads * cfg.head_dim)
    dense0 = cfg.first_k_dense_replace * 3 * h * cfg.intermediate_size
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    shared = moe_layers * 3 * h * cfg.moe_intermediate_size * cfg.num_shared_experts
    router = moe_layers * cfg.num_experts * h * 4 / elt  # fp32
    expert = 3 * h * cfg.moe_intermediate_size
    routed = sum(unique_experts) * expert
    head = cfg.vocab_size * h
    kv = rows * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * (prefix + 32)
    parts = {"attention+dense+shared+router": (attn + dense0 + shared + router) * elt,
             "routed experts": routed * elt, "lm_head": head * elt, "kv": kv * elt}
    parts["total"] = sum(parts.values())
    return parts


def make_case(cfg, rows, prefix, device, seed=0):
    """ids [rows, prefix+32] with row 1.. left-padded by a few tokens (CFG alignment)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (rows, prefix + 32), generator=g).to(device)
    pads = torch.tensor([0] + [7] * (rows - 1), device=device)
    ids[1:, :7] = cfg.mask_token_id
    return ids, pads


def run_case(name, model, cfg, rows, prefix, device, bw, paths, log):
    ids, pads = make_case(cfg, rows, prefix, device)
    end = prefix + 32
    result = {"case": name, "rows": rows, "prefix": prefix}
    fast = FastBackboneLogits(model, eager=True)
    cache = fast.new_cache(rows, end + 64)
    fast(ids[:, :prefix], 0, pads, cache, 32)  # prefill the cache
    if "clear" in paths:
        for m in fast.model.modules():
            if isinstance(m, MoE):
                m.dispatch = experts_reference
        pos = rope_positions(0, end, pads)
        mask = block_causal_mask(0, end, pads, 32)
        result["clear_ms"] = timer(lambda: model(ids, pos, mask, num_logits=32), device, warmup=1, reps=3)
    fast = FastBackboneLogits(model, eager=True)  # back to the default dispatch (fused Triton on CUDA)
    result["moe"] = fast.moe
    with ExpertCounter(model) as counter:
        fast(ids[:, prefix:], prefix, pads, cache, 32)
    result["unique_experts_per_layer"] = round(sum(counter.unique) / max(len(counter.unique), 1), 1)
    result["eager_ms"] = timer(lambda: fast(ids[:, prefix:], prefix, pads, cache, 32), device)
    if device.type == "cuda" and fast.grouped:
        def graph_ms(**kw):  # one variant of the graphed step, its graphs dropped after timing
            fn = FastBackboneLogits(model, eager=False, **kw)
            try:
                return timer(lambda: fn(ids[:, prefix:], prefix, pads, cache, 32), device, warmup=3, reps=20)
            finally:
                fn._graphs.clear()
        try:
            result["graph_ms"] = graph_ms()
        except RuntimeError as e:  # report, keep the other numbers
            result["graph_error"] = str(e)[:200]
        try:
            result["compiled_graph_ms"] = graph_ms(compile=True)
        except Exception as e:  # report, keep the other numbers
            result["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if fast.moe == "triton":  # the grouped-GEMM dispatch in the same run: the baseline it replaces
            result["grouped_compiled_graph_ms"] = graph_ms(compile=True, moe="grouped")
            FastBackboneLogits(model, eager=True)  # restore the default dispatch
        # SDPA under the full cache mask instead of the window kernels: the attention baseline
        result["sdpa_compiled_graph_ms"] = graph_ms(compile=True, attention="sdpa")
    parts = step_bytes(cfg, counter.unique, rows, prefix)
    result["bytes_gb"] = round(parts["total"] / 1e9, 3)
    result["floor_ms"] = round(parts["total"] / (bw * 1e9) * 1e3, 3)
    best = min(v for k, v in result.items() if k in ("eager_ms", "graph_ms", "compiled_graph_ms"))
    result["achieved_gbs"] = round(parts["total"] / (best / 1e3) / 1e9, 1)
    result["best_over_floor"] = round(best / result["floor_ms"], 2)
    if "clear_ms" in result:
        result["speedup_vs_clear"] = round(result["clear_ms"] / best, 1)
    log(result)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-clear", action="store_true")
    ap.add_argument("--batches", default="1,4,16,32")
    args = ap.parse_args()
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    cfg = tiny_config() if args.tiny else BackboneConfig()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = make_random(cfg, device=device, dtype=dtype)
    build_s = time.perf_counter() - t0
    bw = copy_bandwidth(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows_out = []

    def log(r):
        rows_out.append(r)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)

    paths = () if args.no_clear else ("clear",)
    t2i_prefix = 1088 if not args.tiny else 96
    mmu_prefix = 2592 if not args.tiny else 160
    run_case("t2i", model, cfg, 2, t2i_prefix, device, bw, paths, log)
    run_case("mmu", model, cfg, 1, mmu_prefix, device, bw, paths, log)
    # prefill of the T2I prompt + prefix, eager grouped path
    ids, pads = make_case(cfg, 2, t2i_prefix, device)
    fast = FastBackboneLogits(model, eager=True)

    def prefill():
        cache = fast.new_cache(2, t2i_prefix + 64)
        fast(ids[:, :t2i_prefix], 0, pads, cache, 32)
    prefill_ms = timer(prefill, device, warmup=1, reps=3)
    log({"case": "prefill", "rows": 2, "tokens": t2i_prefix, "ms": prefill_ms,
         "tokens_per_s": round(2 * t2i_prefix / (prefill_ms / 1e3))})
    for n in [int(x) for x in args.batches.split(",")]:
        r = run_case(f"batch{n}", model, cfg, n, t2i_prefix, device, bw, (), log)
        best = min(v for k, v in r.items() if k in ("eager_ms", "graph_ms", "compiled_graph_ms"))
        r["steps_per_s"] = round(1e3 / best, 1)
        r["tokens_per_s"] = round(n * 32 / (best / 1e3))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0

    commit = git_commit()
    print(f"\ncard: {card}   copy bandwidth: {bw:.0f} GB/s   model build: {build_s:.1f} s   peak mem {peak:.1f} GiB")
    print(f"{'case':10s} {'rows':>4s} {'prefix':>6s} {'clear ms':>9s} {'eager ms':>9s} {'graph ms':>9s} "
          f"{'compiled':>9s} {'grouped':>9s} {'sdpa':>9s} {'floor ms':>9s} {'x floor':>7s} {'GB/s':>7s} {'experts/L':>9s} "
          f"{'tok/s':>8s}")
    for r in rows_out:
        if r["case"] == "prefill":
            print(f"{'prefill':10s} {r['rows']:>4d} {r['tokens']:>6d} {'':>9s} {r['ms']:>9.2f}")
            continue
        print(f"{r['case']:10s} {r['rows']:>4d} {r['prefix']:>6d} {r.get('clear_ms', float('nan')):>9.2f} "
              f"{r['eager_ms']:>9.2f} {r.get('graph_ms', float('nan')):>9.2f} "
              f"{r.get('compiled_graph_ms', float('nan')):>9.2f} "
              f"{r.get('grouped_compiled_graph_ms', float('nan')):>9.2f} "
              f"{r.get('sdpa_compiled_graph_ms', float('nan')):>9.2f} {r['floor_ms']:>9.2f} "
              f"{r['best_over_floor']:>7.2f} {r['achieved_gbs']:>7.0f} {r['unique_experts_per_layer']:>9.1f} "
              f"{r.get('tokens_per_s', ''):>8}")
    print(json.dumps({"bench": "backbone", "card": card, "commit": commit, "copy_gbs": round(bw),
                      "peak_gib": round(peak, 1), "results": rows_out}))


if __name__ == "__main__":
    main()

"""8-bit weights: the backbone step and the DiT forward, FP8 / int8 against bf16 in the same run.

    python benchmarks/bench_quant.py              # full-size random weights on CUDA
    python benchmarks/bench_quant.py --tiny       # smoke run on CPU

Backbone: one bf16 model and the same weights quantized ("fp8" = 128x128 block scales, as the
official FP8 checkpoint; "fp8-channel"; "int8" weight-only), each timed as the pipeline runs it (the
compiled step in a CUDA graph) at the T2I shape (2 CFG rows, ~1.1k cached prefix) and the
understanding shape (1 row, ~2.6k prefix). Agreement: the share of the block's 32 positions whose
argmax equals bf16's, and the relative logit error. The floor is the bytes the step reads (8-bit
weights count one byte) over the measured copy bandwidth.
DiT: the 6.2B Z-Image DiT forward at 1024 px, bf16 vs FP8 W8A8 (``quant.DIT_MODE``: FP8 weights per
output channel, activations per token, ``torch._scaled_mm``), both regionally compiled; the image
PSNR of an 8-step turbo decode against bf16's from the same noise. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from bench_backbone import ExpertCounter, copy_bandwidth, git_commit, make_case, step_bytes, timer  # noqa: E402

from llada2uni.config import BackboneConfig  # noqa: E402
from llada2uni.runtime import FastBackboneLogits  # noqa: E402
from llada2uni.tiny import tiny_config  # noqa: E402
from llada2uni.weights import random_backbone  # noqa: E402

CASES = {"t2i": (2, 1088), "mmu": (1, 2592)}


def step_case(model, cfg, rows, prefix, device, graphs):
    ids, pads = make_case(cfg, rows, prefix, device)
    fn = FastBackboneLogits(model, eager=not graphs, compile=graphs)
    cache = fn.new_cache(rows, prefix + 96)
    fn(ids[:, :prefix], 0, pads, cache, 32)
    with torch.no_grad():
        logits = fn(ids[:, prefix:], prefix, pads, cache, 32).float()
        ms = timer(lambda: fn(ids[:, prefix:], prefix, pads, cache, 32), device, warmup=3, reps=20)
    if graphs:
        fn._graphs.clear()
    return ms, logits


def backbone(args, device, dtype, bw, log):
    cfg = tiny_config() if args.tiny else BackboneConfig()
    cases = {k: (r, 96 if args.tiny else p) for k, (r, p) in CASES.items()}
    graphs = device.type == "cuda"
    ref = random_backbone(cfg, device=device, dtype=dtype, seed=0)
    base = {}
    unique = {}
    for name, (rows, prefix) in cases.items():
        ids, pads = make_case(cfg, rows, prefix, device)
        probe = FastBackboneLogits(ref, eager=True)
        cache = probe.new_cache(rows, prefix + 64)
        probe(ids[:, :prefix], 0, pads, cache, 32)
        with ExpertCounter(ref) as counter:
            probe(ids[:, prefix:], prefix, pads, cache, 32)
        unique[name] = counter.unique
        base[name] = step_case(ref, cfg, rows, prefix, device, graphs)
        floor = step_bytes(cfg, unique[name], rows, prefix)["total"] / (bw * 1e9) * 1e3
        log({"part": "backbone", "case": name, "quant": "bf16", "ms": base[name][0], "floor_ms": floor,
             "x_bf16": 1.0, "argmax_agree": 1.0, "rel_err": 0.0})
    gb_ref = sum(p.numel() * p.element_size() for p in ref.parameters()) / 1e9
    log({"part": "backbone", "case": "weights", "quant": "bf16", "gb": gb_ref})
    for quant in args.quant.split(","):
        model = random_backbone(cfg, device=device, dtype=dtype, seed=0, quant=quant)
        gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
        log({"part": "backbone", "case": "weights", "quant": quant, "gb": gb})
        for name, (rows, prefix) in cases.items():
            ms, logits = step_case(model, cfg, rows, prefix, device, graphs)
            ref_ms, ref_logits = base[name]
            # 8-bit weights: one byte per weight element; the lm_head and router stay as they are
            parts = step_bytes(cfg, unique[name], rows, prefix)
            weights = parts["attention+dense+shared+router"] + parts["routed experts"]
            floor = (parts["total"] - weights / 2) / (bw * 1e9) * 1e3
            agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
            err = ((logits - ref_logits).norm() / ref_logits.norm()).item()
            log({"part": "backbone", "case": name, "quant": quant, "ms": ms, "floor_ms": floor,
                 "x_bf16": ms / ref_ms, "argmax_agree": agree, "rel_err": err})
        del model
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
    del ref
    gc.collect()


def dit(args, device, dtype, log):
    from bench_decoder import build, dit_flops, matmul_tflops

    from llada2uni.quant import DIT_MODE, quantize_dit

    dec, model = build(args.tiny, device, dtype)
    g = 4 if args.tiny else 32
    codes = torch.randint(0, dec.num_codes, (g * g,), generator=torch.Generator().manual_seed(0)).tolist()
    cap = dec.conditioning(codes, g, g)
    hl = wl = g * 32 // dec.vae_factor
    x = torch.randn(1, 16, 1, hl, wl, device=device, generator=torch.Generator(device=device).manual_seed(1))
    t = torch.full((1,), 0.3, device=device)
    rate = matmul_tflops(device)
    fl = dit_flops(model.config, (hl // 2) * (wl // 2), cap.shape[0], 1)
    out = {}
    for variant in ("bf16", "fp8"):
        if variant == "fp8":
            quantize_dit(model, DIT_MODE, device=device, dtype=dtype)
        if device.type == "cuda":
            model.compile_repeated_blocks(fullgraph=True)
        vel = dec._velocity_fn(model, [cap])
        with torch.no_grad():
            ms = timer(lambda: vel(x, t), device, warmup=3, reps=7)
            v = vel(x, t).float()
            image = dec.decode(codes, g, g, mode="turbo", seed=0)
        gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
        out[variant] = (ms, v, torch.tensor(list(image.getdata()), dtype=torch.float32))
        row = {"part": "dit", "case": f"fwd {g * 32}px", "quant": variant, "ms": ms, "gb": gb,
               "floor_ms": fl / (rate * 1e12) * 1e3, "x_bf16": ms / out["bf16"][0]}
        if variant != "bf16":
            mse = (out[variant][2] - out["bf16"][2]).pow(2).mean().item()
            row["psnr_db"] = 10 * math.log10(255 ** 2 / max(mse, 1e-10))
            row["rel_err"] = ((v - out["bf16"][1]).norm() / out["bf16"][1].norm()).item()
        log(row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--quant", default="fp8,fp8-channel,int8")
    ap.add_argument("--parts", default="backbone,dit")
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bw = copy_bandwidth(device)
    rows = []

    def log(r):
        rows.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
        print(rows[-1], flush=True)

    t0 = time.perf_counter()
    if "backbone" in args.parts:
        backbone(args, device, dtype, bw, log)
    if "dit" in args.parts:
        dit(args, device, dtype, log)
    print(f"\ncard: {card}  copy bandwidth {bw:.0f} GB/s  ({time.perf_counter() - t0:.0f} s)")
    print(f"{'part':9s} {'case':12s} {'quant':12s} {'ms':>8s} {'floor':>8s} {'x bf16':>7s} {'agree':>6s} "
          f"{'rel err':>8s} {'PSNR':>6s} {'GB':>6s}")
    for r in rows:
        f = lambda k, fmt: format(r[k], fmt) if k in r else "-"  # noqa: E731
        print(f"{r['part']:9s} {r['case']:12s} {r['quant']:12s} {f('ms', '8.2f'):>8s} {f('floor_ms', '8.2f'):>8s} "
              f"{f('x_bf16', '7.2f'):>7s} {f('argmax_agree', '6.3f'):>6s} {f('rel_err', '8.4f'):>8s} "
              f"{f('psnr_db', '6.1f'):>6s} {f('gb', '6.1f'):>6s}")
    print(json.dumps({"bench": "quant", "card": card, "commit": git_commit(), "copy_gbs": round(bw),
                      "results": rows}))


if __name__ == "__main__":
    main()

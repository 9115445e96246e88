"""Memory tiers end to end on one GPU, full-size random weights: peak GPU memory and time of a
1024x1024 text-to-image (8 steps, CFG 2, turbo decoder) and of understanding an 800x800 image (256
answer tokens, 32 steps), for each ``--memory`` tier and backbone precision.

    python benchmarks/bench_tiers.py --quant fp8 --memory 80,24,16 [--max-seconds 480] [--tiny]

One process per precision: the tiers reuse its compiled step parts (tier 80 compiles them). Each
tier builds the same weights (seed 0) on the GPU, places them as ``from_pretrained`` does
(``memory.place_backbone``, the encoder and the DiT as arena groups, ``LLaDA2Uni.speed_up``), runs
one warm-up T2I and understanding, then the timed ones. "peak" is ``max_memory_reserved`` over the
timed runs (what the caching allocator holds, the number a smaller card must fit, plus ~0.5 GiB of
CUDA context); "alloc" is ``max_memory_allocated``. Floor of the streamed tiers: the bytes the
expert streams copy per forward / the measured pinned host-to-device bandwidth. The DiT is FP8 when
the backbone is (``quant.decoder_mode``'s "auto"). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, "benchmarks")

from llada2uni.config import BackboneConfig  # noqa: E402
from llada2uni.memory import GIB, Memory, footprint, place_backbone, streamed_layers  # noqa: E402
from llada2uni.models.image_tokenizer import ImageTokenizer, ImageTokenizerConfig  # noqa: E402
from llada2uni.pipeline import LLaDA2Uni  # noqa: E402
from llada2uni.quant import decoder_mode, quantize_dit, resolve_mode  # noqa: E402
from llada2uni.tiny import write_tiny_tokenizer  # noqa: E402
from llada2uni.tokens import Tokens  # noqa: E402
from llada2uni.weights import random_backbone  # noqa: E402


def sync_time(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def h2d_bandwidth(device) -> float:
    """Pinned host-to-device copy GB/s (what an expert stream gets)."""
    if device.type != "cuda":
        return 10.0
    src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device=device)
    for _ in range(2):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * (1 << 30) / (time.perf_counter() - t) / 1e9


def build(args, cfg, tokens, quant: str, tier: str, device, dtype):
    from bench_decoder import build as build_decoder
    mode = resolve_mode(quant, None, device)
    model = random_backbone(cfg, device=device, dtype=dtype, seed=0, quant=mode)
    tok_cfg = {} if not args.tiny else {
        "vision_config": {"hidden_size": 32, "depth": 1, "num_heads": 2, "intermediate_size": 64,
                          "image_size": 256, "patch_size": 16},
        "vq_config": {"num_embeddings": cfg.image_vocab_size, "embed_dim": 16, "latent_channels": 32}}
    tok = ImageTokenizer(ImageTokenizerConfig.from_dict(tok_cfg)).to(device=device, dtype=dtype).eval()
    dec, dit = build_decoder(args.tiny, device, dtype)
    dit_mode = decoder_mode("auto", mode, device)
    if dit_mode is not None:
        quantize_dit(dit, dit_mode, device=device, dtype=dtype)
    sizes = {"backbone_gib": footprint(model) / GIB, "dit_gib": footprint(dit) / GIB, "encoder_gib": footprint(tok) / GIB}
    mem = stream = None
    if tier != "80":
        budget = float(tier)
        if args.tiny:  # tiers scaled to the tiny parts: 24 -> the largest part fits, 16 -> experts stream
            largest = max(footprint(model), footprint(dit), footprint(tok))
            budget = (largest + 4096 if tier == "24" else footprint(model) - 1) / GIB
            mem = Memory(budget, device, reserve_gib=0)
        else:
            mem = Memory(budget, device)
        stream = place_backbone(mem, model)
        mem.add("encoder", tok)
        if not (args.tiny and tier == "16"):  # (the tiny DiT is larger than the tiny backbone: resident)
            mem.add("dit-turbo", dit)
            dec.memory = mem
    pipe = LLaDA2Uni(model, tokens, None, memory=mem)
    pipe._image_tokenizer = tok
    pipe._image_decoder = dec
    if device.type == "cuda":
        pipe.speed_up(streamed=stream is not None)
    del dit
    return pipe, sizes


def run_tier(args, cfg, tokens, quant, tier, device, dtype, picture, deadline) -> dict:
    row = {"quant": quant, "tier": tier}
    t0 = time.perf_counter()
    pipe, sizes = build(args, cfg, tokens, quant, tier, device, dtype)
    row.update({k: round(v, 2) for k, v in sizes.items()})
    row["build_s"] = round(time.perf_counter() - t0, 1)
    mem = pipe.memory
    row["streamed_layers"] = streamed_layers(pipe.model)
    if mem is not None:
        row["arena_gib"] = mem.stats()["arena_gib"]
        row["pinned_gib"] = round(sum(g.nbytes for g in mem.groups.values()) / GIB, 2)

    def t2i():
        r = pipe.generate_image("A lighthouse on a cliff at dusk, oil painting", 1024, 1024, steps=8,
                                cfg_scale=2.0, seed=0)
        forwards = pipe.last_stats["forwards"]
        img, dt = sync_time(lambda: pipe.decode_tokens(r["token_ids"], r["h"], r["w"], mode="turbo", seed=0), device)
        assert img.size == (1024, 1024)
        return forwards, dt

    def mmu():
        toks, h, w = pipe.encode_image(picture)
        pipe.understand_image(toks, h, w, question="Describe this image in detail.", steps=32, gen_length=256)
        return pipe.last_stats["forwards"]

    streamed = row["streamed_layers"] > 0
    if streamed:  # no graphs to capture, but the step's compile: paid here, on small shapes of both tasks
        small = picture.resize((256, 256))
        sync_time(lambda: pipe.generate_image("warm up", 256, 256, steps=2, cfg_scale=2.0, seed=0), device)
        sync_time(lambda: pipe.understand_image(small, question="Describe.", steps=4, gen_length=32), device)
    for name, fn in (("t2i", t2i), ("mmu", mmu)):
        if time.perf_counter() > deadline:
            row[f"{name}_s"] = "skipped (time)"
            continue
        if not streamed:  # warm-up (captures); a streamed tier runs the compiled eager step: no captures
            sync_time(fn, device)
        swaps = mem.swaps if mem is not None else 0
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        out, dt = sync_time(fn, device)
        row[f"{name}_s"] = round(dt, 2)
        if name == "t2i":
            row["t2i_forwards"], row["t2i_decode_s"] = out[0], round(out[1], 2)
        else:
            row["mmu_forwards"] = out
        if device.type == "cuda":
            row[f"{name}_peak_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
            row[f"{name}_alloc_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        if mem is not None:
            row[f"{name}_swaps"] = mem.swaps - swaps
    if streamed and pipe.model.config is not None:
        from llada2uni.memory import expert_layers
        e = expert_layers(pipe.model)[0].experts
        per = sum(t.numel() * t.element_size() for t in (e.w13, e.w2)) * row["streamed_layers"]
        row["streamed_gib_per_forward"] = round(per / GIB, 2)
    pipe = None  # noqa: F841 - the closures above hold the same cell: this frees the model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        row["left_allocated_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="fp8", help="backbone precision: none (bf16), fp8, fp8-channel, int8")
    ap.add_argument("--memory", default="80,24,16", help="tiers, in order")
    ap.add_argument("--max-seconds", type=float, default=480.0, help="skip runs that would start after this")
    ap.add_argument("--tiny", action="store_true", help="smoke run on CPU with tiny sizes")
    args = ap.parse_args()
    start = time.perf_counter()
    deadline = start + args.max_seconds
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        from llada2uni.tiny import tiny_config
        cfg = tiny_config()
    else:
        cfg = BackboneConfig()
    tmp = tempfile.mkdtemp()
    write_tiny_tokenizer(tmp)
    from tokenizers import Tokenizer
    tokens = Tokens(Tokenizer.from_file(f"{tmp}/tokenizer.json"), cfg)
    import numpy as np
    from PIL import Image
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8))
    bw = h2d_bandwidth(device)
    rows = []
    for tier in args.memory.split(","):
        if time.perf_counter() > deadline:
            rows.append({"quant": args.quant, "tier": tier, "error": "skipped (time)"})
            continue
        try:
            row = run_tier(args, cfg, tokens, args.quant, tier, device, dtype, picture, deadline)
        except Exception as e:  # noqa: BLE001 - one tier failing must not lose the others' numbers
            row = {"quant": args.quant, "tier": tier, "error": f"{type(e).__name__}: {e}"[:400]}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "streamed_gib_per_forward" in row:
            row["stream_floor_s_per_forward"] = round(row["streamed_gib_per_forward"] * GIB / (bw * 1e9), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\ncard: {card}   backbone: {args.quant}   pinned H2D {bw:.1f} GB/s")
    cols = ["tier", "streamed_layers", "t2i_s", "t2i_peak_gib", "mmu_s", "mmu_peak_gib", "t2i_swaps",
            "stream_floor_s_per_forward", "error"]
    print("  ".join(f"{c:>14s}" for c in cols))
    for r in rows:
        print("  ".join(f"{str(r.get(c, '')):>14s}"[:40] for c in cols))
    print(json.dumps({"bench": "tiers", "card": card, "commit": commit, "h2d_gbs": round(bw, 1),
                      "seconds": round(time.perf_counter() - start, 1), "rows": rows}))


if __name__ == "__main__":
    main()

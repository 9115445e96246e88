"""Image decoder: Z-Image DiT forward, VAE decode, turbo and normal end to end, against the compute floor.

    python benchmarks/bench_decoder.py            # full-size random decoder (6.2B DiT, FLUX-type VAE) on CUDA
    python benchmarks/bench_decoder.py --tiny     # smoke run on CPU with the tiny checkpoint's sizes

Variants: "eager" = diffusers' ZImageTransformer2DModel as loaded (SDPA; no attention mask for equal
lengths, so the flash kernel); "compiled" = the same with diffusers' regional torch.compile of the
repeated transformer blocks. FLOPs are counted from the shapes of this run (matmuls + attention, refiners
included); the floor is FLOPs / the measured bf16 matmul rate. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from llada2uni.models.decoder import ImageDecoder, SigVQ


def timer(fn, device, warmup=2, reps=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def matmul_tflops(device) -> float:
    if device.type != "cuda":
        return 0.5
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = timer(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * 8192**3 / (ms / 1e3) / 1e12


def dit_flops(cfg, img_tokens: int, cap_tokens: int, rows: int) -> float:
    """Matmul + attention FLOPs of one basic-mode forward (refiners on their own sequences)."""
    d = cfg.dim
    hidden = int(d / 3 * 8)
    per_tok = 2 * (4 * d * d + 3 * d * hidden)  # q,k,v,out + SwiGLU
    mod = 2 * 256 * 4 * d  # adaLN linear (per sequence, negligible)

    def stack(n_layers, seq):
        return n_layers * (seq * per_tok + 4 * seq * seq * d + mod)
    joint = img_tokens + cap_tokens
    total = (stack(cfg.n_layers, joint) + stack(cfg.n_refiner_layers, img_tokens)
             + stack(cfg.n_refiner_layers, cap_tokens))
    total += 2 * cap_tokens * 4096 * d + 2 * img_tokens * 64 * d * 2  # cap embedder, x embed + final
    return rows * total


def build(tiny: bool, device, dtype):
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    if tiny:
        dit_cfg = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=64, n_layers=2,
                       n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
                       cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 12, 12],
                       axes_lens=[32768, 1024, 1024])
        vae_cfg = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[8, 8, 8, 8],
                       layers_per_block=1, norm_num_groups=4,
                       down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                       scaling_factor=0.3611, shift_factor=0.1159)
        sig = (128, 32)
    else:
        dit_cfg = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30,
                       n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
                       cap_feat_dim=4096, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48],
                       axes_lens=[32768, 1024, 1024])
        vae_cfg = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                       layers_per_block=2, norm_num_groups=32,
                       down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                       use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
                       scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True, sample_size=1024)
        sig = (16384, 4096)
    gen = torch.Generator(device=device).manual_seed(0)

    def init(module):
        with torch.no_grad():
            for name, p in module.named_parameters():
                if p.ndim == 1:
                    p.fill_(1.0) if "norm" in name else p.zero_()
                else:
                    p.normal_(0.0, p.shape[-1] ** -0.5 if p.ndim == 2 else 0.02, generator=gen)
        return module

    with torch.device("meta"):
        dit = ZImageTransformer2DModel(**dit_cfg)
    dit = init(dit.to_empty(device=device).to(dtype)).eval()
    dit.rope_embedder.__init__(theta=dit_cfg["rope_theta"], axes_dims=dit_cfg["axes_dims"],
                               axes_lens=dit_cfg["axes_lens"]) if hasattr(dit, "rope_embedder") else None
    vae = init(AutoencoderKL(**vae_cfg).to(device=device, dtype=dtype)).eval()
    sigvq = init(SigVQ(*sig).to(device=device, dtype=dtype)).eval()
    dec = ImageDecoder(Path("."), sigvq, vae, device=device, dtype=dtype)
    dec._dits["turbo"] = dit
    dec._dits["normal"] = dit
    return dec, dit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--grids", default="16,32", help="token grid sides: 16 -> 512 px, 32 -> 1024 px")
    args = ap.parse_args()
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    t0 = time.perf_counter()
    dec, dit = build(args.tiny, device, dtype)
    build_s = time.perf_counter() - t0
    peak_rate = matmul_tflops(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = []
    grids = [int(g) for g in args.grids.split(",")]
    variants = ["eager"] if (args.no_compile or device.type != "cuda") else ["eager", "compiled"]
    for variant in variants:
        if variant == "compiled":
            dit.compile_repeated_blocks(fullgraph=True)  # compiled lazily: the warm-up runs pay for it
        for g in grids:
            codes = torch.randint(0, dec.num_codes, (g * g,)).tolist()
            cap = dec.conditioning(codes, g, g)
            hl = wl = g * 16 * 2 // dec.vae_factor
            img_tokens, cap_tokens = (hl // 2) * (wl // 2), cap.shape[0]
            for rows in (1, 2):
                caps = [cap] * rows
                vel = dec._velocity_fn(dit, caps)
                x = torch.randn(rows, 16, 1, hl, wl, device=device)
                t_ = torch.full((rows,), 0.3, device=device)
                with torch.no_grad():
                    ms = timer(lambda: vel(x, t_), device, warmup=3 if variant == "compiled" else 2, reps=5)
                fl = dit_flops(dit.config, img_tokens, cap_tokens, rows)
                floor = fl / (peak_rate * 1e12) * 1e3
                r = {"variant": variant, "what": f"dit fwd {g * 32}px x{rows}", "ms": round(ms, 2),
                     "tflop": round(fl / 1e12, 2), "floor_ms": round(floor, 2), "x_floor": round(ms / floor, 2),
                     "tflops": round(fl / (ms / 1e3) / 1e12, 1)}
                results.append(r)
                print(r, flush=True)
            lat = torch.randn(1, 16, hl, wl, device=device)
            from llada2uni.models.decoder import latents_to_image
            with torch.no_grad():
                vms = timer(lambda: latents_to_image(dec.vae, lat), device, warmup=1, reps=3)
            results.append({"variant": variant, "what": f"vae decode {g * 32}px", "ms": round(vms, 2)})
            print(results[-1], flush=True)
            for mode, steps in (("turbo", 8), ("normal", 50)):
                ems = timer(lambda: dec.decode(codes, g, g, mode=mode, steps=steps, seed=0), device,
                            warmup=0 if mode == "normal" else 1, reps=1 if mode == "normal" else 3)
                evals = steps if mode == "turbo" else (steps - 1)
                rows = 1 if mode == "turbo" else 2
                floor = evals * dit_flops(dit.config, img_tokens, cap_tokens, rows) / (peak_rate * 1e12) * 1e3
                results.append({"variant": variant, "what": f"{mode} e2e {g * 32}px ({evals} evals)", "ms": round(ems, 1),
                                "floor_ms": round(floor, 1), "x_floor": round(ems / floor, 2)})
                print(results[-1], flush=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\ncard: {card}  bf16 matmul: {peak_rate:.0f} TFLOP/s  build: {build_s:.1f} s  peak mem {peak:.1f} GiB")
    print(f"{'variant':9s} {'what':30s} {'ms':>9s} {'floor ms':>9s} {'x floor':>7s} {'TFLOP/s':>8s}")
    for r in results:
        print(f"{r['variant']:9s} {r['what']:30s} {r['ms']:>9.1f} {r.get('floor_ms', float('nan')):>9.1f} "
              f"{r.get('x_floor', float('nan')):>7.2f} {r.get('tflops', float('nan')):>8.1f}")
    print(json.dumps({"bench": "decoder", "card": card, "commit": commit, "matmul_tflops": round(peak_rate),
                      "peak_gib": round(peak, 1), "results": results}))


if __name__ == "__main__":
    main()

"""End to end on one GPU with full-size random weights: text-to-image 1024x1024 (turbo decoder) and
understanding of an 800x800 image with 256 answer tokens (first call, then a second one: the
number reported); time to first image after process start.

    python benchmarks/bench_e2e.py [--eager]

Weights are random (built on the GPU, no disk), the tokenizer is the tiny checkpoint's (the token
ids are valid ids of the real vocabulary), so the work per step is the real model's. "time to first
image" counts from process start: imports, building 16B + 6.2B + 1.2B parameters on the GPU (in place
of reading them from disk), CUDA-graph capture and the DiT's torch.compile warm-up. The step's
compile runs in a background thread during the build (``runtime.Precompile``), as ``from_pretrained``
runs it during the load; ``--no-precompile`` turns that off, ``--breakdown`` times the first T2I's
compiles and captures. Prints a table, then one JSON line.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

from llada2uni.config import BackboneConfig  # noqa: E402
from llada2uni.models.image_tokenizer import ImageTokenizer, ImageTokenizerConfig  # noqa: E402
from llada2uni.pipeline import LLaDA2Uni  # noqa: E402
from llada2uni.runtime import FastBackboneLogits, Precompile, accelerate  # noqa: E402
from llada2uni.tiny import write_tiny_tokenizer  # noqa: E402
from llada2uni.tokens import Tokens  # noqa: E402
from llada2uni.weights import make_random  # noqa: E402


def sync_time(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


class Breakdown:
    """Where the first T2I's seconds go (``--breakdown``): wall time inside graph captures, inside
    step-part calls that compiled (Dynamo + Inductor), and inside eager steps (prefill windows)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, label: str, dt: float) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + dt
        self.calls[label] = self.calls.get(label, 0) + 1

    def install(self, fast) -> None:
        from llada2uni import runtime
        me = self

        def timed(fn, label):
            def wrapper(*a, **k):
                torch.cuda.synchronize()
                t = time.perf_counter()
                out = fn(*a, **k)
                torch.cuda.synchronize()
                me.add(label, time.perf_counter() - t)
                return out
            return wrapper
        fast._capture = timed(fast._capture, "capture (incl. its compiles)")
        original = runtime._Compiled.__call__

        def compiled_call(self, *a):
            before = self.compiles
            t = time.perf_counter()
            out = original(self, *a)
            if self.compiles > before:
                me.add(f"compile {getattr(self.eager, '__name__', '?')}", time.perf_counter() - t)
            return out
        runtime._Compiled.__call__ = compiled_call

    def report(self) -> dict:
        return {k: [round(v, 2), self.calls[k]] for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-precompile", action="store_true", help="no background compile during the build")
    ap.add_argument("--breakdown", action="store_true", help="time the first T2I's captures and compiles")
    ap.add_argument("--eager", action="store_true", help="clear path for the backbone, no compile")
    ap.add_argument("--tiny", action="store_true", help="smoke run on CPU with tiny sizes")
    args = ap.parse_args()
    import sys
    sys.path.insert(0, "benchmarks")
    from bench_backbone import ExpertCounter, copy_bandwidth, step_bytes
    from bench_decoder import build as build_decoder
    from bench_decoder import dit_flops, matmul_tflops

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        from llada2uni.tiny import tiny_config
        cfg = tiny_config()
        torch.cuda.synchronize = lambda *a: None
        torch.cuda.reset_peak_memory_stats = lambda *a: None
        torch.cuda.max_memory_allocated = lambda *a: 0
        torch.cuda.get_device_name = lambda *a: "cpu"
    else:
        cfg = BackboneConfig()
    # as LLaDA2Uni.from_pretrained does: the step's compile runs in the background while weights load
    precompile = None if args.eager or args.tiny or args.no_precompile else Precompile(cfg, device, dtype)
    model = make_random(cfg, device=device, dtype=dtype)
    tmp = tempfile.mkdtemp()
    write_tiny_tokenizer(tmp)
    from tokenizers import Tokenizer
    tokens = Tokens(Tokenizer.from_file(f"{tmp}/tokenizer.json"), cfg)
    pipe = LLaDA2Uni(model, tokens, None)
    tok_cfg = {} if not args.tiny else {
        "vision_config": {"hidden_size": 32, "depth": 1, "num_heads": 2, "intermediate_size": 64,
                          "image_size": 256, "patch_size": 16},
        "vq_config": {"num_embeddings": cfg.image_vocab_size, "embed_dim": 16, "latent_channels": 32}}
    tok = ImageTokenizer(ImageTokenizerConfig.from_dict(tok_cfg)).to(device=device, dtype=dtype).eval()
    pipe._image_tokenizer = tok
    dec, dit = build_decoder(args.tiny, device, dtype)
    pipe._image_decoder = dec
    if args.eager:
        from llada2uni.pipeline import BackboneLogits
        pipe.logits_fn = BackboneLogits(model)
    else:
        accelerate(pipe, precompile=precompile)
    breakdown = Breakdown() if args.breakdown else None
    if breakdown is not None and not args.eager:
        breakdown.install(pipe.logits_fn)
    build_s = time.perf_counter() - START
    results = {}

    def t2i():
        r = pipe.generate_image("A lighthouse on a cliff at dusk, oil painting", 1024, 1024, steps=8,
                                cfg_scale=2.0, seed=0)
        forwards = pipe.last_stats["forwards"]
        img, dt = sync_time(lambda: pipe.decode_tokens(r["token_ids"], r["h"], r["w"], mode="turbo", seed=0))
        return img, forwards, dt

    torch.cuda.reset_peak_memory_stats()
    (img, forwards, dec_s), first_s = sync_time(t2i)
    results["time_to_first_image_s"] = round(time.perf_counter() - START, 1)
    results["first_t2i_s"] = round(first_s, 2)  # after the build: what the first request pays
    results["first_t2i_decode_s"] = round(dec_s, 2)  # of which the decoder (its compile included)
    if breakdown is not None:
        results["first_t2i_breakdown"] = breakdown.report()
    results["precompile"] = getattr(pipe.logits_fn, "precompiled", None)
    torch.cuda.reset_peak_memory_stats()
    (img, forwards, dec_s), t2i_s = sync_time(t2i)
    results["t2i_1024_turbo_s"] = round(t2i_s, 2)
    results["t2i_token_s"] = round(t2i_s - dec_s, 2)
    results["t2i_decode_s"] = round(dec_s, 2)
    results["t2i_forwards"] = forwards
    results["t2i_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    assert img.size == (1024, 1024)

    # floors: backbone steps (bytes of the experts this routing touches) + DiT FLOPs + VAE as measured
    bw, rate = copy_bandwidth(device), matmul_tflops(device)
    probe = FastBackboneLogits(model, eager=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 1088 + 32), device=device)
    pads = torch.zeros(2, dtype=torch.long, device=device)
    cache = probe.new_cache(2, 1088 + 64)
    probe(ids[:, :1088], 0, pads, cache, 32)
    with ExpertCounter(model) as counter:
        probe(ids[:, 1088:], 1088, pads, cache, 32)
    step_floor = step_bytes(cfg, counter.unique, 2, 1088)["total"] / (bw * 1e9)
    results["step_floor_ms"] = round(step_floor * 1e3, 2)
    # pipe.logits_fn and its graphs stay: the probe set the same default dispatch, ExpertCounter restored it
    from llada2uni.models.decoder import latents_to_image
    _, vae_s = sync_time(lambda: latents_to_image(dec.vae, torch.randn(1, 16, 128, 128, device=device)))
    dit_floor = 8 * dit_flops(dit.config, 4096, 4096, 1) / (rate * 1e12)
    floor = forwards * step_floor + dit_floor + vae_s
    results["t2i_floor_s"] = round(floor, 2)
    results["t2i_x_floor"] = round(t2i_s / floor, 2)
    results["t2i_token_floor_s"] = round(forwards * step_floor, 2)
    results["t2i_dit_floor_s"] = round(dit_floor, 2)

    from PIL import Image
    import numpy as np
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8))
    torch.cuda.reset_peak_memory_stats()

    def mmu():
        toks, h, w = pipe.encode_image(picture)
        text = pipe.understand_image(toks, h, w, question="Describe this image in detail.", steps=32,
                                     gen_length=256)
        return text, len(toks)
    (text, n_img), mmu_first_s = sync_time(mmu)  # first understanding: its shapes' capture included
    results["mmu_first_s"] = round(mmu_first_s, 2)
    (text, n_img), mmu_s = sync_time(mmu)
    results["mmu_800_256tok_s"] = round(mmu_s, 2)
    results["mmu_image_tokens"] = n_img
    results["mmu_forwards"] = pipe.last_stats["forwards"]
    results["mmu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    results["build_s"] = round(build_s, 1)
    card = torch.cuda.get_device_name(device)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\ncard: {card}   path: {'eager' if args.eager else 'fast'}")
    for k, v in results.items():
        print(f"  {k:28s} {v}")
    print(json.dumps({"bench": "e2e", "card": card, "commit": commit, "path": "eager" if args.eager else "fast",
                      **results}))


if __name__ == "__main__":
    main()

"""SPRINT against the baseline block loop: forwards per block, wall time, agreement.

    python benchmarks/bench_sprint.py                          # tiny checkpoint on CPU (make_tiny)
    python benchmarks/bench_sprint.py --device cuda --full     # full-size random backbone, bf16

Tasks (the two SPRINT serves): "mmu" = understanding, image tokens + question, a text canvas, one row;
"t2i" = text prompt, an image canvas restricted to image codes, simple CFG (two rows, left-padded).
Configs: "baseline" (cached block loop, fixed schedule); "reuse" (SPRINT, keep ratio 1.0: adaptive
unmasking + prefix reuse, no pruning); "sprint" (the official defaults: keep 0.7, warm-up 2);
"sprint-0.5" (the model card's keep 0.5, warm-up 1, image keys unpinned); "card" (understanding only:
the model card's example, keep 0.5, warm-up 1, image and text keys pinned, so every key kept, at its
threshold 0.93); "base@0.93" (understanding only: the baseline at 0.93). All others at threshold 0.95 and the same steps.

Random weights give flat predictions, so no token ever passes the threshold and every block takes
its full step count. ``--sharpen S`` (repeatable) scales the LM head by S to emulate a confident
model, so threshold acceptance and adaptive counts show up; it is synthetic and says nothing about
quality. "agree" is the fraction of generated tokens equal to the baseline's (same sharpen).
Every config runs once untimed first (warm-up), then ``--reps`` timed runs: "ms" is their median,
"best" their minimum (steadier on a shared CPU); speed-ups and rates use "best". On CUDA every
config runs on ``runtime.FastBackboneLogits`` (compiled step, CUDA graphs, SPRINT's pruned steps
included), the path the pipeline uses, and one more row, "sprint/clr", runs SPRINT on the clear
``BackboneLogits`` for comparison; on CPU all run on the clear path. Prints a table, then
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from llada2uni.config import BackboneConfig
from llada2uni.pipeline import BackboneLogits
from llada2uni.sampling.block import DenoiseRequest, generate
from llada2uni.sampling.guidance import Guidance
from llada2uni.sampling.sprint import Sprint
from llada2uni.tokens import align_rows

CONFIGS = {
    "baseline": None,
    "reuse": Sprint(keep_ratio=1.0),
    "sprint": Sprint(),
    "sprint-0.5": Sprint(keep_ratio=0.5, cache_warmup_steps=1),
    # the model card's understanding example: every key pinned (kept), threshold 0.93
    "card": Sprint(keep_ratio=0.5, cache_warmup_steps=1, image_keep_ratio=1.0, text_keep_ratio=1.0),
    "base@0.93": None,  # the baseline at the card's threshold: what the threshold alone gives
}
THRESHOLD = {"card": 0.93, "base@0.93": 0.93}  # the request's acceptance threshold where a config sets its own (else 0.95)

# Special ids of the real checkpoint (spec 4.1) for the tokenizer-free full-size prompts.
SOI, EOI, BOI = 156901, 156902, 156904


def tiny_setup(args):
    from llada2uni.pipeline import LLaDA2Uni
    from llada2uni.tiny import make_tiny
    directory = make_tiny(Path(tempfile.mkdtemp()) / "tiny", seed=0)
    pipe = LLaDA2Uni.from_pretrained(directory, device="cpu", dtype="float32")
    tok, cfg = pipe.tokens, pipe.config
    g = torch.Generator().manual_seed(0)
    side = args.mmu_grid
    image = (torch.randint(0, cfg.image_vocab_size, (side * side,), generator=g) + cfg.image_token_offset).tolist()
    mmu = [tok.understand_prompt([(image, side, side)], "Describe this image in detail.")]
    t2i = tok.t2i_prompts("A lighthouse on a cliff at dusk, oil painting", args.t2i_grid, args.t2i_grid)
    return pipe.model, cfg, mmu, t2i


def full_setup(args):
    from llada2uni.runtime import use_fast_moe
    from llada2uni.weights import make_random
    cfg = BackboneConfig(num_hidden_layers=args.layers)
    model = make_random(cfg, device=args.device, dtype=torch.bfloat16)
    if model.device.type == "cuda":
        use_fast_moe(model)
    g = torch.Generator().manual_seed(0)

    def text(n):  # ordinary text ids, clear of the special-token range
        return torch.randint(1000, 150000, (n,), generator=g).tolist()
    side = args.mmu_grid
    codes = (torch.randint(0, cfg.image_vocab_size, (side * side,), generator=g) + cfg.image_token_offset).tolist()
    mmu = [text(40) + [SOI] + text(2) + [BOI] + codes + [EOI] + text(12)]
    header = [SOI] + text(2) + [BOI]
    t2i = [text(60) + header, text(20) + header]  # conditional, and a shorter unconditional prompt
    return model, cfg, mmu, t2i


def requests(task, cfg, mmu, t2i, args, threshold=0.95):
    if task == "mmu":
        return [DenoiseRequest(rows=mmu, pad_lens=[0], gen_length=args.mmu_gen, steps=args.mmu_steps,
                               threshold=threshold)]
    rows, pads = align_rows(t2i, cfg.mask_token_id)
    return [DenoiseRequest(rows=rows, pad_lens=pads, gen_length=args.t2i_grid ** 2, steps=args.t2i_steps,
                           threshold=threshold,
                           guidance=Guidance("simple", scale=2.0),
                           vocab=(cfg.image_token_offset, cfg.vocab_size))]


def run(fn, reqs, cfg, sprint, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = generate(fn, reqs, mask_id=cfg.mask_token_id, device=device, sprint=sprint,
                   image_offset=cfg.image_token_offset)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t) * 1e3


def kept_fraction(out) -> float | None:
    kept = total = 0
    for s in out.pruned:
        kept += sum(s.kept)
        total += sum(s.total)
    return kept / total if total else None


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "?"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--full", action="store_true", help="full-size random backbone (needs ~32 GB of GPU memory)")
    p.add_argument("--layers", type=int, default=20, help="--full: fewer layers for a smoke run")
    p.add_argument("--sharpen", type=float, action="append", help="LM-head scale(s); default 1 and 16")
    p.add_argument("--tasks", default="mmu,t2i")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--mmu_grid", type=int, default=None, help="image side in tokens (default 16 tiny, 32 full)")
    p.add_argument("--mmu_gen", type=int, default=None, help="tokens to generate (default 256 tiny, 128 full)")
    p.add_argument("--mmu_steps", type=int, default=32)
    p.add_argument("--t2i_grid", type=int, default=16, help="image side in tokens (16 = 512 px)")
    p.add_argument("--t2i_steps", type=int, default=8)
    args = p.parse_args()
    args.mmu_grid = args.mmu_grid or (32 if args.full else 16)
    args.mmu_gen = args.mmu_gen or (128 if args.full else 256)
    sharpen = args.sharpen or [1.0, 16.0]
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, cfg, mmu, t2i = (full_setup if args.full else tiny_setup)(args)
    head = model.lm_head.weight.detach().clone()
    clear = BackboneLogits(model)
    if device.type == "cuda":  # every config on the fast path the pipeline uses, and SPRINT on the clear one
        from llada2uni.runtime import FastBackboneLogits
        fast = FastBackboneLogits(model, compile=True)
        configs = [(name, sprint, fast) for name, sprint in CONFIGS.items()]
        configs.append(("sprint/clr", CONFIGS["sprint"], clear))
    else:
        configs = [(name, sprint, clear) for name, sprint in CONFIGS.items()]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "CPU"
    results = []
    print(f"device {name}  model {'full-size random' if args.full else 'tiny'} {model.dtype}  commit {commit()}")
    print(f"{'task':5} {'sharpen':>7} {'config':11} {'fwd':>5} {'fwd/blk':>7} {'ms':>9} {'best':>9} {'ms/fwd':>7} "
          f"{'tok/s':>8} {'speedup':>7} {'kept':>5} {'agree':>6}")
    for task in args.tasks.split(","):
        for s in sharpen:
            with torch.no_grad():
                model.lm_head.weight.copy_(head * s)
            base_tokens = base_best = None
            for cname, sprint, fn in configs:
                if cname in THRESHOLD and task != "mmu":
                    continue  # the card's T2I example is SPRINT's defaults: the "sprint" row
                reqs = requests(task, cfg, mmu, t2i, args, THRESHOLD.get(cname, 0.95))
                run(fn, reqs, cfg, sprint, device)  # warm-up
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times = []
                for _ in range(args.reps):
                    out, ms = run(fn, reqs, cfg, sprint, device)
                    times.append(ms)
                ms, best = statistics.median(times), min(times)
                tokens = out.tokens[0]
                if cname == "baseline":
                    base_tokens, base_best = tokens, best
                agree = sum(a == b for a, b in zip(tokens, base_tokens)) / len(base_tokens)
                blocks = sum(1 for n in out.steps_per_block if n)
                kept = kept_fraction(out)
                r = {"task": task, "sharpen": s, "config": cname, "forwards": out.forwards,
                     "forwards_per_block": out.forwards / blocks, "ms": ms, "best_ms": best,
                     "ms_per_forward": best / out.forwards, "tokens_per_s": len(tokens) / (best / 1e3),
                     "speedup": base_best / best, "kept": kept,
                     "agree": agree,
                     "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}
                results.append(r)
                kept_s = f"{kept:5.2f}" if kept is not None else "    -"
                print(f"{task:5} {s:7.1f} {cname:11} {r['forwards']:5d} {r['forwards_per_block']:7.2f} "
                      f"{ms:9.1f} {best:9.1f} {r['ms_per_forward']:7.2f} {r['tokens_per_s']:8.1f} {r['speedup']:7.2f} "
                      f"{kept_s} {agree:6.2f}")
    print(json.dumps({"bench": "sprint", "device": name, "full": args.full, "dtype": str(model.dtype),
                      "commit": commit(), "args": {k: v for k, v in vars(args).items() if k != "sharpen"},
                      "sharpen": sharpen, "results": results}))


if __name__ == "__main__":
    main()

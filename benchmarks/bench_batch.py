"""A batch of requests through the sampler on the fast path: where a forward's time goes besides the step.

    python benchmarks/bench_batch.py                    # CUDA, full-size random backbone
    python benchmarks/bench_batch.py --requests 1,32,64

For each task (chat: 128 tokens in 32 steps a block; T2I 512 px: 256 codes in 8 steps a block, CFG 4.0
with rescale 0.7, the image vocabulary) and request count, one ``generate`` over all requests at once
(no admission), each variant after one untimed run of the same shapes (captures, compiles):

* ``sliced`` (T2I): ``vocab_slices=True``: the image canvas's step computes the logits of the image
  ids only, with the full vocabulary's moments for cfg_rescale (``VocabMoments``);
* ``fused``: the pipeline's path: full-vocabulary logits, ``FastBackboneLogits(compile=True)``'s
  ``greedy_pick`` (the compiled guidance + restriction + argmax/confidence);
* ``reference``: full-vocabulary logits, the sampler's reference ``greedy_pick`` (eager fp32 chain).

Reported: wall time, forwards, ms per forward, requests/s, and the GPU time inside the forwards
(CUDA events around each ``logits_fn`` call), so "other" = sampler and host work per forward.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from bench_backbone import git_commit  # noqa: E402


class Timed:
    """A logits_fn proxy that records CUDA events around every call (no host sync)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.events = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = self.inner(*args, **kwargs)
        b.record()
        self.events.append((a, b))
        return out

    def forward_ms(self) -> float:
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.events)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", default="1,32")
    ap.add_argument("--tasks", default="chat,t2i")
    args = ap.parse_args()

    from llada2uni import LLaDA2Uni
    from llada2uni.config import BackboneConfig
    from llada2uni.runtime import accelerate
    from llada2uni.tiny import write_tiny_tokenizer
    from llada2uni.tokens import Tokens
    from llada2uni.weights import make_random

    dev = torch.device("cuda")
    config = BackboneConfig()
    model = make_random(config, device=dev, dtype=torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix="llada2uni-batch-"))
    write_tiny_tokenizer(tmp)
    pipe = LLaDA2Uni(model, Tokens.from_pretrained(tmp, config), path=None)
    accelerate(pipe, compile_decoder=False)
    fast = pipe.logits_fn
    fused_pick = fast.greedy_pick
    g = torch.Generator().manual_seed(0)

    def requests(task, n):
        if task == "t2i":
            # "object 10".."object 99": one prompt length, not block-aligned (as most are: 72 forwards, not 64)
            rows = [pipe.tokens.t2i_prompts(f"a photo of object {i + 10}", 16, 16) for i in range(n)]
            from llada2uni.sampling.guidance import Guidance
            return [pipe._request(r, gen_length=256, steps=8, threshold=0.95, image=True,
                                  guidance=Guidance("simple", scale=4.0, rescale=0.7), clamp_length=1088)
                    for r in rows]
        return [pipe._request([torch.randint(0, 150000, (48,), generator=g).tolist()], gen_length=128, steps=32,
                              threshold=0.95) for _ in range(n)]

    results = []
    for task in args.tasks.split(","):
        for n in [int(x) for x in args.requests.split(",")]:
            reqs = requests(task, n)
            for variant in (("sliced", "fused", "reference") if task == "t2i" else ("fused", "reference")):
                fast.greedy_pick = None if variant == "reference" else fused_pick
                fast.vocab_slices = variant == "sliced"
                pipe.logits_fn = fast
                pipe._run(reqs, 32, task)  # captures, compiles
                timed = Timed(fast)
                pipe.logits_fn = timed
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                pipe._run(reqs, 32, task)
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
                fwd = timed.forward_ms()
                forwards = pipe.last_stats["forwards"]
                row = {"task": task, "requests": n, "variant": variant, "wall_s": round(wall, 3),
                       "forwards": forwards, "ms_per_forward": round(wall * 1e3 / forwards, 2),
                       "forward_gpu_ms": round(fwd / forwards, 2),
                       "other_ms": round((wall * 1e3 - fwd) / forwards, 2), "req_per_s": round(n / wall, 2)}
                results.append(row)
                print(row, flush=True)
    pipe.logits_fn = fast
    fast.greedy_pick = fused_pick
    fast.vocab_slices = True  # the default
    card = torch.cuda.get_device_name(dev)
    print(f"\ncard: {card}")
    print(f"{'task':5s} {'reqs':>4s} {'variant':>9s} {'wall s':>7s} {'fwds':>5s} {'ms/fwd':>7s} {'in fwd':>7s} "
          f"{'other':>6s} {'req/s':>7s}")
    for r in results:
        print(f"{r['task']:5s} {r['requests']:>4d} {r['variant']:>9s} {r['wall_s']:>7.2f} {r['forwards']:>5d} "
              f"{r['ms_per_forward']:>7.2f} {r['forward_gpu_ms']:>7.2f} {r['other_ms']:>6.2f} {r['req_per_s']:>7.2f}")
    print(json.dumps({"bench": "batch", "card": card, "commit": git_commit(), "results": results}))


if __name__ == "__main__":
    main()

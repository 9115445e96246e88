"""Bounded load test of ``llada2uni serve`` on loopback.

Starts the server in a subprocess (the tiny checkpoint on the CPU by default; ``--full --device cuda``:
the full-size random backbone, image decoding skipped), waits for /ready (the server's own warm-up
included; its report is printed), times a first request, then for each task in ``--task`` and each
client count in ``--clients`` runs max(--requests, --requests-per-client x clients) requests from
that many concurrent clients and reports, per level: completed, rejected (429 answers; the client
waits Retry-After and retries, up to --max-retries), failed (other HTTP errors or a bad body), lost
(no HTTP answer at all; must be 0), failed batches (the scheduler re-ran a batch job by job; must be
0), p50/p95 latency of the answered attempt and end to end, requests/s and its ratio to 1 client's,
generated tokens/s, and the scheduler's mean and largest batch. Prints a table, then one JSON line;
exits 1 if anything was lost or a batch failed.

    python benchmarks/load_test.py                                  # tiny, CPU, 64 clients
    python benchmarks/load_test.py --full --device cuda --task chat,t2i --clients 1,8,32,64 \
        --size 512x512 --steps 32 --max-tokens 128 --requests 8 --requests-per-client 4

Closed-loop clients: each sends its next request when the last is answered. With few requests per
client, ramp-up (all start at once) and drain (the last ones finish in an emptying batch) weigh on a
level's requests/s; 4 per client measures closer to the steady state (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---- server side (the subprocess) ----

def build_pipe(args):
    import tempfile

    import torch

    from llada2uni import LLaDA2Uni, make_tiny

    tmp = Path(tempfile.mkdtemp(prefix="llada2uni-load-"))
    if not args.full:
        return LLaDA2Uni.from_pretrained(make_tiny(tmp / "tiny"), device=args.device or "cpu")
    from llada2uni.config import BackboneConfig
    from llada2uni.tiny import write_tiny_tokenizer
    from llada2uni.tokens import Tokens
    from llada2uni.weights import make_random

    config = BackboneConfig()  # the full-size LLaDA2.0-Uni backbone, random weights
    device = torch.device(args.device or "cuda")
    precompile = None
    if device.type == "cuda" and not args.eager:  # as from_pretrained: compile while the weights are made
        from llada2uni.runtime import Precompile
        precompile = Precompile(config, device, torch.bfloat16)
    model = make_random(config, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    # Any tokenizer with the special strings serves: ids are looked up by string (tokens.py).
    write_tiny_tokenizer(tmp)
    pipe = LLaDA2Uni(model, Tokens.from_pretrained(tmp, config), path=None)
    if device.type == "cuda" and not args.eager:
        from llada2uni.runtime import accelerate
        accelerate(pipe, precompile=precompile)  # the fast path from_pretrained gives on CUDA
    return pipe


def run_server(args) -> None:
    import torch
    import uvicorn

    from llada2uni.server import ServerConfig, create_app

    pipe = build_pipe(args)
    name = torch.cuda.get_device_name(pipe.device) if pipe.device.type == "cuda" else "cpu"
    print(f"server: {'full-size random' if args.full else 'tiny'} model on {pipe.device} ({name})",
          file=sys.stderr, flush=True)
    config = ServerConfig(model_id="load-test", max_batch=args.max_batch, max_queue=args.max_queue,
                          batch_linger_s=args.batch_linger_ms / 1e3,
                          request_timeout=args.request_timeout, warm_up=args.warm_up,
                          default_size=args.size, default_max_tokens=args.max_tokens)
    uvicorn.run(create_app(config, pipe=pipe), host="127.0.0.1", port=args.port, log_level="warning")


# ---- client side ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_for(i: int, args, task: str) -> tuple[str, dict]:
    task = task if task != "mixed" else ("t2i", "chat")[i % 2]
    if task == "t2i":
        return "/v1/images/generations", {
            "prompt": f"picture number {i}: a lighthouse on a cliff", "size": args.size,
            "steps": args.t2i_steps or args.steps,
            "seed": i, "decoder_steps": args.decoder_steps,
            "response_format": "tokens" if args.full else "b64_json"}
    return "/v1/chat/completions", {
        "messages": [{"role": "user", "content": f"Question {i}: tell me about lighthouses."}],
        "max_tokens": args.max_tokens, "steps": args.steps, "seed": i}


def generated_tokens(path: str, body: dict) -> int:
    """Validates an answer (PNG or token grid or text) and counts the tokens it generated."""
    if path.endswith("generations"):
        item = body["data"][0]
        if "b64_json" in item:
            from PIL import Image
            Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).verify()
            w, h = (int(s) for s in body["size"].split("x"))
            return (h // 32) * (w // 32)
        assert len(item["token_ids"]) == item["h"] * item["w"]
        return len(item["token_ids"])
    assert isinstance(body["choices"][0]["message"]["content"], str)
    return body["usage"]["completion_tokens"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


async def run_level(base: str, clients: int, requests: int, args, task: str) -> dict:
    import httpx

    counter = iter(range(requests))
    out = {"task": task, "clients": clients, "requests": requests, "completed": 0, "rejected": 0, "failed": 0, "lost": 0,
           "gave_up": 0}
    latency, e2e, tokens = [], [], 0
    errors: dict[str, int] = {}

    async def client(http):
        nonlocal tokens
        for i in counter:
            path, body = request_for(i, args, task)
            start = time.perf_counter()
            for attempt in range(args.max_retries + 1):
                t0 = time.perf_counter()
                try:
                    r = await http.post(path, json=body)
                except httpx.HTTPError as e:
                    out["lost"] += 1
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    break
                if r.status_code == 429:
                    out["rejected"] += 1
                    if attempt == args.max_retries:
                        out["gave_up"] += 1
                        break
                    await asyncio.sleep(min(float(r.headers.get("retry-after", 1)), 5.0))
                    continue
                if r.status_code != 200:
                    out["failed"] += 1
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                    break
                try:
                    tokens += generated_tokens(path, r.json())
                except Exception as e:  # noqa: BLE001 - a 200 with a bad body is a failure
                    out["failed"] += 1
                    errors[f"bad body: {type(e).__name__}"] = errors.get(f"bad body: {type(e).__name__}", 0) + 1
                    break
                out["completed"] += 1
                latency.append(time.perf_counter() - t0)
                e2e.append(time.perf_counter() - start)
                break

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=args.client_timeout, limits=limits) as http:
        before = (await http.get("/ready")).json()["scheduler"]
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
        after = (await http.get("/ready")).json()["scheduler"]
    batches = after["batches"] - before["batches"]
    out.update(wall_s=round(wall, 2), p50_s=round(percentile(latency, 0.5), 3),
               p95_s=round(percentile(latency, 0.95), 3), e2e_p50_s=round(percentile(e2e, 0.5), 3),
               e2e_p95_s=round(percentile(e2e, 0.95), 3), req_per_s=round(out["completed"] / wall, 2),
               tokens_per_s=round(tokens / wall, 1),
               mean_batch=round((after["batched_requests"] - before["batched_requests"]) / batches, 2) if batches else 0,
               # rows per forward: how full the steps ran (CFG requests count 2 rows)
               rows_per_forward=round((after["row_forwards"] - before["row_forwards"])
                                      / max(after["forwards"] - before["forwards"], 1), 2),
               # requests that joined a running batch at a block boundary (missed its start)
               joined=after["joined"] - before["joined"],
               max_batch=max((int(k) for k, v in after["batch_sizes"].items()
                              if v > before["batch_sizes"].get(k, 0)), default=0),
               server_in_flight_after=after["in_flight"], errors=errors,
               # batches that failed and were re-run one job at a time, or aborted: must stay 0
               failed_batches=after["isolated_retries"] - before["isolated_retries"],
               aborted_batches=after["aborted_batches"] - before["aborted_batches"])
    # Every request has an outcome: nothing vanished between the clients and the scheduler.
    out["accounted"] = out["completed"] + out["failed"] + out["lost"] + out["gave_up"] == requests
    return out


async def wait_ready(base: str, args, server=None) -> dict:
    """Until /ready answers 200 (the server's own warm-up included); returns its body."""
    import httpx
    async with httpx.AsyncClient(base_url=base, timeout=args.client_timeout) as http:
        deadline = time.monotonic() + args.start_timeout
        while True:
            if server is not None and server.poll() is not None:  # died while starting: say so now
                raise SystemExit(f"the server exited with code {server.returncode} before it was ready")
            try:
                r = await http.get("/ready")
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not become ready")
            await asyncio.sleep(0.5)


async def first_requests(base: str, args, task: str) -> float:
    """Two requests one after the other; returns the first one's seconds (what a first user waits)."""
    import httpx
    async with httpx.AsyncClient(base_url=base, timeout=args.client_timeout) as http:
        first = None
        for i in range(2):
            path, body = request_for(i, args, task)
            t = time.perf_counter()
            r = await http.post(path, json=body)
            r.raise_for_status()
            first = first if first is not None else time.perf_counter() - t
        return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="64", help="concurrent clients; a comma list runs a sweep")
    ap.add_argument("--requests", type=int, default=256, help="requests per level (at least)")
    ap.add_argument("--requests-per-client", type=int, default=0,
                    help="per level, at least this many requests per client")
    ap.add_argument("--warmup", type=int, default=None,
                    help="requests sent first at the largest client count, not measured (default: that count)")
    ap.add_argument("--task", default="mixed", help="t2i, chat or mixed; a comma list runs each in turn")
    ap.add_argument("--size", default="64x64")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps per block")
    ap.add_argument("--t2i-steps", type=int, default=None, help="steps per block of image requests (default --steps)")
    ap.add_argument("--decoder-steps", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64, help="chat answer length")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=32)
    ap.add_argument("--batch-linger-ms", type=float, default=20.0, help="server: SchedulerConfig.batch_linger_s")
    ap.add_argument("--max-retries", type=int, default=50, help="per request, on 429")
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--client-timeout", type=float, default=900.0)
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--full", action="store_true", help="full-size random backbone; image decoding skipped")
    ap.add_argument("--device", default=None)
    ap.add_argument("--eager", action="store_true", help="--full: the clear backbone path (no fast path)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the server (CPU)")
    ap.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-warm-up", dest="warm_up", action="store_false", help="server: skip its warm-up")
    args = ap.parse_args()
    tasks = args.task.split(",")
    if any(t not in ("t2i", "chat", "mixed") for t in tasks):
        ap.error(f"--task: each of t2i, chat, mixed; got {args.task!r}")

    if args.serve_only:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        return run_server(args)

    port = free_port()
    cmd = [sys.executable, __file__, "--serve-only", "--port", str(port), "--max-batch", str(args.max_batch),
           "--max-queue", str(args.max_queue), "--request-timeout", str(args.request_timeout),
           "--batch-linger-ms", str(args.batch_linger_ms)]
    cmd += ["--full"] * args.full + ["--eager"] * args.eager + (["--device", args.device] if args.device else [])
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--size", args.size, "--max-tokens", str(args.max_tokens)] + ["--no-warm-up"] * (not args.warm_up)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    server = subprocess.Popen(cmd, env=env)
    base = f"http://127.0.0.1:{port}"
    levels, first = [], {}
    t_start = time.perf_counter()
    try:
        ready = asyncio.run(wait_ready(base, args, server))
        ready_s = time.perf_counter() - t_start
        print(f"server ready after {ready_s:.1f} s; warm-up: {ready.get('warm_up')}", flush=True)
        sweep = [int(c) for c in args.clients.split(",")]
        warmup = max(sweep) if args.warmup is None else args.warmup
        for task in tasks:
            first[task] = round(asyncio.run(first_requests(base, args, task)), 2)
            if warmup:  # batch shapes seen once before measuring (what the server's warm-up left out)
                asyncio.run(run_level(base, max(sweep), warmup, args, task))
            for clients in sweep:
                n = max(args.requests, args.requests_per_client * clients)
                levels.append(asyncio.run(run_level(base, clients, n, args, task)))
                r = levels[-1]
                print(f"{task} clients {clients}: {r['completed']} completed, {r['rejected']} rejected, "
                      f"{r['failed']} failed, {r['lost']} lost, {r['failed_batches']} failed batches in "
                      f"{r['wall_s']} s ({r['req_per_s']} req/s)", flush=True)
    finally:
        server.terminate()
        server.wait(30)

    device = "cpu"
    if args.full or (args.device or "cpu").startswith("cuda"):
        device = args.device or "cuda"
    cols = ["task", "clients", "requests", "completed", "rejected", "failed", "lost", "p50_s", "p95_s", "e2e_p50_s",
            "e2e_p95_s", "req_per_s", "tokens_per_s", "mean_batch", "rows_per_forward", "joined", "max_batch",
            "failed_batches"]
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in levels:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    for task in tasks:  # scaling: requests/s at each level over 1 client's
        one = next((r for r in levels if r["task"] == task and r["clients"] == 1), None)
        for r in levels:
            if one and r["task"] == task and one["req_per_s"]:
                r["x_one_client"] = round(r["req_per_s"] / one["req_per_s"], 2)
    print("scaling vs 1 client: " + ", ".join(f"{r['task']} {r['clients']}: {r.get('x_one_client')}x" for r in levels))
    print(json.dumps({"benchmark": "server_load", "model": "full-random" if args.full else "tiny",
                      "device": device, "task": args.task, "ready_s": round(ready_s, 1),
                      "warm_up": ready.get("warm_up"), "first_request_s": first, "size": args.size, "steps": args.steps,
                      "max_tokens": args.max_tokens, "max_batch": args.max_batch, "max_queue": args.max_queue,
                      "levels": levels}))
    if any(r["lost"] or not r["accounted"] or r["failed_batches"] for r in levels):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""The block-diffusion decoding loop (spec 5.1, 5.5, 5.6, 5.8): one function, variants are arguments.

The model enters as a callable, so this module never imports the model or the tokenizer. Every row of
every request sits in one canvas [R, L] and each denoising step is ONE batched model call; CFG rows of a
request share its canvas (committed tokens are written into all of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import FloatTensor, LongTensor

from .guidance import Guidance, combine
from .schedules import tokens_per_step
from .unmask import restrict_vocab, sample_tokens, select_transfer


class LogitsFn(Protocol):
    def __call__(
        self, ids: LongTensor, start: int, pad_lens: LongTensor, cache: Any, num_logits: int
    ) -> FloatTensor:
        """ids: the physical window x[:, start:end] of every row, [R, end - start]; pad_lens [R].

        The callable derives RoPE positions max(phys - pad_len, 0) and the block-causal mask over keys
        [0, end) with each row's pad keys invisible. With a cache it attends to the cached keys
        [0, start) and writes the window's KV at [start, end); with cache=None, start is 0.
        Returns fp32 logits [R, num_logits, V] of the LAST num_logits window positions.

        Optional method new_cache(rows, max_len) -> cache; without it the loop runs uncached.
        """


@dataclass
class DenoiseRequest:
    rows: list[list[int]]  # CFG rows left-aligned to one length (row 0 = conditional); canvas follows
    pad_lens: list[int]  # left pad of each row
    gen_length: int
    steps: int  # denoising steps per block
    threshold: float = 0.95
    guidance: Guidance = field(default_factory=Guidance)
    vocab: tuple[int, int] | None = None  # restrict to [lo, hi) after guidance/rescale (spec 5.4)
    stop_ids: frozenset[int] = frozenset()  # text: stop after a block that put one in the region
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None


@dataclass
class DenoiseOutput:
    tokens: list[list[int]]  # per request: gen_length ids, or cut after the first stop id (inclusive)
    forwards: int  # logits_fn calls
    first_block: int  # steps_per_block[j] counts the forwards of block first_block + j
    steps_per_block: list[int]
    stopped: list[bool]  # per request: finished early on a stop id


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check(req: DenoiseRequest) -> None:
    if not req.rows or len({len(r) for r in req.rows}) != 1:
        raise ValueError("a request needs one or more rows of equal length")
    if len(req.pad_lens) != len(req.rows):
        raise ValueError(f"{len(req.rows)} rows but {len(req.pad_lens)} pad lengths")
    if len(req.rows) != req.guidance.num_rows:
        raise ValueError(
            f"guidance {req.guidance.kind!r} needs {req.guidance.num_rows} rows, got {len(req.rows)}"
        )
    if req.gen_length < 1:
        raise ValueError("gen_length must be >= 1")


def generate(
    logits_fn: LogitsFn,
    requests: list[DenoiseRequest],
    *,
    mask_id: int,
    block_length: int = 32,
    use_cache: bool = True,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DenoiseOutput:
    """Fill each request's generation canvas by block diffusion; all requests share every forward."""
    B = block_length
    for req in requests:
        _check(req)
    # Request r owns the stacked rows [first[r], first[r] + len(rows)).
    first, n = [], 0
    for req in requests:
        first.append(n)
        n += len(req.rows)
    plen = [len(req.rows[0]) for req in requests]
    # The last block is denoised whole; positions past Lp + gen_length are dropped (spec 5.1).
    ends = [_ceil_to(lp + req.gen_length, B) for lp, req in zip(plen, requests)]
    L = max(ends)

    # Requests of different prompt lengths need no padding between them: a shorter one keeps inert
    # trailing masks it never commits, and block-causal attention stops them reaching earlier blocks.
    x = torch.full((n, L), mask_id, dtype=torch.long, device=device)  # [R, L]
    # todo[r, p]: position p of request r still to fill. Not "ids == mask": pads of a left-padded
    # CFG row are mask ids too, and must never be filled (spec 5.1).
    todo = torch.zeros(len(requests), L, dtype=torch.bool, device=device)  # [N, L]
    for r, req in enumerate(requests):
        prompt = torch.tensor(req.rows, dtype=torch.long, device=device)  # [rows, Lp]
        x[first[r] : first[r] + len(req.rows), : plen[r]] = prompt
        todo[r, plen[r] : ends[r]] = True
    pad_lens = torch.tensor([p for req in requests for p in req.pad_lens], dtype=torch.long, device=device)
    scheds = [tokens_per_step(B, req.steps) for req in requests]
    stop_sets = [torch.tensor(sorted(req.stop_ids), dtype=torch.long, device=device) for req in requests]

    cache = logits_fn.new_cache(n, L) if use_cache and hasattr(logits_fn, "new_cache") else None
    valid = 0  # cached KV of [0, valid) is final
    first_block = min(plen) // B
    num_blocks = L // B - first_block
    forwards, steps_per_block = 0, []
    stopped = [False] * len(requests)

    for b in range(first_block, L // B):
        lo, hi = b * B, (b + 1) * B
        step = 0
        touched = [False] * len(requests)
        while True:
            alive = todo[:, lo:hi].any(1).tolist()
            if not any(alive):
                break
            # Cached: the window starts at the first non-final block, so the first forward of block b
            # also writes the now-final KV of block b-1; no extra refresh forward is needed (spec 5.8).
            start = valid if cache is not None else 0
            logits = logits_fn(x[:, start:hi], start, pad_lens, cache, B)  # [R, B, V]
            forwards += 1
            if cache is not None:
                valid = lo
            for r, req in enumerate(requests):
                if not alive[r]:
                    continue
                touched[r] = True
                rows = slice(first[r], first[r] + len(req.rows))
                g = combine(req.guidance, logits[rows])  # [B, V] fp32
                if req.vocab is not None:
                    g = restrict_vocab(g, *req.vocab)
                pred, conf = sample_tokens(g, req.temperature, req.top_k, req.top_p, req.generator)
                # A request finishes its block in <= len(sched) steps: each step commits sched[step]
                # or all that is left, and the schedule sums to B.
                commit = select_transfer(conf, todo[r, lo:hi], scheds[r][step], req.threshold)  # [B]
                x[rows, lo:hi] = torch.where(commit, pred, x[rows, lo:hi])
                todo[r, lo:hi] &= ~commit
            step += 1
        steps_per_block.append(step)

        for r, req in enumerate(requests):
            if touched[r] and req.stop_ids:
                region = slice(plen[r], plen[r] + req.gen_length)
                hit = torch.isin(x[first[r], region], stop_sets[r]) & ~todo[r, region]
                if hit.any():
                    stopped[r] = True
                    todo[r] = False
        if progress is not None:
            progress(b - first_block + 1, num_blocks)
        if not todo.any():
            break

    tokens = []
    for r, req in enumerate(requests):
        out = x[first[r], plen[r] : plen[r] + req.gen_length].tolist()
        cut = next((i for i, t in enumerate(out) if t in req.stop_ids), None)
        tokens.append(out if cut is None else out[: cut + 1])
    return DenoiseOutput(tokens, forwards, first_block, steps_per_block, stopped)

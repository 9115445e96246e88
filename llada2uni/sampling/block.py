"""The block-diffusion decoding loop (spec 5.1, 5.5, 5.6, 5.8): one function, variants are arguments.

The model enters as a callable, so this module never imports the model or the tokenizer. Every row of
every request sits in one canvas [R, L] and each denoising step is ONE batched model call; CFG rows of a
request share its canvas (committed tokens are written into all of them). SPRINT (spec 6,
``sprint.py``) is one more argument: its own counts per step, and prefix reuse with pruning.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import FloatTensor, LongTensor

from .guidance import Guidance, combine
from .schedules import tokens_per_step
from .sprint import PruneStats, Sprint, adaptive_k, keep_counts, keep_mask, max_prob, pins, supports
from .unmask import (VocabMoments, greedy_pick, restrict_vocab, sample_tokens, select_transfer, sprint_sample,
                     sprint_scores)

log = logging.getLogger(__name__)


class LogitsFn(Protocol):
    def __call__(
        self, ids: LongTensor, start: int, pad_lens: LongTensor, cache: Any, num_logits: int
    ) -> FloatTensor:
        """ids: the physical window x[:, start:end] of every row, [R, end - start]; pad_lens [R].

        The callable derives RoPE positions max(phys - pad_len, 0) and the block-causal mask over keys
        [0, end) with each row's pad keys invisible. With a cache it attends to the cached keys
        [0, start) and writes the window's KV at [start, end); with cache=None, start is 0.
        Returns logits [R, num_logits, V] of the LAST num_logits window positions, fp32 or the model's
        dtype (the loop computes in fp32), valid until the next call (a fast path may reuse its buffer).
        Optional attribute greedy_pick: a fused ``unmask.greedy_pick`` for the greedy steps.
        Optional attribute vocab_slices = True: it takes vocab=(lo, hi) and returns (logits of those
        ids [R, num_logits, hi - lo], ``unmask.VocabMoments``); the loop asks for it when every
        request in the forward is greedy over that slice (image canvases).

        Optional method new_cache(rows, max_len) -> cache; without it the loop runs uncached.
        Optional attribute sprint_views = True: its cache is a ``sprint.PrunableCache`` and its
        forward honours the cache's view; SPRINT's prefix reuse and pruning need it.
        """


@dataclass
class DenoiseRequest:
    rows: list[list[int]]  # CFG rows left-aligned to one length (row 0 = conditional); canvas follows
    pad_lens: list[int]  # left pad of each row
    gen_length: int
    steps: int  # denoising steps per block (callers clamp it to gen_length // minimal_topk)
    threshold: float = 0.95
    guidance: Guidance = field(default_factory=Guidance)
    vocab: tuple[int, int] | None = None  # restrict to [lo, hi) after guidance/rescale (spec 5.4)
    stop_ids: frozenset[int] = frozenset()  # text: stop after a block that put one in the region
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None
    minimal_topk: int = 1  # SPRINT: the least positions a step commits


@dataclass
class DenoiseOutput:
    tokens: list[list[int]]  # per request: gen_length ids, or cut after the first stop id (inclusive)
    forwards: int  # logits_fn calls
    first_block: int  # steps_per_block[j] counts the forwards of block first_block + j
    steps_per_block: list[int]
    stopped: list[bool]  # per request: finished early on a stop id
    pruned: list[PruneStats] = field(default_factory=list)  # SPRINT: what each pruned block kept
    row_forwards: int = 0  # sum over forwards of the rows each one ran (finished requests leave)


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
    # nan compares false with everything: unchecked, it silently turns guidance or sampling off
    if not (math.isfinite(req.temperature) and req.temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {req.temperature!r}")
    if math.isnan(req.threshold):  # (above 1 is allowed: no position is ever accepted by threshold)
        raise ValueError("threshold must be a number, got nan")


def _pruned_view(cache: Any, sprint: Sprint, x: LongTensor, conf: torch.Tensor, lo: int, hi: int,
                 block: int, image_offset: int | None) -> PruneStats:
    """After warm-up: pick each layer's kept prefix keys [0, lo) and switch the cache to them.

    The official selection (``sprint.keep_mask``) on the post-RoPE keys the cache holds and the
    prefix confidences ``conf`` [R, L]; every row keeps ``keep_counts`` keys in every layer.
    """
    pin = pins(x[:, :lo], image_offset, sprint)  # [R, lo]
    counts = keep_counts(lo, pin.sum(-1), sprint.keep_ratio)  # [R]
    kept_per_row = counts.tolist()  # the one host sync of the selection
    kept = max(kept_per_row)
    n = x.shape[0]  # a fast path's cache may hold padding rows past the batch's own
    keep = keep_mask(cache.k[:, :n, :, :lo], conf[:, :lo], pin, counts, sprint.alpha)  # every layer: [layers, R, lo]
    # Stable sort of "not kept" brings the kept indices first, in ascending order.
    idx = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :kept]  # [layers, R, K]
    valid = torch.arange(kept, device=x.device)[None, :] < counts[:, None]  # [R, K]
    cache.set_view(lo, hi, idx, valid)
    return PruneStats(block, kept_per_row, [lo] * x.shape[0])


def admission_shift(req: DenoiseRequest, block: int, block_length: int) -> int:
    """Left pads (whole blocks) that make a request joining at ``block`` start its canvas there or later."""
    return max(0, block - len(req.rows[0]) // block_length) * block_length


def admission_end(req: DenoiseRequest, block: int, block_length: int) -> int:
    """Canvas end of a request joining at ``block``: it may join only if this fits the running canvas."""
    lp = admission_shift(req, block, block_length) + len(req.rows[0])
    return _ceil_to(lp + req.gen_length, block_length)


def steps_to_fill(sched: list[int], masks: int) -> int:
    """The most steps a block with ``masks`` positions to fill takes under the schedule ``sched``
    (each step commits at least its count, or all that is left)."""
    n = done = 0
    while done < masks and n < len(sched):
        done += sched[n]
        n += 1
    return n


def masks_in_block(req: DenoiseRequest, block: int, block_length: int) -> int:
    """Positions a request joining at ``block`` has to fill in that block (0: its first masked block
    comes later)."""
    lo, hi = block * block_length, (block + 1) * block_length
    lp = admission_shift(req, block, block_length) + len(req.rows[0])
    return max(0, min(hi, admission_end(req, block, block_length)) - max(lo, lp))


def _output(row: torch.Tensor, plen: int, req: DenoiseRequest) -> list[int]:
    """A request's result: its generated region, cut after the first stop id (inclusive)."""
    out = row[plen: plen + req.gen_length].tolist()
    cut = next((i for i, t in enumerate(out) if t in req.stop_ids), None)
    return out if cut is None else out[: cut + 1]


def _committed(row: torch.Tensor, plen: int, req: DenoiseRequest, upto: int) -> list[int]:
    """Generated ids of a request up to physical position ``upto`` (all final), cut after a stop id."""
    out = row[plen: max(plen, min(upto, plen + req.gen_length))].tolist()
    cut = next((i for i, t in enumerate(out) if t in req.stop_ids), None)
    return out if cut is None else out[: cut + 1]


def _batched(req: DenoiseRequest, sprint: Sprint | None) -> bool:
    """Whether the request's step is the batched greedy one (``_greedy_step``, or SPRINT's
    confidence-ranked ``_sprint_greedy_step``) rather than the per-request sampling step."""
    return req.temperature <= 0 and (sprint is None or sprint.remasking == "low_confidence")


def _runs(live: list[int], alive: list[bool], requests: list[DenoiseRequest], scheds: list[list[int]],
          steps: list[int], sprint: Sprint | None) -> list[list[int]]:
    """The alive requests in forward order, grouped into runs of neighbours (adjacent logits rows) that
    take the same greedy step: same guidance, vocabulary, threshold, row count and commit count (with
    SPRINT: steps and minimal_topk, its k being adaptive per request). ``steps[r]``: the step of its
    block request r is at (one that joined mid-block counts from its join). A request that samples
    (temperature > 0: its own generator), or SPRINT ranking other than by confidence, runs alone."""
    runs, key_of_last = [], None
    for r in live:
        if not alive[r]:
            key_of_last = None  # its rows sit between: no run across it
            continue
        req = requests[r]
        key = None
        if _batched(req, sprint):
            key = (req.guidance, req.vocab, req.threshold, len(req.rows),
                   scheds[r][steps[r]] if sprint is None else (req.steps, req.minimal_topk))
        if key is not None and key == key_of_last:
            runs[-1].append(r)
        else:
            runs.append([r])
        key_of_last = key
    return runs


class _Indices:
    """Device index tensors of the loop, made once per distinct list: ``torch.tensor(list, device=cuda)``
    is a host-to-device copy, which PyTorch follows with a stream sync; made every step, it would stall
    the host behind the GPU twice a step. A run's requests (and so its rows) repeat step after step."""

    def __init__(self, device) -> None:
        self.device, self._made = device, {}

    def __call__(self, values: list[int]) -> torch.Tensor:
        key = tuple(values)
        if key not in self._made:
            self._made[key] = torch.tensor(values, dtype=torch.long, device=self.device)
        return self._made[key]


def _greedy_step(run: list[int], requests: list[DenoiseRequest], logits: torch.Tensor, offset: dict,
                 first: list[int], todo: torch.Tensor, x: torch.Tensor, lo: int, hi: int, k: int,
                 pick=greedy_pick, moments: VocabMoments | None = None, commit_fn=None,
                 index: Callable[[list[int]], torch.Tensor] | None = None) -> None:
    """One denoising step of greedy requests of one kind at once: the per-request step (guidance,
    vocabulary, argmax and confidence, the k most confident) over a [G, ...] batch of them; the same
    ops row by row, so the same tokens. ``pick``: ``greedy_pick`` or a fused equivalent;
    ``commit_fn(conf, active)``: another rule for which positions to commit (SPRINT's); ``index``:
    the loop's ``_Indices``."""
    index = index or _Indices(x.device)
    req = requests[run[0]]
    nrows = len(req.rows)
    g_rows = logits[offset[run[0]]:offset[run[0]] + nrows * len(run)]  # adjacent: a view
    rows = g_rows.view(len(run), nrows, *g_rows.shape[1:]).transpose(0, 1)
    if moments is None:
        pred, conf = pick(req.guidance, rows, req.vocab)
    else:  # logits of the vocabulary slice only, with the full vocabulary's moments
        pred, conf = pick(req.guidance, rows, req.vocab, moments.select(offset[run[0]], nrows, len(run)))
    idx = index(run)
    active = todo[idx, lo:hi]
    commit = commit_fn(conf, active) if commit_fn else select_transfer(conf, active, k, req.threshold)  # [G, B]
    todo[idx, lo:hi] &= ~commit
    rows = index([first[r] + j for r in run for j in range(nrows)])
    commit, pred = (t.repeat_interleave(nrows, dim=0) for t in (commit, pred))  # every CFG row of a request
    x[rows, lo:hi] = torch.where(commit, pred, x[rows, lo:hi])


def _sprint_greedy_step(run: list[int], requests: list[DenoiseRequest], logits: torch.Tensor, offset: dict,
                        first: list[int], todo: torch.Tensor, x: torch.Tensor, lo: int, hi: int, step: int,
                        pick=greedy_pick, moments: VocabMoments | None = None,
                        index: Callable[[list[int]], torch.Tensor] | None = None) -> None:
    """SPRINT's adaptive step for greedy requests ranked by confidence, batched like ``_greedy_step``:
    at temperature 0 its token is the argmax, and its ranking score and its threshold test are both
    that token's probability, i.e. ``greedy_pick``'s (pred, conf); k is each request's own
    ``adaptive_k``. The same tokens as the per-request SPRINT step."""
    req = requests[run[0]]

    def commit(conf, active):  # [G, B] each
        k = adaptive_k(active.sum(-1), req.steps, step, req.minimal_topk)[:, None]
        return select_transfer(conf.masked_fill(~active, float("-inf")), active, k, req.threshold, accept=conf)
    _greedy_step(run, requests, logits, offset, first, todo, x, lo, hi, 0, pick, moments, commit, index)


def generate(
    logits_fn: LogitsFn,
    requests: list[DenoiseRequest],
    *,
    mask_id: int,
    block_length: int = 32,
    use_cache: bool = True,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    sprint: Sprint | None = None,
    image_offset: int | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
    on_finish: Callable[[int, list[int]], None] | None = None,
    admit: Callable[[int, int, Any], list[DenoiseRequest]] | None = None,
) -> DenoiseOutput:
    """Fill each request's generation canvas by block diffusion; all requests share every forward.

    ``sprint`` (when ``sprint.use``) turns on SPRINT for every request, as the official code runs it
    (``sprint.py``): the adaptive per-step count, and, when the cache supports it, the block's
    queries against each layer's kept prefix keys after ``cache_warmup_steps`` steps.
    ``image_offset`` tells image keys (ids >= it) from text keys for pinning (None: all text).
    Editing guidance falls back to the baseline loop, as in the official code.

    ``admit(block, limit, fits)``: requests that join the running batch (continuous batching; not
    with SPRINT). At each block boundary ``fits`` is None: any request whose canvas ends within
    ``limit`` may join. Between two steps of a block ``fits(req)`` says whether a request may join
    now: its own part of the block (a prompt tail leaves the first block partial) fills by the
    block's last scheduled step, so joining never makes a block longer. Either way a newcomer
    decodes as it would alone.
    """
    B = block_length
    requests = list(requests)  # admitted requests are appended (their results follow, in that order)
    for req in requests:
        _check(req)
    if sprint is not None and not sprint.use:
        sprint = None
    if sprint is not None and not all(supports(req.guidance.kind) for req in requests):
        log.warning("SPRINT does not support editing guidance (cfg_text_scale / cfg_image_scale); "
                    "running the baseline loop")
        sprint = None
    # Per request: rows [first[r], first[r] + len(rows)) of the stacked canvas and the prompt end.
    # The last block is denoised whole; positions past Lp + gen_length are dropped (spec 5.1).
    first, plen, scheds, stop_sets = [], [], [], []
    L = max(admission_end(req, 0, B) for req in requests)

    def place(reqs: list[DenoiseRequest], block: int, n: int):
        """Lay out ``reqs`` joining at ``block`` below ``n`` existing rows: their rows [k, L] (left pads
        in whole blocks, prompt, then masks), pad lengths [k] and positions to fill [len(reqs), L]."""
        k = sum(len(req.rows) for req in reqs)
        rows = torch.full((k, L), mask_id, dtype=torch.long, device=device)
        # todo[r, p]: position p of request r still to fill. Not "ids == mask": pads of a left-padded
        # CFG row are mask ids too, and must never be filled (spec 5.1).
        todo = torch.zeros(len(reqs), L, dtype=torch.bool, device=device)
        pads, at = [], 0
        for j, req in enumerate(reqs):
            shift = admission_shift(req, block, B)
            lp, end = shift + len(req.rows[0]), admission_end(req, block, B)
            rows[at : at + len(req.rows), shift:lp] = torch.tensor(req.rows, dtype=torch.long, device=device)
            todo[j, lp:end] = True
            pads += [p + shift for p in req.pad_lens]
            first.append(n + at)
            plen.append(lp)
            scheds.append(tokens_per_step(B, req.steps))
            stop_sets.append(torch.tensor(sorted(req.stop_ids), dtype=torch.long, device=device))
            at += len(req.rows)
        return rows, torch.tensor(pads, dtype=torch.long, device=device), todo

    # Requests of different prompt lengths need no padding between them: a shorter one keeps inert
    # trailing masks it never commits, and block-causal attention stops them reaching earlier blocks.
    x, pad_lens, todo = place(requests, 0, 0)  # [R, L], [R], [N, L]
    n = x.shape[0]

    cache = logits_fn.new_cache(n, L) if use_cache and hasattr(logits_fn, "new_cache") else None
    valid = 0  # cached KV of [0, valid) is final
    first_block = min(plen) // B
    forwards, steps_per_block = 0, []
    stopped = [False] * len(requests)
    reported = [False] * len(requests)  # on_finish already called

    pruned: list[PruneStats] = []
    # SPRINT's reuse and pruning act on the cache; without a prunable one only the unmasking changes.
    reuse = sprint is not None and cache is not None and getattr(logits_fn, "sprint_views", False)
    if sprint is not None and not reuse:
        log.info("SPRINT: this logits_fn has no prunable KV cache; adaptive unmasking only")
    # Max softmax probability of the raw logits at every final position, per stacked row: the
    # confidence half of SPRINT's key importance (the official takes it from the warm-up forward's
    # logits; a final position's logits are the same in every forward, block attention being causal).
    conf_prefix = torch.zeros(n, L, device=device) if reuse else None

    # A logits_fn may bring a fused greedy choice (the fast path's); the reference otherwise.
    pick = getattr(logits_fn, "greedy_pick", None) or greedy_pick
    index = _Indices(device)
    can_admit = admit is not None and sprint is None and (cache is None or hasattr(logits_fn, "extend_cache"))
    # Finished requests leave the forward at block boundaries (their rows and cache rows dropped), so
    # a batch that newcomers keep joining runs only the requests still denoising. SPRINT keeps its
    # rows (its per-row prefix confidences are laid out over all of them).
    can_retire = sprint is None and (cache is None or hasattr(logits_fn, "retire_rows"))
    live = list(range(len(requests)))  # requests in forward (and cache) row order
    row_forwards = 0
    b = first_block

    def join(new: list[DenoiseRequest], mid_block: bool) -> None:
        """Requests join at block b: whole blocks of left pads put each newcomer's first masked block
        at b or later; whole-block padding keeps every token's block and RoPE position, so it decodes
        exactly as it would alone. Its rows' KV of the finished prefix [0, valid) comes from one
        prefill forward of the newcomers alone (from their first non-pad block). Mid-block
        (``mid_block``), each newcomer counts its block's steps from now."""
        nonlocal x, todo, pad_lens, L, n, cache, forwards, row_forwards
        for req in new:
            _check(req)
            if admission_end(req, b, B) > limit:
                raise ValueError(f"an admitted request ends at {admission_end(req, b, B)}, past the "
                                 f"canvas limit ({limit})")
        grown = max(L, *(admission_end(req, b, B) for req in new))
        if grown > L:  # the running rows get inert trailing masks they never commit
            x = torch.nn.functional.pad(x, (0, grown - L), value=mask_id)
            todo = torch.nn.functional.pad(todo, (0, grown - L), value=False)
            L = grown
        x_new, pads_new, todo_new = place(new, b, n)
        for r in range(len(requests), len(requests) + len(new)):
            live.append(r)
            if mid_block:
                joined_at[r] = step
        requests.extend(new)
        stopped.extend([False] * len(new))
        reported.extend([False] * len(new))
        touched.extend([False] * len(new))
        if cache is not None:
            # new_rows: an unshared cache (a logits_fn may pool what new_cache returns)
            extra = getattr(logits_fn, "new_rows", logits_fn.new_cache)(x_new.shape[0], L)
            # The prefill skips the whole blocks of left pads before the first newcomer's prompt:
            # their keys are invisible to every query (the pad mask), so nothing needs their KV.
            skip = min(admission_shift(req, b, B) for req in new)
            if valid > skip:
                logits_fn(x_new[:, skip:valid], skip, pads_new, extra, B)
                forwards += 1
                row_forwards += x_new.shape[0]
            cache = logits_fn.extend_cache(cache, extra)
        x = torch.cat([x, x_new])
        todo = torch.cat([todo, todo_new])
        pad_lens = torch.cat([pad_lens, pads_new])
        n += x_new.shape[0]

    def layout():
        """The forward's rows: each live request's rows, in cache order (offset[r] its first one), and
        whether every request in it is greedy over one vocabulary slice (image canvases): a logits_fn
        that can may then compute only those logits, with the full vocabulary's moments for
        cfg_rescale. With SPRINT, not the forward that returns the newly final positions' logits too:
        their confidence is a softmax over the whole vocabulary."""
        offset, row_idx = {}, []
        for r in live:
            offset[r] = len(row_idx)
            row_idx += range(first[r], first[r] + len(requests[r].rows))
        every_row = len(row_idx) == n
        slice_vocab = None
        if cache is not None and getattr(logits_fn, "vocab_slices", False):
            vocabs = {requests[r].vocab for r in live}
            if len(vocabs) == 1 and None not in vocabs and all(_batched(requests[r], sprint) for r in live):
                slice_vocab = vocabs.pop()
        return offset, every_row, (None if every_row else index(row_idx)), slice_vocab

    while b < L // B:
        lo, hi = b * B, (b + 1) * B
        # Newcomers may grow the canvas up to what the cache already holds (no reallocation); a
        # logits_fn without ``canvas_limit`` keeps the batch's canvas.
        limit = logits_fn.canvas_limit(cache, L) if cache is not None and hasattr(logits_fn, "canvas_limit") else L
        step = 0
        touched = [False] * len(requests)
        # A request may join in the middle of the block when its own part of it (a prompt's tail
        # leaves the first block partial) fills by the block's last scheduled step (``bound``), so
        # it never makes the block longer; it runs its own steps from joined_at[r] on.
        joined_at: dict[int, int] = {}
        new = admit(b, limit, None) if can_admit else []
        if new:
            join(new, mid_block=False)
        offset, every_row, row_index, slice_vocab = layout()
        pruned_view = False  # SPRINT: the block's queries see the kept prefix keys only
        bound = 0  # the block's last scheduled step + 1, over the requests in it
        while True:
            if step == 0:
                left = todo[:, lo:hi].sum(1).tolist()  # positions to fill per request (one host sync)
                alive = [c > 0 for c in left]
                bound = max((steps_to_fill(scheds[r], left[r]) for r in live if alive[r]), default=0)
            else:
                if can_admit and not pruned_view and step < bound:
                    def fits(req: DenoiseRequest) -> bool:
                        m = masks_in_block(req, b, B)
                        return m > 0 and step + steps_to_fill(tokens_per_step(B, req.steps), m) <= bound
                    new = admit(b, limit, fits)
                    if new:
                        join(new, mid_block=True)
                        offset, every_row, row_index, slice_vocab = layout()
                alive = todo[:, lo:hi].any(1).tolist()
            if not any(alive):
                break
            own = [step - joined_at.get(r, 0) for r in range(len(requests))]  # each request's step
            if pruned_view:
                start, num_logits = lo, B
            else:
                # Cached: the window starts at the first non-final block, so the first forward of block b
                # also writes the now-final KV of block b-1; no extra refresh forward is needed (spec 5.8).
                start = valid if cache is not None else 0
                # SPRINT wants the confidence of the positions this forward makes final.
                num_logits = hi - start if conf_prefix is not None and start < lo else B
            if every_row:
                ids_in, pads_in = x[:, start:hi], pad_lens
            else:
                ids_in, pads_in = x[row_index, start:hi], pad_lens[row_index]
            moments = None
            if slice_vocab is None or num_logits != B:
                logits = logits_fn(ids_in, start, pads_in, cache, num_logits)  # [R, num_logits, V]
            else:  # [R, num_logits, hi - lo] and VocabMoments
                logits, moments = logits_fn(ids_in, start, pads_in, cache, num_logits, vocab=slice_vocab)
            forwards += 1
            row_forwards += ids_in.shape[0]
            if num_logits > B:
                conf_prefix[:, start:lo] = max_prob(logits[:, : lo - start])
                # contiguous, as every other step's, and an inference tensor if they are: a compiled
                # pick guards on strides and on the autograd key, and would compile again
                with torch.inference_mode(logits.is_inference()):
                    logits = logits[:, lo - start:].contiguous()
            if cache is not None:
                valid = lo
            for run in _runs(live, alive, requests, scheds, own, sprint):
                if _batched(requests[run[0]], sprint):  # greedy requests of one kind: one batched step
                    if sprint is None:
                        _greedy_step(run, requests, logits, offset, first, todo, x, lo, hi,
                                     scheds[run[0]][own[run[0]]], pick, moments, None, index)
                    else:  # SPRINT's greedy step ranked by confidence
                        _sprint_greedy_step(run, requests, logits, offset, first, todo, x, lo, hi, step, pick,
                                            moments, index)
                    for r in run:
                        touched[r] = True
                    continue
                r = run[0]
                req = requests[r]
                touched[r] = True
                rows = slice(first[r], first[r] + len(req.rows))
                g = combine(req.guidance, logits[offset[r]:offset[r] + len(req.rows)])  # [B, V] fp32
                if req.vocab is not None:
                    g = restrict_vocab(g, *req.vocab)
                active = todo[r, lo:hi]
                if sprint is None:
                    pred, conf = sample_tokens(g, req.temperature, req.top_k, req.top_p, req.generator)
                    # A request finishes its block in <= len(sched) steps: each step commits sched[step]
                    # or all that is left, and the schedule sums to B.
                    commit = select_transfer(conf, active, scheds[r][own[r]], req.threshold)  # [B]
                else:
                    # The official adaptive step: k by the ranking, plus every position whose top-1
                    # probability passes the threshold; at the last step k is all that is left.
                    pred = sprint_sample(g, req.temperature, req.top_k, req.top_p, req.generator)
                    score, top1 = sprint_scores(g, pred, sprint.remasking, active, req.generator)
                    k = adaptive_k(active.sum(), req.steps, step, req.minimal_topk)
                    commit = select_transfer(score, active, k, req.threshold, accept=top1)
                x[rows, lo:hi] = torch.where(commit, pred, x[rows, lo:hi])
                todo[r, lo:hi] &= ~commit
            if reuse and step == sprint.cache_warmup_steps - 1 and lo > 0:
                # The last warm-up step (a full-prefix forward) picks the kept keys for the rest.
                pruned.append(_pruned_view(cache, sprint, x, conf_prefix, lo, hi, b, image_offset))
                pruned_view = True
            step += 1
        steps_per_block.append(step)
        if pruned_view:
            cache.clear_view()

        for r, req in enumerate(requests):
            if touched[r] and req.stop_ids:
                region = slice(plen[r], plen[r] + req.gen_length)
                hit = torch.isin(x[first[r], region], stop_sets[r]) & ~todo[r, region]
                if hit.any():
                    stopped[r] = True
                    todo[r] = False
        pending = todo.any(1).tolist()  # per request: positions left (one host sync, not one per request)
        if on_finish is not None:  # a request whose canvas is complete leaves at this block boundary
            for r, req in enumerate(requests):
                if not reported[r] and not pending[r]:
                    reported[r] = True
                    on_finish(r, _output(x[first[r]], plen[r], req))
        if on_tokens is not None:  # streaming: what each request has committed so far, in order
            for r, req in enumerate(requests):
                if touched[r]:
                    on_tokens(r, _committed(x[first[r]], plen[r], req, hi))
        if progress is not None:
            progress(b - first_block + 1, L // B - first_block)
        if not any(pending):
            break
        if can_retire:
            done = [r for r in live if not pending[r]]
            if done:
                keep = [i for r in live if r not in done
                        for i in range(offset[r], offset[r] + len(requests[r].rows))]
                live = [r for r in live if r not in done]
                if cache is not None:
                    cache = logits_fn.retire_rows(cache, keep)
        b += 1

    tokens = [_output(x[first[r]], plen[r], req) for r, req in enumerate(requests)]
    return DenoiseOutput(tokens, forwards, first_block, steps_per_block, stopped, pruned, row_forwards)

"""The scheduler: one worker thread owns the model; each request runs in its own job thread.

A job thread runs a task (prompt building, the pipeline's task methods, PNG encoding) and hands every
piece of model work to the worker: denoising requests (``Job.denoise``) and single calls such as the
image encoder or decoder (``Job.call``). The worker takes the oldest item; when it is denoising work
it also takes every other waiting denoising item (same block length and SPRINT setting, up to
``max_batch`` requests) and runs them all in ONE sampler call (the pipeline's ``_run``, i.e.
``sampling.block.generate``), whose requests share every forward. So requests join at the start of a
batch and leave when it ends; a multi-phase task (thinking, then the image) re-joins at the next batch
for each phase. The sampler has no per-block admission yet, so nobody joins mid-batch.

Admission is bounded: at most ``max_queue`` jobs are in the system (waiting, in a batch or being
decoded); the next one gets ``QueueFull`` (HTTP 429 with Retry-After). A job is cancelled by its client
going away or by its deadline: its waiting work is withdrawn at once and its slot freed; a batch it is
in runs on for the others and drops its rows' result, and is aborted at the next block boundary
when every job in it is cancelled. An exception in the worker fails the jobs of that work item only:
a failed batch of several jobs is re-run one job at a time so that only the faulty one fails.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable

from ..sampling.block import DenoiseRequest, admission_end, admission_shift

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often a waiting job thread looks at its cancel flag and deadline


class QueueFull(Exception):
    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(f"the server is at its limit of {limit} requests in flight; retry after "
                         f"{retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """The client went away (or the server is stopping): the job's result is not wanted."""


class ShuttingDown(Cancelled):
    """The server is stopping."""


class JobTimeout(Exception):
    """The job ran past its deadline."""


class _BatchAborted(Exception):
    """Raised from the sampler's progress callback when nobody wants the batch any more."""


@dataclass
class SchedulerConfig:
    max_batch: int = 32  # denoising requests sharing one forward (a CFG request counts once)
    max_queue: int = 64  # jobs admitted at once: waiting, in a batch or being decoded
    request_timeout: float = 600.0  # seconds from admission to result
    # How long a new batch may wait for denoising work of admitted jobs that have not sent it yet
    # (their threads still building prompts), as servers wait a moment to fill a batch. It waits only
    # while such jobs exist, so a lone request never waits; a request that misses the batch start
    # still joins at a block boundary, but pays a prefill forward and runs a block behind.
    batch_linger_s: float = 0.02

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        if not 0.0 <= self.batch_linger_s <= 10.0:
            raise ValueError(f"batch_linger_s must be in [0, 10] seconds, got {self.batch_linger_s}")
        if not self.request_timeout > 0:
            raise ValueError("request_timeout must be > 0")


class Job:
    """One admitted request, seen from its job thread (``denoise``, ``call``, ``emit``)."""

    _ids = itertools.count(1)

    def __init__(self, scheduler: "Scheduler", timeout: float,
                 on_event: Callable[[dict], None] | None) -> None:
        self.id = next(Job._ids)
        self.scheduler = scheduler
        self.admitted = time.monotonic()
        self.deadline = self.admitted + timeout
        self.future: Future = Future()
        self.outputs: list[tuple[list[DenoiseRequest], list[list[int]]]] = []  # each denoise phase
        self._on_event = on_event
        self._cancelled = threading.Event()
        self._reason: str | None = None
        self.started = False  # some work of this job was taken by the worker (a drain lets it finish)

    # ---- cancellation ----

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._cancelled.is_set():
            self._reason = reason
            self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        if not self._cancelled.is_set() and time.monotonic() > self.deadline:
            self.cancel("timeout")
        return self._cancelled.is_set()

    def error(self) -> Exception:
        if self._reason == "timeout":
            return JobTimeout(f"the request took longer than the server's limit of "
                              f"{self.deadline - self.admitted:g} s")
        if self._reason == "shutdown":
            return ShuttingDown("the server is shutting down")
        return Cancelled(self._reason or "cancelled")

    def check(self) -> None:
        if self.cancelled:
            raise self.error()

    # ---- work for the worker ----

    def denoise(self, requests: list[DenoiseRequest], block_length: int, sprint: Any = None) -> list[list[int]]:
        """Run denoising requests in the next batch; returns the sampler's tokens of each.

        Requests batch with others of the same block length and SPRINT setting (sampler-wide options).
        """
        tokens = self.scheduler._submit_work(self, "denoise", (list(requests), (block_length, sprint)))
        self.outputs.append((list(requests), tokens))
        return tokens

    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run ``fn(*args, **kwargs)`` on the worker thread (model work that is not denoising)."""
        return self.scheduler._submit_work(self, "call", (fn, args, kwargs))

    def emit(self, event: dict) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:  # a listener that went away must not fail the job
            log.debug("job %d: dropping event %r", self.id, event, exc_info=True)


@dataclass
class _Work:
    job: Job
    kind: str  # "denoise" | "call"
    payload: Any
    future: Future

    @property
    def size(self) -> int:
        return len(self.payload[0]) if self.kind == "denoise" else 0


class Scheduler:
    """Bounded admission, one model-owning worker thread, batched denoising. See the module doc."""

    def __init__(self, pipe, config: SchedulerConfig | None = None) -> None:
        self.pipe = pipe
        self.config = config or SchedulerConfig()
        self._cond = threading.Condition()
        self._queue: deque[_Work] = deque()
        self._admitted = 0
        self._live: set[Job] = set()
        self._paused = False
        self._stopping = False
        self._draining = False
        self._running = 0  # jobs in the work item the worker is running
        self._jobs = ThreadPoolExecutor(max_workers=self.config.max_queue, thread_name_prefix="llada2uni-job")
        self._worker = threading.Thread(target=self._loop, name="llada2uni-worker", daemon=True)
        self._latency = 1.0  # moving average of job latency (s), for Retry-After
        self.batch_sizes: Counter[int] = Counter()  # requests per batch -> batches run
        self._denoise = self._pipeline_denoise  # one batch (tests wrap it to inject faults)
        self.counters = dict(admitted=0, completed=0, failed=0, cancelled=0, timed_out=0, rejected=0,
                             batches=0, batched_requests=0, max_batch_seen=0, aborted_batches=0,
                             isolated_retries=0, forwards=0, calls=0, joined=0,
                             row_forwards=0)

    # ---- lifecycle ----

    def start(self) -> "Scheduler":
        self._worker.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job (each answers at once with ``Cancelled``) and end the worker."""
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            live = list(self._live)
            self._cond.notify_all()
        for job in live:
            job.cancel("shutdown")
        for item in pending:
            item.future.set_exception(ShuttingDown("the server is shutting down"))
        if self._worker.is_alive():
            self._worker.join(timeout)
        self._jobs.shutdown(wait=False)  # queued job threads start, see the cancel and end

    def drain(self) -> int:
        """Begin a shutdown: new jobs are refused (``ShuttingDown``) and admitted jobs none of whose
        work has started answer ``ShuttingDown`` now; started ones run on until ``stop``. Returns
        the number of jobs ended."""
        with self._cond:
            self._draining = True
            waiting = [job for job in self._live if not job.started]
            self._cond.notify_all()
        for job in waiting:
            job.cancel("shutdown")
        return len(waiting)

    def pause(self) -> None:
        """Stop taking new work (the running item finishes). For tests and maintenance."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    # ---- admission ----

    def submit(self, task: Callable[[Job], Any], *, on_event: Callable[[dict], None] | None = None,
               timeout: float | None = None) -> Job:
        """Admit a job running ``task(job)`` in a job thread; its result lands in ``job.future``."""
        with self._cond:
            if self._stopping or self._draining:
                raise ShuttingDown("the server is shutting down")
            if self._admitted >= self.config.max_queue:
                self.counters["rejected"] += 1
                raise QueueFull(self.config.max_queue, self.retry_after())
            job = Job(self, timeout or self.config.request_timeout, on_event)
            self._live.add(job)
            self._admitted += 1
            self.counters["admitted"] += 1
        self._jobs.submit(self._run_job, job, task)
        return job

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: about one job latency."""
        return max(1, math.ceil(self._latency))

    def _run_job(self, job: Job, task: Callable[[Job], Any]) -> None:
        outcome = "failed"
        try:
            job.check()
            result = task(job)
            job.check()  # a result finished after the deadline or the disconnect is not delivered
            outcome = "completed"
            job.future.set_result(result)
        except Cancelled as e:
            outcome = "cancelled"
            job.future.set_exception(e)
        except JobTimeout as e:
            outcome = "timed_out"
            job.future.set_exception(e)
        except BaseException as e:  # noqa: BLE001 - a job's fault is that job's result
            job.future.set_exception(e)
        finally:
            elapsed = time.monotonic() - job.admitted
            with self._cond:
                self._live.discard(job)
                self._admitted -= 1
                self.counters[outcome] += 1
                if outcome == "completed":
                    self._latency = 0.8 * self._latency + 0.2 * elapsed
                self._cond.notify_all()

    # ---- job thread side ----

    def _submit_work(self, job: Job, kind: str, payload: Any) -> Any:
        job.check()
        item = _Work(job, kind, payload, Future())
        with self._cond:
            if self._stopping or (self._draining and not job.started):
                raise ShuttingDown("the server is shutting down")
            self._queue.append(item)
            self._cond.notify_all()
        while True:
            try:
                return item.future.result(timeout=_POLL_S)
            except FutureTimeout:
                pass
            if job.cancelled:
                with self._cond:
                    if item in self._queue:  # not started: withdraw it; the worker never sees it
                        self._queue.remove(item)
                raise job.error()

    # ---- worker side ----

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (self._paused or not self._queue):
                    self._cond.wait()
                if self._stopping:
                    return
                first = self._queue.popleft()
                batch = self._take_batch(first) if first.kind == "denoise" else [first]
                self._running = len(batch)
                for item in batch:
                    item.job.started = True
            try:
                if first.kind == "denoise":
                    self._run_batch(batch)
                else:
                    self._run_call(first)
            except BaseException:  # never let the worker die; _run_* already failed their items
                log.exception("scheduler worker: unexpected error")
            finally:
                with self._cond:
                    self._running = 0

    def _take_batch(self, first: _Work) -> list[_Work]:
        """``first`` plus every waiting denoising item it can share forwards with, up to max_batch requests,
        and those that arrive while it lingers (``_linger``)."""
        batch = self._fill([first])
        self._linger(batch)
        return batch

    def _fill(self, batch: list[_Work]) -> list[_Work]:
        """``batch`` plus the waiting denoising items that can share its forwards (lock held)."""
        size = sum(item.size for item in batch)
        options = batch[0].payload[1]  # (block_length, sprint)
        for item in list(self._queue):
            if item.kind != "denoise" or item.payload[1] != options:
                continue
            if size + item.size > self.config.max_batch:
                break
            self._queue.remove(item)
            batch.append(item)
            size += item.size
        return batch

    def _linger(self, batch: list[_Work]) -> None:
        """With the lock held: up to ``batch_linger_s``, take more work into ``batch`` while it has room
        and some admitted job has no work queued or in it (its denoising work may be moments away)."""
        deadline = time.monotonic() + self.config.batch_linger_s
        while not self._stopping:
            if sum(item.size for item in batch) >= self.config.max_batch:
                return
            busy = {item.job for item in self._queue} | {item.job for item in batch}
            if all(job in busy for job in self._live):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)
            self._fill(batch)

    def _run_call(self, item: _Work) -> None:
        if item.job.cancelled:
            item.future.set_exception(item.job.error())
            return
        fn, args, kwargs = item.payload
        self.counters["calls"] += 1
        try:
            item.future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001
            item.future.set_exception(e)

    def _pipeline_denoise(self, requests: list[DenoiseRequest], block_length: int, sprint: Any,
                          on_block: Callable[[int, int], None]) -> list[list[int]]:
        """One batch through the pipeline's own ``_run`` (the sampler call with its fast paths)."""
        return self.pipe._run(requests, block_length, "batch", sprint, on_block=on_block,
                              on_tokens=getattr(on_block, "tokens", None),
                              on_finish=getattr(on_block, "finished", None),
                              admit=getattr(on_block, "admit", None))

    def _run_batch(self, items: list[_Work]) -> None:
        live = []
        for item in items:
            if item.future.done():  # delivered early by an earlier attempt of this batch
                continue
            if item.job.cancelled:
                item.future.set_exception(item.job.error())
            else:
                live.append(item)
        if not live:
            return
        requests = [r for item in live for r in item.payload[0]]
        block_length, sprint = live[0].payload[1]
        progress = _BlockProgress(live, block_length)

        def admit(block: int, length: int, fits: Callable[[DenoiseRequest], bool] | None = None
                  ) -> list[DenoiseRequest]:
            """Waiting denoising jobs join the running batch at this block's boundary, or between its
            steps where ``fits`` accepts every request of the job (the sampler's rule), when they fit:
            in ``max_batch`` beside the jobs still denoising (delivered ones have left the forward),
            and within ``length``, as far as the running canvas may grow."""
            taken = []
            with self._cond:
                size = sum(item.size for item in live if not item.future.done())
                for item in list(self._queue):
                    if item.kind != "denoise" or item.payload[1] != (block_length, sprint) or item.job.cancelled:
                        continue
                    if size + item.size > self.config.max_batch:
                        break
                    if any(admission_end(r, block, block_length) > length for r in item.payload[0]):
                        continue  # its canvas would run past this batch's: next batch
                    if fits is not None and not all(fits(r) for r in item.payload[0]):
                        continue  # not in the middle of this block: at the next boundary
                    self._queue.remove(item)
                    taken.append(item)
                    size += item.size
                self._running += len(taken)
            for item in taken:
                item.job.started = True
                live.append(item)
                requests.extend(item.payload[0])
                progress.add(item, block)
            self.counters["joined"] += len(taken)
            return [r for item in taken for r in item.payload[0]]
        if sprint is None:  # SPRINT's per-row pruning state is set up once per batch
            progress.admit = admit
        try:
            tokens = self._denoise(requests, block_length, sprint, progress)
        except _BatchAborted:
            self.counters["aborted_batches"] += 1
            for item in live:
                if not item.future.done():
                    item.future.set_exception(item.job.error())
            return
        except Exception as e:
            if len(live) > 1:
                log.warning("a batch of %d jobs failed (%s: %s); re-running them one by one",
                            len(live), type(e).__name__, e)
                self.counters["isolated_retries"] += 1
                for item in live:
                    self._run_batch([item])
            else:
                log.exception("denoising failed for job %d", live[0].job.id)
                if not live[0].future.done():
                    live[0].future.set_exception(e)
            return
        self.counters["batches"] += 1
        self.counters["batched_requests"] += len(requests)
        self.counters["max_batch_seen"] = max(self.counters["max_batch_seen"], len(requests))
        self.batch_sizes[len(requests)] += 1
        self.counters["forwards"] += self.pipe.last_stats.get("forwards", 0)
        self.counters["row_forwards"] += self.pipe.last_stats.get("row_forwards", 0)
        start = 0
        for item in live:
            n = len(item.payload[0])
            if not item.future.done():  # not already delivered at the block where it finished
                item.future.set_result(tokens[start:start + n])
            start += n

    def stats(self) -> dict:
        with self._cond:
            c = dict(self.counters)
            c.update(batch_sizes={str(k): v for k, v in sorted(self.batch_sizes.items())},
                     in_flight=self._admitted, waiting_work=len(self._queue), running=self._running,
                     paused=self._paused,
                     max_batch=self.config.max_batch, max_queue=self.config.max_queue,
                     mean_batch=round(c["batched_requests"] / c["batches"], 3) if c["batches"] else 0.0)
        return c


class _BlockProgress:
    """The sampler's per-block callback: progress events per job, and the abort when nobody is left.

    Each request's blocks are those its canvas spans (absolute ``block_length`` blocks, as the sampler
    lays them out), so a job whose canvas ends early reports done before the batch does.
    """

    def __init__(self, items: list[_Work], block_length: int) -> None:
        self.block_length = block_length
        self.admit = None  # set by the scheduler: jobs joining the running batch
        self.items, self.spans, self.sent = [], [], []
        # request index -> (item, text request?) for the committed-token events of streaming text
        self.owner, self.offsets, self.results = [], [], []
        for item in items:
            self.add(item, 0)  # the batch's own jobs: no shift
        self.first_block = min(lo for spans in self.spans for lo, _ in spans)

    def add(self, item: _Work, block: int) -> None:
        """A job of the batch (block 0) or joining at ``block``: its canvas is shifted by whole blocks
        to start there or later, as the sampler places it."""
        i = len(self.items)
        self.items.append(item)
        self.sent.append(-1)
        self.offsets.append(len(self.owner))
        self.results.append([None] * len(item.payload[0]))
        self.owner += [(i, bool(r.stop_ids)) for r in item.payload[0]]
        spans = []
        for req in item.payload[0]:
            lp = admission_shift(req, block, self.block_length) + len(req.rows[0])
            spans.append((lp // self.block_length, -(-(lp + req.gen_length) // self.block_length)))
        self.spans.append(spans)

    def finished(self, request: int, ids: list[int]) -> None:
        """A request's result at the block boundary where it completed: a job whose requests are all
        complete leaves the batch now (its result is delivered) instead of waiting for the others."""
        i, _ = self.owner[request]
        item = self.items[i]
        self.results[i][request - self.offsets[i]] = ids
        complete = [all(r is not None for r in res) for res in self.results]
        # Only a job that finishes while others still run leaves early; the batch's last one is
        # delivered when the batch ends, with its counters.
        if complete[i] and not all(complete) and not item.future.done() and not item.job.cancelled:
            item.future.set_result(list(self.results[i]))

    def tokens(self, request: int, ids: list[int]) -> None:
        """Committed ids of a text request after a block: a ``text`` event its stream turns into content."""
        i, is_text = self.owner[request]
        item = self.items[i]
        if is_text and not item.job.cancelled:
            item.job.emit({"stage": "text", "phase": len(item.job.outputs), "ids": ids})

    def __call__(self, done: int, total: int) -> None:
        finished = self.first_block + done  # absolute blocks [0, finished) are final
        for i, item in enumerate(self.items):
            if item.job.cancelled:
                continue
            blocks = sum(min(max(finished - lo, 0), hi - lo) for lo, hi in self.spans[i])
            if blocks != self.sent[i]:
                self.sent[i] = blocks
                item.job.emit({"stage": "tokens", "phase": len(item.job.outputs), "done": blocks,
                               "total": sum(hi - lo for lo, hi in self.spans[i])})
        if all(item.job.cancelled for item in self.items):
            raise _BatchAborted()

"""The scheduler without HTTP: batching, admission, cancellation, the worker thread."""

import threading
import time

import pytest

from llada2uni import LLaDA2Uni
from llada2uni.server.scheduler import Cancelled, JobTimeout, QueueFull, Scheduler, SchedulerConfig
from llada2uni.server.tasks import JobPipeline


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return LLaDA2Uni.from_pretrained(tiny_dir, device="cpu")


def chat(pipe, text, **kw):
    return lambda job: JobPipeline(pipe, job).chat(text, **{"gen_length": 40, "steps": 4, **kw})


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_batches_respect_max_batch_and_match_single_runs(pipe):
    prompts = ["Hi", "A longer question about boats and rivers?", "Why?"]
    expected = [pipe.chat(p, gen_length=40, steps=4) for p in prompts]
    s = Scheduler(pipe, SchedulerConfig(max_batch=2)).start()
    try:
        s.pause()
        jobs = [s.submit(chat(pipe, p)) for p in prompts]
        wait_for(lambda: s.stats()["waiting_work"] == 3)
        s.resume()
        assert [j.future.result(60) for j in jobs] == expected
        stats = s.stats()
        assert (stats["batches"], stats["max_batch_seen"], stats["completed"]) == (2, 2, 3)
    finally:
        s.stop()


def test_progress_events_follow_each_requests_blocks(pipe):
    s = Scheduler(pipe).start()
    try:
        events = []
        job = s.submit(chat(pipe, "Hi", gen_length=70), on_event=events.append)
        job.future.result(60)
        done = [e["done"] for e in events if e["stage"] == "tokens"]
        req = job.outputs[0][0][0]
        plen = len(req.rows[0])
        blocks = -(-(plen + req.gen_length) // 32) - plen // 32
        assert done == sorted(done) and set(e["total"] for e in events if e["stage"] == "tokens") == {blocks}
        # streaming text: the committed ids after each block, each a prefix of the next and of the answer
        texts = [e["ids"] for e in events if e["stage"] == "text"]
        assert texts and all(b[:len(a)] == a for a, b in zip(texts, texts[1:]))
        assert texts[-1] == job.outputs[0][1][0]
    finally:
        s.stop()


def test_call_runs_on_the_worker_thread(pipe):
    s = Scheduler(pipe).start()
    try:
        job = s.submit(lambda job: job.call(lambda: threading.current_thread().name))
        assert job.future.result(10) == "llada2uni-worker"
    finally:
        s.stop()


def test_queue_full_then_free(pipe):
    s = Scheduler(pipe, SchedulerConfig(max_queue=1)).start()
    try:
        s.pause()
        first = s.submit(chat(pipe, "Hi"))
        with pytest.raises(QueueFull) as e:
            s.submit(chat(pipe, "Hi"))
        assert e.value.retry_after >= 1
        s.resume()
        first.future.result(60)
        wait_for(lambda: s.stats()["in_flight"] == 0)
        assert s.submit(chat(pipe, "Hi")).future.result(60)
    finally:
        s.stop()


def test_cancel_withdraws_waiting_work(pipe):
    s = Scheduler(pipe).start()
    try:
        s.pause()
        job = s.submit(chat(pipe, "Hi"))
        wait_for(lambda: s.stats()["waiting_work"] == 1)
        job.cancel()
        with pytest.raises(Cancelled):
            job.future.result(10)
        assert s.stats()["waiting_work"] == 0 and s.stats()["in_flight"] == 0
        s.resume()
        assert s.stats()["batches"] == 0
    finally:
        s.stop()


def test_deadline(pipe):
    s = Scheduler(pipe, SchedulerConfig(request_timeout=0.2)).start()
    try:
        s.pause()
        job = s.submit(chat(pipe, "Hi"))
        with pytest.raises(JobTimeout):
            job.future.result(10)
        assert s.stats()["timed_out"] == 1
    finally:
        s.stop()


def test_abort_when_every_job_of_the_batch_is_cancelled(pipe):
    s = Scheduler(pipe).start()
    try:
        jobs = []

        def cancel_all(event):
            for j in jobs:
                j.cancel()
        jobs.append(s.submit(chat(pipe, "Hi", gen_length=2000, steps=32), on_event=cancel_all))
        with pytest.raises(Cancelled):
            jobs[0].future.result(60)
        wait_for(lambda: s.stats()["running"] == 0)
        assert s.stats()["aborted_batches"] == 1 and s.stats()["batches"] == 0
    finally:
        s.stop()


def test_stop_cancels_waiting_jobs(pipe):
    s = Scheduler(pipe).start()
    s.pause()
    job = s.submit(chat(pipe, "Hi"))
    wait_for(lambda: s.stats()["waiting_work"] == 1)
    s.stop()
    with pytest.raises(Cancelled):
        job.future.result(10)
    with pytest.raises(Cancelled):
        s.submit(chat(pipe, "Hi"))


def test_drain_ends_waiting_jobs_and_lets_started_ones_finish(pipe):
    from llada2uni.server.scheduler import ShuttingDown
    s = Scheduler(pipe).start()
    try:
        gate, inside = threading.Event(), threading.Event()

        def slow(job):  # started: its first work item runs on the worker, then it asks for more
            job.call(lambda: (inside.set(), gate.wait(10)))
            return job.call(lambda: "finished")
        running = s.submit(slow)
        assert inside.wait(10)
        waiting = s.submit(chat(pipe, "Hi"))
        wait_for(lambda: s.stats()["waiting_work"] == 1)
        assert s.drain() == 1
        with pytest.raises(ShuttingDown):
            waiting.future.result(10)
        with pytest.raises(ShuttingDown):
            s.submit(chat(pipe, "Hi"))
        gate.set()
        assert running.future.result(10) == "finished"  # its later work was still taken
    finally:
        s.stop()


def test_a_finished_request_leaves_before_the_batch_ends(pipe):
    # A short answer and a long one in one batch: the short one is delivered at the block boundary
    # where it completes, while the long one is still being denoised (its progress events go on).
    s = Scheduler(pipe).start()
    try:
        s.pause()
        long_events = []
        short = s.submit(chat(pipe, "Hi", gen_length=8))
        long = s.submit(chat(pipe, "Hello there", gen_length=300), on_event=long_events.append)
        seen_when_short_done = []
        short.future.add_done_callback(lambda f: seen_when_short_done.append(len(long_events)))
        s.resume()
        short.future.result(60)
        long.future.result(60)
        assert s.stats()["max_batch_seen"] == 2  # they did share the batch
        assert len(long_events) > seen_when_short_done[0]  # the long one went on after the short left
    finally:
        s.stop()


def test_a_request_joins_a_running_batch_at_a_block_boundary(pipe):
    expected = pipe.chat("Why?", gen_length=40, steps=4)
    s = Scheduler(pipe).start()
    try:
        late = []

        def on_event(event):
            # the long job is running: submit another and let it reach the queue before the next block
            if event["stage"] == "tokens" and not late:
                late.append(s.submit(chat(pipe, "Why?")))
                wait_for(lambda: s.stats()["waiting_work"] >= 1)
        long = s.submit(chat(pipe, "Hello there", gen_length=400), on_event=on_event)
        long.future.result(60)
        assert late and late[0].future.result(60) == expected
        stats = s.stats()
        assert stats["joined"] == 1 and stats["batches"] == 1 and stats["max_batch_seen"] == 2
    finally:
        s.stop()


def test_a_new_batch_lingers_for_work_still_arriving_but_never_for_a_lone_request(pipe):
    s = Scheduler(pipe, SchedulerConfig(batch_linger_s=5.0)).start()
    try:
        # alone: nobody else is admitted, so the batch starts at once (it would wait 5 s otherwise)
        assert s.submit(chat(pipe, "Hi")).future.result(4.0)
        first = s.submit(chat(pipe, "Hi"))
        late_chat = chat(pipe, "Why?")
        second = s.submit(lambda job: (time.sleep(0.3), late_chat(job))[1])  # its prompt is slow to come
        first.future.result(60), second.future.result(60)
        stats = s.stats()
        # both started together: one more batch, of two, and nobody joined mid-batch
        assert (stats["batches"], stats["max_batch_seen"], stats["joined"]) == (2, 2, 0)
    finally:
        s.stop()
    with pytest.raises(ValueError, match="batch_linger_s"):
        SchedulerConfig(batch_linger_s=-1.0)

"""The background worker without Qt: order, errors, cancel, replacement of pending jobs, stale results."""

from __future__ import annotations

import threading
import time

import pytest

from SAMMed2DSegmentLib.service.worker import JobCancelled, Worker


def drain(worker: Worker, timeout: float = 10.0) -> None:
    """What the widget's QTimer does: poll until nothing runs or waits."""
    deadline = time.monotonic() + timeout
    while worker.busy:
        worker.poll()
        if time.monotonic() > deadline:
            raise AssertionError("worker did not finish")
        time.sleep(0.005)
    worker.poll()


@pytest.fixture
def worker():
    w = Worker("test worker")
    yield w
    assert w.shutdown(timeout=5)


def test_jobs_run_in_order_on_one_thread_and_callbacks_on_the_polling_thread(worker):
    ran, delivered = [], []
    for i in range(5):
        worker.submit(
            lambda ctx, i=i: ran.append((i, threading.current_thread().name)) or i * 10,
            on_done=lambda value: delivered.append((value, threading.current_thread().name)),
        )
    drain(worker)
    assert [i for i, _ in ran] == [0, 1, 2, 3, 4]
    assert {name for _, name in ran} == {"test worker"}
    assert delivered == [(i * 10, threading.current_thread().name) for i in range(5)]


def test_callbacks_wait_for_poll(worker):
    done = threading.Event()
    results = []
    worker.submit(lambda ctx: done.set() or "x", on_done=results.append)
    assert done.wait(5)
    time.sleep(0.05)
    assert results == []  # nothing is delivered behind the main thread's back
    drain(worker)
    assert results == ["x"]


def test_errors_are_reported_and_the_worker_goes_on(worker):
    errors, results = [], []

    def fail(ctx):
        raise ValueError("bad prompt")

    worker.submit(fail, name="bad", on_error=lambda exc, tb: errors.append((exc, tb)))
    worker.submit(lambda ctx: 42, on_done=results.append)
    drain(worker)
    assert len(errors) == 1 and isinstance(errors[0][0], ValueError)
    assert "bad prompt" in errors[0][1] and "Traceback" in errors[0][1]
    assert results == [42]


def test_cancel_stops_the_running_job_and_drops_pending_ones(worker):
    started = threading.Event()
    cancelled, done = [], []

    def long_job(ctx):
        started.set()
        for _ in range(1000):
            ctx.check_cancelled()
            time.sleep(0.01)
        return "finished"

    worker.submit(long_job, on_done=done.append, on_cancelled=lambda: cancelled.append("long"))
    ran_pending = []
    worker.submit(lambda ctx: ran_pending.append(1), on_cancelled=lambda: cancelled.append("pending"))
    assert started.wait(5)
    t0 = time.monotonic()
    worker.cancel_all()
    drain(worker)
    assert time.monotonic() - t0 < 2
    assert sorted(cancelled) == ["long", "pending"]
    assert done == [] and ran_pending == []


def test_job_may_return_partial_results_after_cancel(worker):
    started = threading.Event()
    out = []

    def partial(ctx):
        started.set()
        finished = 0
        while not ctx.cancelled:
            finished += 1
            time.sleep(0.005)
        return {"finished": finished, "cancelled": True}

    worker.submit(partial, on_done=out.append)
    assert started.wait(5)
    worker.cancel_all()
    drain(worker)
    assert out and out[0]["cancelled"]


def test_progress_is_delivered_in_order(worker):
    seen = []

    def job(ctx):
        for i in range(4):
            ctx.progress(i)
        return "end"

    worker.submit(job, on_progress=seen.append, on_done=seen.append)
    drain(worker)
    assert seen == [0, 1, 2, 3, "end"]


def test_pending_job_with_the_same_key_is_replaced(worker):
    gate = threading.Event()
    ran = []
    worker.submit(lambda ctx: gate.wait(5))
    first = worker.submit(lambda ctx: ran.append("first"), key="preview")
    worker.submit(lambda ctx: ran.append("other"), key="prefetch")
    worker.submit(lambda ctx: ran.append("second"), key="preview")
    gate.set()
    drain(worker)
    assert ran == ["other", "second"]
    assert first.state == "replaced"


def test_results_from_before_a_scene_change_are_dropped(worker):
    gate = threading.Event()
    started = threading.Event()
    applied, pending_ran = [], []

    def old_job(ctx):
        started.set()
        gate.wait(5)
        return "old volume mask"

    worker.submit(old_job, on_done=applied.append, on_error=lambda e, tb: applied.append(e))
    worker.submit(lambda ctx: pending_ran.append(1), on_done=applied.append)
    assert started.wait(5)
    worker.new_epoch()  # e.g. the scene was closed
    gate.set()
    worker.submit(lambda ctx: "new volume mask", on_done=applied.append)
    drain(worker)
    assert applied == ["new volume mask"]
    assert pending_ran == []


def test_failing_callback_does_not_block_the_others(worker):
    out = []
    worker.submit(lambda ctx: 1, on_done=lambda v: 1 / 0)
    worker.submit(lambda ctx: 2, on_done=out.append)
    drain(worker)
    assert out == [2]


def test_shutdown_stops_the_thread_and_a_new_submit_restarts_it():
    w = Worker("restartable")
    w.submit(lambda ctx: None)
    drain(w)
    assert w.shutdown(timeout=5)
    out = []
    w.submit(lambda ctx: "again", on_done=out.append)
    drain(w)
    assert out == ["again"]
    assert w.shutdown(timeout=5)


def test_job_cancelled_exception_is_not_an_error(worker):
    errors, cancelled = [], []

    def job(ctx):
        raise JobCancelled

    worker.submit(job, on_error=lambda e, tb: errors.append(e), on_cancelled=lambda: cancelled.append(1))
    drain(worker)
    assert errors == [] and cancelled == [1]

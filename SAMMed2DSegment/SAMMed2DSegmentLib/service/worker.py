"""One persistent background thread for the slow work (encoding, propagation, downloads), without Qt.

Why this shape:
* torch keeps per-thread state (cuDNN plans, MPS streams) and the predictor holds the current image, so every
  model call runs on one long-lived thread, one job at a time, in submission order.
* MRML and Qt may only be touched on the main thread. Jobs therefore never call back by themselves: their
  results wait in a queue until the main thread calls `poll()` (the Slicer widget does so from a `qt.QTimer`),
  and `poll()` runs the `on_done` / `on_error` / `on_progress` callbacks there.
* The user can close the scene or delete nodes while a job runs. `new_epoch()` marks everything submitted
  before as stale: running jobs are asked to stop, and their results are dropped instead of being applied.
* Typing-speed updates (points dragged, live preview) would pile up; a job submitted with a `key` replaces a
  job with the same key that has not started yet.
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised inside a job by `JobContext.check_cancelled()`; reported as cancelled, not as an error."""


@dataclass
class JobContext:
    """What a job function receives: a cancel flag to poll and a progress reporter."""

    cancel_event: threading.Event
    _report: Callable[[Any], None]

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise JobCancelled

    def progress(self, value: Any) -> None:
        """Send `value` to the job's on_progress callback (delivered on the main thread by `poll`)."""
        self._report(value)


@dataclass(eq=False)  # a job is itself: `in` / `remove` on the pending list must compare identity
class Job:
    """Background work: `fn(context)` runs on the worker thread, the callbacks on the main thread."""

    fn: Callable[[JobContext], Any]
    name: str = ""
    on_done: Callable[[Any], None] | None = None
    on_error: Callable[[BaseException, str], None] | None = None  # (exception, formatted traceback)
    on_cancelled: Callable[[], None] | None = None
    on_progress: Callable[[Any], None] | None = None
    key: Hashable | None = None
    epoch: int = 0
    cancel_event: threading.Event = field(default_factory=threading.Event)
    state: str = "pending"  # pending → running → done | failed | cancelled | replaced | stale

    def cancel(self) -> None:
        self.cancel_event.set()


_STOP = object()


class Worker:
    """A daemon thread executing submitted jobs in order; results are handed back through `poll()`."""

    def __init__(self, name: str = "SAMMed2D worker") -> None:
        self._name = name
        self._jobs: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending: list[Job] = []
        self._current: Job | None = None
        self._epoch = 0
        self._thread: threading.Thread | None = None

    # -- main thread API -------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def busy(self) -> bool:
        """A job runs or waits, or results wait for `poll()`."""
        with self._lock:
            return bool(self._pending or self._current) or not self._results.empty()

    @property
    def current(self) -> Job | None:
        return self._current

    def submit(self, fn: Callable[[JobContext], Any], name: str = "", **callbacks: Any) -> Job:
        """Queue `fn`; keyword arguments are the Job fields (on_done, on_error, on_cancelled, on_progress,
        key). A pending job with the same `key` is dropped in favour of this one."""
        self._ensure_thread()
        job = Job(fn, name, epoch=self._epoch, **callbacks)
        with self._lock:
            if job.key is not None:
                for old in [j for j in self._pending if j.key == job.key]:
                    old.state = "replaced"
                    old.cancel()
                    self._pending.remove(old)
            self._pending.append(job)
        self._jobs.put(job)
        return job

    def cancel_all(self) -> None:
        """Ask the running job to stop and drop every job that has not started."""
        with self._lock:
            for job in self._pending:
                job.state = "cancelled"
                job.cancel()
                self._results.put((job, "cancelled", None))
            self._pending.clear()
            if self._current is not None:
                self._current.cancel()

    def new_epoch(self) -> int:
        """Everything submitted so far becomes stale (scene closed, volume changed): cancelled, and its
        results are never delivered. Returns the new epoch."""
        with self._lock:
            self._epoch += 1
            for job in self._pending:
                job.state = "stale"
                job.cancel()
            self._pending.clear()
            if self._current is not None:
                self._current.cancel()
        return self._epoch

    def poll(self, max_items: int = 100) -> int:
        """Deliver waiting results and progress to their callbacks, on the calling (main) thread.
        Stale results are dropped. Returns the number of callbacks run."""
        delivered = 0
        for _ in range(max_items):
            try:
                job, kind, payload = self._results.get_nowait()
            except queue.Empty:
                break
            if job.epoch != self._epoch:
                continue
            callback, args = {
                "progress": (job.on_progress, (payload,)),
                "done": (job.on_done, (payload,)),
                "failed": (job.on_error, payload),
                "cancelled": (job.on_cancelled, ()),
            }[kind]
            if kind == "failed" and callback is None:
                log.error("background job %r failed:\n%s", job.name, payload[1])
            if callback is None:
                continue
            try:
                callback(*args)
            except Exception:  # a broken callback must not stop the delivery of the others
                log.exception("callback of background job %r failed", job.name)
            delivered += 1
        return delivered

    def shutdown(self, timeout: float | None = 5.0) -> bool:
        """Cancel everything and stop the thread. Returns False if the running job did not stop in time
        (the daemon thread then ends with the process)."""
        self.cancel_all()
        thread = self._thread
        if thread is None:
            return True
        self._jobs.put(_STOP)
        thread.join(timeout)
        self._thread = None if not thread.is_alive() else thread
        return not thread.is_alive()

    # -- worker thread -----------------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            with self._lock:
                if job not in self._pending:  # replaced, cancelled or stale before it started
                    continue
                self._pending.remove(job)
                self._current = job
                job.state = "running"
            try:
                self._execute(job)
            finally:
                with self._lock:
                    self._current = None

    def _execute(self, job: Job) -> None:
        def report(value: Any) -> None:
            self._results.put((job, "progress", value))

        context = JobContext(job.cancel_event, report)
        try:
            if job.cancel_event.is_set():
                raise JobCancelled
            result = job.fn(context)
        except JobCancelled:
            job.state = "cancelled"
            self._results.put((job, "cancelled", None))
        except BaseException as error:  # reported to the main thread, never lost in the thread
            job.state = "failed"
            self._results.put((job, "failed", (error, traceback.format_exc())))
        else:
            # A job that returns normally after a cancel request is done: it chose to hand back what it
            # finished (propagation keeps the slices completed before Stop). Stale ones are dropped in poll().
            job.state = "done"
            self._results.put((job, "done", result))


__all__ = ["Job", "JobCancelled", "JobContext", "Worker"]

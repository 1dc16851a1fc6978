"""Cases submitted to Dask one per worker thread (enough to keep every worker busy), results taken as they
finish: the progress line moves, a finished case is put in place at once, and Ctrl-C cancels only what has
not finished."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable

from .cluster import Placement, dask_client
from .progress import Progress
from .worker import CaseOutcome, CaseTask, run_case

LOST = "its worker died while running it (out of memory, or killed)"


def _lost(task: CaseTask, exc: BaseException) -> CaseOutcome:
    """The outcome of a case whose task raised on the client: its worker died (the summary names that
    worker, to find its log), or Dask itself failed."""
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        worker = str(getattr(exc.last_worker, "address", ""))
        return CaseOutcome(task.case, "failed", reason=LOST, worker=worker)
    return CaseOutcome(task.case, "failed", reason=f"{type(exc).__name__}: {exc}".splitlines()[0])


def run_tasks(
    client,
    tasks: Iterable[CaseTask],
    on_finished: Callable[[CaseTask, CaseOutcome], None],
) -> list[CaseOutcome]:
    """Run `tasks` on `client`'s cluster, one case per worker thread at a time (`tasks` may be a generator
    that prepares each case as it is submitted); `on_finished` takes each outcome. On any other exit
    (Ctrl-C) whatever has not finished is cancelled.

    No case waits on a worker: Dask sends a worker every task submitted (there is no scheduler-side queue
    for a few independent tasks), and a worker that dies takes its waiting tasks with it, so a case that
    kills its worker would fail the innocent cases queued behind it. The count follows the cluster's threads
    as they change (a nanny's replacement worker, a cluster that is still growing)."""
    from distributed import as_completed

    run = secrets.token_hex(4)
    queue = iter(tasks)
    running: dict[str, CaseTask] = {}
    futures = as_completed()

    def top_up() -> None:
        threads = max(1, sum(client.nthreads().values()))
        while len(running) < threads and (task := next(queue, None)) is not None:
            future = client.submit(run_case, task, key=f"sammed2d-{run}-{task.case}", pure=False, retries=0)
            running[future.key] = task
            futures.add(future)

    top_up()
    outcomes = []
    try:
        for future in futures:
            task = running.pop(future.key)
            try:
                outcome = future.result()
            except Exception as exc:  # noqa: BLE001 - the worker, not the case, failed: record it
                outcome = _lost(task, exc)
            future.release()
            on_finished(task, outcome)
            outcomes.append(outcome)
            top_up()
    finally:
        if running:
            client.cancel(list(futures.futures), force=True)
    return outcomes


def run_cohort(
    where: Placement,
    tasks: Iterable[CaseTask],
    total: int,
    skipped: int,
    on_finished: Callable[[CaseTask, CaseOutcome], None],
    quiet: bool = False,
) -> list[CaseOutcome]:
    """`run_tasks` on the placement's cluster with a progress line (`total` cases, `skipped` already
    decided); the cluster is closed before this returns or raises (Ctrl-C included)."""
    progress = Progress(total, skipped, quiet=quiet)
    if skipped:
        progress.update("skipped")

    def finished(task: CaseTask, outcome: CaseOutcome) -> None:
        on_finished(task, outcome)
        progress.update(outcome.status, outcome.case, outcome.reason)

    try:
        with dask_client(where) as client:
            return run_tasks(client, tasks, on_finished=finished)
    finally:
        progress.close()

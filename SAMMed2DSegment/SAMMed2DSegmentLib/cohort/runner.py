"""Cases submitted to Dask a few at a time (enough to keep every worker busy), results taken as they
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
    from distributed import KilledWorker

    reason = LOST if isinstance(exc, KilledWorker) else f"{type(exc).__name__}: {exc}".splitlines()[0]
    return CaseOutcome(task.case, "failed", reason=reason)


def run_tasks(
    client,
    tasks: Iterable[CaseTask],
    in_flight: int,
    on_finished: Callable[[CaseTask, CaseOutcome], None],
) -> list[CaseOutcome]:
    """Run `tasks` on `client`'s cluster, at most `in_flight` at a time (`tasks` may be a generator that
    prepares each case as it is submitted); `on_finished` takes each outcome. On any other exit (Ctrl-C)
    whatever has not finished is cancelled."""
    from distributed import as_completed

    run = secrets.token_hex(4)
    queue = iter(tasks)
    running: dict[str, CaseTask] = {}
    futures = as_completed()

    def submit_next() -> None:
        task = next(queue, None)
        if task is None:
            return
        future = client.submit(run_case, task, key=f"sammed2d-{run}-{task.case}", pure=False, retries=0)
        running[future.key] = task
        futures.add(future)

    for _ in range(max(1, in_flight)):
        submit_next()
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
            submit_next()
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
            nthreads = sum(client.nthreads().values()) or where.workers * where.threads_per_worker
            return run_tasks(client, tasks, in_flight=max(2, 2 * nthreads), on_finished=finished)
    finally:
        progress.close()

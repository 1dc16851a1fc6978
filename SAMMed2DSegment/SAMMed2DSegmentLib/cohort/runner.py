"""Cases submitted to Dask a few at a time (enough to keep every worker busy), results taken as they
finish: the progress line moves, a finished case is put in place at once, and Ctrl-C cancels only what has
not finished."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable

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

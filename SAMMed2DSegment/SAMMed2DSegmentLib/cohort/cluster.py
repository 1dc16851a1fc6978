"""Where a cohort runs: a `distributed.LocalCluster` of worker processes on this machine (the default),
sized from its cores and memory, or an existing Dask cluster named by its scheduler's address (started by
hand, by dask-jobqueue on SLURM/PBS, on Kubernetes). Dask moves only our plain task data and results between
the user's own client, scheduler and workers: its pickling is trusted by construction, like any process the
user starts."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from . import CohortError

#: Memory a worker needs for a case: the model, one CT volume, embeddings and the scene (ViT-B model and a
#: 512×512×600 CT fit well within it).
WORKER_MEMORY = 4 << 30


class ClusterError(CohortError):
    """The scheduler cannot be reached, or the cluster cannot start: one line, exit status 2."""


@dataclass(frozen=True)
class Placement:
    """How the run is spread: a scheduler address, or local worker processes and threads."""

    scheduler: str | None
    workers: int
    threads_per_worker: int
    torch_threads: int | None  # intra-op threads per case on local workers (None: the worker's own rule)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


SCHEDULER = re.compile(r"^(tcp|tls|inproc|ucx|ws|wss)://\S+$")


def placement(scheduler: str | None, workers: int | None, threads_per_worker: int | None) -> Placement:
    """The options checked, and the local cluster's size: `workers` as asked, else as many as the cores and
    memory allow (at most one per core, `WORKER_MEMORY` each); each case's torch threads share the cores."""
    if importlib.util.find_spec("distributed") is None:
        raise ClusterError("this command runs on Dask: pip install 'dask[distributed]' (the cohort extra)")
    if scheduler and not SCHEDULER.match(scheduler):
        raise ClusterError(f"--scheduler must be an address such as tcp://HOST:PORT, got {scheduler!r}")
    if workers is not None and workers < 1:
        raise ClusterError(f"--workers must be ≥ 1, got {workers}")
    if threads_per_worker is not None and threads_per_worker < 1:
        raise ClusterError(f"--threads-per-worker must be ≥ 1, got {threads_per_worker}")
    threads = threads_per_worker or 1
    if scheduler:
        return Placement(scheduler, 0, threads, None)
    cores = usable_cores()
    if not workers:
        import psutil

        by_memory = max(1, psutil.virtual_memory().total // WORKER_MEMORY)
        workers = int(max(1, min(cores // threads, by_memory)))
    return Placement(None, workers, threads, max(1, cores // (workers * threads)))


@contextlib.contextmanager
def _quiet_dask_logs() -> Iterator[None]:
    """Dask's own INFO lines (workers starting, closing) are not the user's concern: errors only."""
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def dask_client(where: Placement) -> Iterator:
    """A `distributed.Client` on the placement's cluster; a local cluster is closed with the block.
    A case that kills its worker (out of memory) is not retried on another one: it fails by itself."""
    import dask
    from distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_dask_logs())
        if where.scheduler:
            try:
                client = stack.enter_context(Client(where.scheduler, timeout="20s"))
            except (OSError, TimeoutError, ValueError) as exc:
                raise ClusterError(f"--scheduler {where.scheduler}: cannot connect ({exc})") from None
        else:
            stack.enter_context(dask.config.set({"distributed.scheduler.allowed-failures": 0}))
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=where.workers,
                    threads_per_worker=where.threads_per_worker,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address="127.0.0.1:0",
                    silence_logs=logging.ERROR,
                )  # fmt: skip
            )
            client = stack.enter_context(Client(cluster))
        yield client

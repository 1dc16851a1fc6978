"""What runs on a Dask worker: one case through its command's own run function (the same checks, session and
output plan as a single run), with the model loaded once per worker process and kept for the next case.

Every failure of a case (bad input, a write error, out of memory, a bug) becomes that case's outcome with a
one-line reason; nothing a case does can stop the others. The task function and its arguments are plain
data, pickled by Dask between the user's own client, scheduler and workers (trusted by construction).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from ..files import atomic_path
from .digest import same_release, software_versions

#: Loaded models of this worker process, by (model option, device, digest of the model file): the first
#: case loads, the next ones reuse it. One entry: a batch uses one model. Beside each model, the
#: low-precision encoders prepared for it, per worker thread and precision (`shared_encoders`).
_models: dict[tuple, tuple] = {}
_lock = threading.Lock()
_loads = 0
_preparations = 0  # low-precision encoders this worker process prepared, all threads (in each report)


@dataclass(frozen=True)
class CaseTask:
    """One case as the worker needs it: the command (`segment` or `evaluate`) and its own options."""

    case: str
    command: str
    argv: tuple[str, ...]
    model_sha256: str
    report: str | None = None  # where to write the report with the batch record (segment)
    batch: dict = field(default_factory=dict)  # kept in the report (digest, manifest line)
    final: dict = field(default_factory=dict)  # report fields naming the outputs where they will end up
    torch_threads: int | None = None
    #: The versions where the task was made (the client's, which its resume digest records).
    software: dict = field(default_factory=software_versions)


@dataclass
class CaseOutcome:
    """How a case ended: `done` or `failed` (with its one-line reason); `skipped` is decided by the client."""

    case: str
    status: str
    reason: str = ""
    slices: int = 0
    seconds: float = 0.0
    worker: str = ""
    model_loads: int = 0
    peak_memory_mb: float = 0.0
    result: dict | None = None


def peak_memory_mb() -> float:
    """This worker process's peak resident memory so far (Linux VmHWM, which a spawned process does not
    inherit from its parent; elsewhere ru_maxrss)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1024), 1)


def worker_name() -> str:
    """The Dask worker's address, or host:pid outside a worker."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


def _cores_per_case() -> int:
    """On a worker of someone else's cluster: its cores shared by the cases it runs at once (Dask's nanny
    sets OMP_NUM_THREADS=1, which would leave torch one core; run one worker process per allocation)."""
    from .cluster import usable_cores

    try:
        from distributed import get_worker

        return max(1, usable_cores() // get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return usable_cores()


def model_once(args: argparse.Namespace, model_sha256: str, load) -> tuple[tuple, dict]:
    """((model, info), encoders) for `args`: the model loaded by `load(args)` on this worker's first case
    only, and the low-precision encoders this worker thread prepared for it, by precision, which its next
    cases reuse (int8 packs its weights for about a second, bf16 casts a copy). Per thread: cases running
    at once never share one. An fp32 case drops the thread's (it needs none; they hold memory)."""
    global _loads
    key = (args.checkpoint, args.model, args.device, model_sha256)
    with _lock:
        if key not in _models:
            _models.clear()  # a different model: the old one goes, with its encoders
            _models[key] = (load(args), {})
            _loads += 1
        loaded, by_thread = _models[key]
        encoders = by_thread.setdefault(threading.get_ident(), {})
    if getattr(args, "precision", None) == "fp32":
        encoders.clear()
    return loaded, encoders


def _count_preparations(new: int) -> None:
    global _preparations
    with _lock:
        _preparations += new


def _parser(command: str) -> argparse.ArgumentParser:
    """The command's own parser, found by name: the cohort layer sits below the command line and takes
    none of its modules by import (the command that submits the case names it)."""
    module = importlib.import_module(f"{__package__.rpartition('.')[0]}.commands.{command}")
    parser = argparse.ArgumentParser(prog=f"python -P -m SAMMed2DSegmentLib {command}")
    module.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def software_mismatch(expected: dict) -> str:
    """Why this worker may not run a case whose client runs `expected` versions ("" where it may): the
    resume digest holds the client's versions, so results made with others would later be kept as theirs."""
    found = software_versions()
    if not expected or same_release(found, expected):
        return ""

    def described(versions: dict) -> str:
        return ", ".join(
            f"{name} {version or '(not installed)'}" for name, version in sorted(versions.items())
        )

    return f"this worker runs {described(found)}, the client {described(expected)}: install the same versions"


def run_case(task: CaseTask) -> CaseOutcome:
    """Run one case; never raises (a worker killed under it is reported by the client)."""
    from ..commands.common import CommandError, OutputError, load_model, report_json

    t0 = time.perf_counter()
    outcome = CaseOutcome(task.case, "failed", worker=worker_name())
    try:
        if reason := software_mismatch(task.software):
            raise CommandError(reason)
        import torch

        torch.set_num_threads(task.torch_threads or _cores_per_case())
        try:
            args = _parser(task.command).parse_args([task.command, *task.argv])
        except SystemExit:
            raise CommandError(f"bad options for {task.command}: {' '.join(task.argv)}") from None
        args.preloaded_model, encoders = model_once(args, task.model_sha256, load_model)
        args.shared_encoders = encoders
        before = set(map(id, encoders.values()))
        try:
            outcome.result = args.run_command(args)
        finally:
            _count_preparations(len(set(map(id, encoders.values())) - before))
        if task.report is not None:
            record = {"worker": outcome.worker, "model_loads": _loads, "encoder_preparations": _preparations,
                      "peak_memory_mb": peak_memory_mb(), "software": software_versions()}  # fmt: skip
            report = {**outcome.result, **task.final, "batch": {**task.batch, **record}}
            with atomic_path(task.report) as tmp:  # evaluate's is the case's result itself
                tmp.write_text(report_json(report) + "\n", encoding="utf-8")
        outcome.status = "done"
        outcome.slices = len(outcome.result.get("slices_written", ())) if outcome.result else 0
    except (CommandError, OutputError) as exc:
        outcome.reason = _one_line(exc)
    except MemoryError:
        outcome.reason = "out of memory"
    except Exception as exc:  # noqa: BLE001 - a case's bug must not stop the cohort; its reason is kept
        outcome.reason = f"{type(exc).__name__}: {_one_line(exc)}"
    outcome.model_loads = _loads
    outcome.peak_memory_mb = peak_memory_mb()
    outcome.seconds = round(time.perf_counter() - t0, 2)
    if outcome.status == "done" and outcome.result is not None:
        outcome.result = json.loads(report_json(outcome.result))  # plain JSON data back to the client
    return outcome

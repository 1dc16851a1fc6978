"""What every command shares: the errors and exit statuses, signal handling, the model, window and
intensity-rule options, strict JSON reports and the output plan. Commands import only from here (never from
each other), so adding one never touches another."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from ..choices import PRECISIONS
from ..outputs import OutputPlan, OutputPlanError, plan_outputs

EXIT_BAD_INPUT = 2
EXIT_WRITE_FAILED = 1
EXIT_SOME_FAILED = 1  # batch, evaluate --manifest: some cases failed, the others completed


class CommandError(Exception):
    """Bad input: reported as one line, exit status 2."""


class OutputError(Exception):
    """An output could not be written (disk full, permissions): one line, exit status 1, nothing replaced."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the run stops where it is; the message says whether the outputs were written."""

    def __init__(self, message: str = "interrupted; nothing written", status: int = 130) -> None:
        super().__init__(message)
        self.status = status


#: Signals that unwind like Ctrl-C: SIGTERM (a scheduler, `kill`) and SIGHUP (the terminal went away).
UNWINDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def raise_on_signal(signum: int, frame) -> None:
    """SIGTERM or SIGHUP unwinds like Ctrl-C (temporary files removed, outputs untouched) instead of
    killing the process mid-write; the exit status is 128 + the signal's number."""
    raise Interrupted(status=128 + signum)


def os_reason(exc: BaseException) -> str:
    """One line for a failed write: the system's reason (some writers wrap it with a whole traceback)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def planned(outputs, inputs, missing_folders_ok: bool = False) -> OutputPlan:
    """`outputs.plan_outputs`, its refusal as a CommandError (one line, exit status 2)."""
    try:
        return plan_outputs(outputs, inputs, missing_folders_ok)
    except OutputPlanError as exc:
        raise CommandError(str(exc)) from None


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--checkpoint | --model, --download, --device and --precision: how every command that runs the model
    picks it."""
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", help="checkpoint file (official .pth, state dict, or .safetensors)")
    model.add_argument(
        "--model", help="model name from the registry: demo (bundled, the default) or sam-med2d_b"
    )
    parser.add_argument(
        "--download", action="store_true", help="download a registry model that is not in the cache yet"
    )
    parser.add_argument("--device", default="auto", choices=["cpu", "cuda", "mps", "auto"])
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="encoder arithmetic: fp32 is the exact, parity-tested path; auto takes bf16 where the CPU has "
        "bf16 instructions and it measured faster and agreeing, else int8 where that measured at least 1.5x "
        "faster and agreeing, bf16/fp16 on GPUs (default: auto)",
    )


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """--scheduler | --workers, and --threads-per-worker: where a cohort command (batch, evaluate
    --manifest) runs its cases."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--scheduler", metavar="tcp://HOST:PORT",
        help="an existing Dask cluster's scheduler (default: a local cluster of worker processes here)",
    )  # fmt: skip
    where.add_argument("--workers", type=int, help="local worker processes (default: from cores and memory)")
    parser.add_argument("--threads-per-worker", type=int, help="cases run at once by each worker (default 1)")


@contextlib.contextmanager
def cohort_errors(kept: Callable[[], str] = lambda: "nothing written") -> Iterator[None]:
    """A cohort that cannot start as asked (manifest, cluster, model) is one line and exit status 2; Ctrl-C
    stops it saying what was kept (`kept()`), after its cluster is closed."""
    from ..cohort import CohortError

    try:
        yield
    except CohortError as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt as exc:
        raise Interrupted(f"interrupted; {kept()}", getattr(exc, "status", 130)) from None


def intensity_rule(args: argparse.Namespace) -> str:
    """The intensity rule of the chosen model (weights registry; the demo model's by default)."""
    from ..weights.registry import intensity_rule as rule_of

    return rule_of(args.checkpoint or args.model or "demo")


def intensity_window(spec: str, volume, modality: str | None, rule: str):
    """--window: "auto" is the model's own `rule` (weights registry), else a preset or LEVEL,WIDTH."""
    from ..engine.intensity import PRESETS, IntensityWindow, default_window

    if spec == "auto":
        return default_window(volume, modality if modality in ("CT", "MR", "PT") else None, rule)
    if spec in PRESETS:
        level, width = PRESETS[spec]
        return IntensityWindow.from_level_width(level, width, method=f"preset {spec}")
    try:
        level, width = (float(v) for v in spec.split(","))
    except ValueError:
        raise CommandError(
            f"--window: expected 'auto', a preset ({', '.join(PRESETS)}) or LEVEL,WIDTH; got {spec!r}"
        ) from None
    return IntensityWindow.from_level_width(level, width)


def load_model(args: argparse.Namespace):
    """--checkpoint FILE, else --model NAME from the weights registry, else the bundled demo model; or the
    model a batch worker already loaded for these options (`args.preloaded_model`, see cohort/worker.py)."""
    if getattr(args, "preloaded_model", None) is not None:
        return args.preloaded_model
    from ..weights.checkpoint import load_model as load_checkpoint
    from ..weights.registry import REGISTRY, WeightsError, resolve_model

    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            raise CommandError(f"--checkpoint: no such file: {args.checkpoint}")
        return load_checkpoint(args.checkpoint, device=args.device)
    name = args.model or "demo"
    try:
        path = resolve_model(name, download=args.download)
    except WeightsError as exc:
        raise CommandError(f"--model {name}: {exc}") from exc
    entry = REGISTRY.get(name)
    try:
        return load_checkpoint(path, device=args.device, build=entry.build if entry else None)
    except WeightsError as exc:  # a download that cannot load (removed) or whose file was swapped
        raise CommandError(f"--model {name}: {exc}") from exc


def make_predictor(args: argparse.Namespace, model, info):
    """The predictor for `model` in --precision, its int8 weights kept in the cache between runs; a batch
    worker's low-precision encoders already prepared for this model are reused (`args.shared_encoders`,
    see cohort/worker.py)."""
    from ..engine.predictor import SamMed2DPredictor
    from ..weights.int8_weights import Int8WeightsFile

    return SamMed2DPredictor(model, precision=args.precision, int8_file=Int8WeightsFile.in_cache(info.sha256),
                             shared_encoders=getattr(args, "shared_encoders", None))  # fmt: skip


def _finite_or_none(value):
    """JSON has no NaN or infinity: such numbers become null (the report is strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def report_json(report: dict) -> str:
    """The report as strict JSON (`allow_nan=False`; non-finite numbers are written as null)."""
    return json.dumps(_finite_or_none(report), indent=2, allow_nan=False)


def earlier_provenance(out: Path) -> list:
    """Runs recorded in the file being updated, so its other segments keep their provenance."""
    from ..mrml.segmentations import read_segmentation_provenance

    try:
        return read_segmentation_provenance(out)
    except ValueError as exc:
        print(f"warning: {out.name}: {exc}; its earlier provenance is not carried over", file=sys.stderr)
        return []


def dicom_source(args: argparse.Namespace, volume) -> list:
    """The source series for --dicom-seg (as read with the volume, now held to what a SEG needs), checked
    against the volume before any work is done."""
    from ..formats.dicom.series import check_series_grid, sort_series_datasets

    if not volume.dicom_files:
        raise CommandError(
            "--dicom-seg needs --volume to be a folder holding the DICOM series the SEG will reference "
            f"({args.volume} is not one)"
        )
    datasets = sort_series_datasets(volume.dicom_datasets)
    check_series_grid(datasets, volume.array_kji.shape, volume.ijk_to_ras)
    return datasets

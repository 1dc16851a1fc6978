"""`python -m SAMMed2DSegmentLib batch`: every case of a manifest through `segment`'s own path (its checks,
session and output plan), on Dask, the model loaded once per worker. The options and files are a contract:

    batch --manifest cases.csv --out-dir OUT [--scheduler tcp://HOST:PORT | --workers N]
        [--threads-per-worker T] [--model NAME | --checkpoint FILE] [--precision ...]
        [--embedding-cache DIR] [--resume] [--dicom-seg]

Per case OUT/<case>/<case>.seg.nrrd, OUT/<case>/report.json (the segment report, plus the batch record:
resume digest, worker, model loads) and with --dicom-seg OUT/<case>/<case>-seg.dcm; each case folder appears
whole when the case is done, or not at all. Then OUT/summary.csv and OUT/summary.json. Exit status 0 when
every case is done or skipped, 1 when any failed (the others complete), 2 for a bad manifest or options
(one line, nothing written).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from ..cohort.cluster import placement
from ..cohort.digest import case_digest
from ..cohort.folders import REPORT, case_files, case_folders, is_ours, remove_stale
from ..cohort.manifest import Case, manifest_inputs, read_manifest, require_prompt
from ..cohort.model_file import model_argv, model_file_sha256
from ..cohort.runner import run_cohort
from ..cohort.summary import COLUMNS, SUMMARY_CSV, SUMMARY_JSON, counts, skipped_row, write_summary
from ..cohort.worker import CaseOutcome, CaseTask
from .common import (
    EXIT_SOME_FAILED,
    CommandError,
    OutputError,
    add_cluster_options,
    add_model_options,
    cohort_errors,
    os_reason,
    planned,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "batch", help="segment every case of a manifest on Dask (a local cluster or an existing one)"
    )
    p.add_argument("--manifest", required=True, help="CSV: case, volume, include, exclude, roi, "
                   "segment_name, axis, propagate (paths relative to the manifest's folder)")  # fmt: skip
    p.add_argument("--out-dir", required=True, help="OUT/<case>/ per case, OUT/summary.csv and .json")
    add_cluster_options(p)
    add_model_options(p)
    p.add_argument("--embedding-cache", metavar="DIR", help="slice embeddings on disk, shared by the workers")
    p.add_argument(
        "--resume", action="store_true",
        help="skip cases whose outputs exist and whose row, inputs and model are unchanged",
    )  # fmt: skip
    p.add_argument("--dicom-seg", action="store_true", help="also OUT/<case>/<case>-seg.dcm (DICOM inputs)")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    p.set_defaults(run_command=run_batch, summarize=summary, exit_status=exit_status)


def _segment_argv(case: Case, args: argparse.Namespace, folder: Path) -> list[str]:
    """`segment`'s options for a case: its row (empty cells keep segment's defaults) and the run's model."""
    argv = ["--volume", str(case.file("volume"))]
    for column in ("include", "exclude", "roi"):
        for path in case.files.get(column, ()):
            argv += [f"--{column}", str(path)]
    for column in ("segment_name", "axis", "propagate"):
        if case.cell(column):
            argv += [f"--{column.replace('_', '-')}", case.cell(column)]
    argv += model_argv(args.checkpoint, args.model, args.device, args.precision)
    if args.embedding_cache:
        argv += ["--embedding-cache", str(Path(args.embedding_cache).resolve())]
    argv += ["--out", str(folder / f"{case.name}.seg.nrrd"), "--quiet"]
    if args.dicom_seg:
        argv += ["--dicom-seg", str(folder / f"{case.name}-seg.dcm")]
    return argv


def _recorded_digest(folder: Path) -> str | None:
    try:
        return json.loads((folder / REPORT).read_text(encoding="utf-8"))["batch"]["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _skipped(cases: list[Case], out_dir: Path, digests: dict[str, str], dicom_seg: bool) -> dict[str, dict]:
    """--resume: the cases whose outputs are all there and whose recorded digest is today's."""
    skipped = {}
    for case in cases:
        final = out_dir / case.name
        outputs = [n for n in case_files(case.name) if dicom_seg or not n.endswith(".dcm")]
        if all((final / n).is_file() for n in outputs) and _recorded_digest(final) == digests[case.name]:
            skipped[case.name] = skipped_row(case.name)
    return skipped


def _check_case_folders(cases: list[Case], out_dir: Path) -> None:
    """An existing OUT/<case> is replaced only when a batch made it; no input may live inside one."""
    folders = [(out_dir / c.name).resolve() for c in cases]
    for case in cases:
        final = out_dir / case.name
        if final.exists() and not (final.is_dir() and is_ours(final, case.name)):
            raise CommandError(
                f"{final} exists and is not a batch case folder; it is not replaced (move it, or choose "
                "another --out-dir)"
            )
        for paths in case.files.values():
            for path in paths:
                if any(path.resolve().is_relative_to(f) for f in folders):
                    raise CommandError(f"case {case.name}: input {path} is inside a case folder of --out-dir")


def run_batch(args: argparse.Namespace) -> dict:
    """Check everything (manifest, options, outputs), decide the skips, then run the rest on Dask."""
    with cohort_errors():
        where = placement(args.scheduler, args.workers, args.threads_per_worker)
        cases = read_manifest(args.manifest, ("case", "volume"))
        require_prompt(cases, args.manifest)
    out_dir = Path(args.out_dir).absolute()  # workers elsewhere have another working folder
    if out_dir.exists() and not out_dir.is_dir():
        raise CommandError(f"--out-dir {out_dir} is not a folder")
    summaries = [("summary.csv", out_dir / "summary.csv", SUMMARY_CSV),
                 ("summary.json", out_dir / "summary.json", SUMMARY_JSON)]  # fmt: skip
    plan = planned(summaries, manifest_inputs(args.manifest, cases), missing_folders_ok=True)
    _check_case_folders(cases, out_dir)
    with cohort_errors():
        model_sha256 = model_file_sha256(args.checkpoint, args.model, args.download)
    options = {"precision": args.precision, "device": args.device, "dicom_seg": bool(args.dicom_seg)}
    digests = {case.name: case_digest(case, model_sha256, options) for case in cases}
    out_dir.mkdir(parents=True, exist_ok=True)
    with plan.lock("summary.json", quiet=args.quiet):  # another run may be writing these case folders
        rows = _skipped(cases, out_dir, digests, args.dicom_seg) if args.resume else {}
        to_run = [c for c in cases if c.name not in rows]
        remove_stale(out_dir)
        with case_folders(out_dir) as folders:

            def tasks() -> Iterator[CaseTask]:
                for case in to_run:
                    folder = folders.make(case.name)
                    final = out_dir / case.name
                    yield CaseTask(
                        case=case.name, command="segment", argv=tuple(_segment_argv(case, args, folder)),
                        model_sha256=model_sha256, report=str(folder / REPORT),
                        batch={"digest": digests[case.name], "manifest_line": case.line},
                        final={"output": str(final / f"{case.name}.seg.nrrd"),
                               "dicom_seg": str(final / f"{case.name}-seg.dcm") if args.dicom_seg else None},
                        torch_threads=where.torch_threads,
                    )  # fmt: skip

            def finished(task: CaseTask, outcome: CaseOutcome) -> None:
                if outcome.status == "done":
                    try:
                        folders.place(task.case)
                    except OSError as exc:
                        outcome.status, outcome.reason = (
                            "failed",
                            f"cannot put it in place ({os_reason(exc)})",
                        )
                else:
                    folders.discard(task.case)
                rows[task.case] = {k: getattr(outcome, k) for k in COLUMNS}

            def kept() -> str:
                done = sum(r["status"] == "done" for r in rows.values())
                return f"{done} finished case(s) kept in {out_dir}, unfinished ones left nothing (--resume)"

            if to_run:
                with cohort_errors(kept):
                    run_cohort(where, tasks(), len(cases), len(cases) - len(to_run), finished, args.quiet)
        ordered = [{c: rows[case.name].get(c, "") for c in COLUMNS} for case in cases]
        try:
            write_summary(out_dir / "summary.csv", out_dir / "summary.json", ordered,
                          {"manifest": str(args.manifest), "model_sha256": model_sha256})  # fmt: skip
        except OSError as exc:
            raise OutputError(
                f"cannot write the summary ({os_reason(exc)}); the case folders are kept"
            ) from None
    return {"out_dir": str(out_dir), "counts": counts(ordered), "cases": ordered}


def summary(result: dict) -> str:
    n = result["counts"]
    return (
        f"{n['done']} done, {n['failed']} failed, {n['skipped']} skipped; summary in "
        f"{Path(result['out_dir']) / 'summary.csv'}"
    )


def exit_status(result: dict) -> int:
    return EXIT_SOME_FAILED if result["counts"]["failed"] else 0

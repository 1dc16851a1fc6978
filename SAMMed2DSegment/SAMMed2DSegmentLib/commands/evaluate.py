"""`python -m SAMMed2DSegmentLib evaluate`: an interactive protocol on a volume with a reference label map,
written as one JSON file: `clicks` (`evaluation/protocol.py`, SAM-Med2D's 2-D test: a first prompt and
corrective clicks on every slice) or `cvpr25` (`evaluation/cvpr25.py`, the CVPR 2025 interactive 3-D
challenge run through box, propagation and corrections). The options are a contract: automated checks call
them.

    evaluate --volume CT --labels LABELS --label-value N [--axis axial] [--model NAME | --checkpoint FILE]
        [--precision ...] --protocol clicks|cvpr25 --max-clicks 5 [--first box|point] --json OUT.json
        [--save-masks DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..engine.geometry import AXES
from ..evaluation.protocol import FIRST_PROMPTS
from .common import (
    EXIT_SOME_FAILED,
    CommandError,
    OutputError,
    add_cluster_options,
    add_model_options,
    cohort_errors,
    intensity_rule,
    intensity_window,
    load_model,
    make_predictor,
    os_reason,
    planned,
)

MAX_CLICKS_LIMIT = 50
PROTOCOLS = ("clicks", "cvpr25")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="interactive accuracy (first prompt + corrective clicks) against a reference label"
    )
    p.add_argument("--volume", help="volume file, or a folder with one DICOM series")
    p.add_argument("--labels", help="integer label map on the volume's grid")
    p.add_argument("--label-value", type=int, help="the structure's value in --labels")
    p.set_defaults(run_command=run_evaluate, summarize=summary)
    p.add_argument("--axis", default="axial", choices=AXES)
    add_model_options(p)
    p.add_argument("--window", default="auto",
                   help="'auto' (the model's own rule), a preset name, or LEVEL,WIDTH")  # fmt: skip
    p.add_argument("--protocol", default="clicks", choices=PROTOCOLS,
                   help="clicks: a first prompt, then corrective clicks, on every slice (default); cvpr25: "
                        "the CVPR 2025 interactive challenge (box on the middle slice, propagation, 3-D "
                        "corrective clicks)")  # fmt: skip
    p.add_argument("--first", default="box", choices=FIRST_PROMPTS,
                   help="first prompt: the label's box (default) or its deepest point")  # fmt: skip
    p.add_argument("--max-clicks", type=int, default=5, help="corrective clicks after the first prompt")
    p.add_argument("--min-pixels", type=int, default=1,
                   help="score slices with at least this many label pixels (default 1: all)")  # fmt: skip
    p.add_argument("--json", required=True, help="output JSON file (with --manifest: the summary)")
    p.add_argument("--save-masks", metavar="DIR",
                   help="cvpr25: the final mask as DIR/<json name>.seg.nrrd (DIR is made)")  # fmt: skip
    p.add_argument(
        "--manifest",
        help="CSV of cases (case, volume, labels, label_value[, axis, "
        "segment_name]), run on Dask instead of --volume/--labels/--label-value",
    )
    p.add_argument("--resume", action="store_true",
                   help="with --manifest: keep the results of cases whose row, inputs, model and options are "
                        "unchanged since they were evaluated")  # fmt: skip
    add_cluster_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run_evaluate(args: argparse.Namespace) -> dict:
    """Check every input and the output path first, then run; the JSON is written atomically at the end."""
    if args.manifest:
        return _run_manifest(args)
    if args.volume is None or args.labels is None or args.label_value is None:
        raise CommandError("evaluate needs --volume, --labels and --label-value, or --manifest")
    if args.scheduler or args.workers or args.threads_per_worker or args.resume:
        raise CommandError("--scheduler, --workers, --threads-per-worker and --resume go with --manifest")
    from ..outputs import SEGMENTATION, Kind, input_files, json_with

    if not 0 <= args.max_clicks <= MAX_CLICKS_LIMIT:
        raise CommandError(f"--max-clicks must be within 0..{MAX_CLICKS_LIMIT}, got {args.max_clicks}")
    if args.min_pixels < 1:
        raise CommandError(f"--min-pixels must be ≥ 1, got {args.min_pixels}")
    if not str(args.json).lower().endswith(".json"):
        raise CommandError(f"--json must name a .json file, got {args.json}")
    inputs = input_files("--volume", args.volume) + input_files("--labels", args.labels)
    if args.checkpoint:
        inputs += input_files("--checkpoint", args.checkpoint)
    mask_file = saved_mask_path(args)
    outputs = [("--json", args.json, Kind("an evaluation result", json_with("volume", "protocol")))]
    plan = planned(outputs, inputs)
    if mask_file is not None:  # the JSON's folder must exist; the masks' folder is made once the plan passes
        plan = planned([*outputs, ("--save-masks", mask_file, SEGMENTATION)], inputs, missing_folders_ok=True)
        try:
            mask_file.parent.mkdir(exist_ok=True)
        except OSError as exc:
            raise CommandError(f"--save-masks: cannot make {mask_file.parent} ({exc.strerror})") from None
    with plan.lock("--save-masks", quiet=args.quiet):
        return _evaluate_planned(args, mask_file)


def saved_mask_path(args: argparse.Namespace) -> Path | None:
    """Where --save-masks puts the final mask: DIR/<name of the JSON>.seg.nrrd."""
    folder = _save_masks_folder(args)
    return mask_file_in(folder, args.json) if folder is not None else None


def _save_masks_folder(args: argparse.Namespace) -> Path | None:
    """The --save-masks folder, checked: a folder, or one that can be made in an existing folder."""
    if not args.save_masks:
        return None
    if args.protocol != "cvpr25":
        raise CommandError("--save-masks needs --protocol cvpr25 (the clicks protocol has no one final mask)")
    folder = Path(args.save_masks)
    if folder.exists() and not folder.is_dir():
        raise CommandError(f"--save-masks {folder} is not a folder")
    if not folder.exists() and not folder.absolute().parent.is_dir():
        raise CommandError(f"--save-masks: the folder {folder.absolute().parent} does not exist")
    return folder


def mask_file_in(folder: str | Path, json_path: str | Path) -> Path:
    """The --save-masks file in `folder` for the result `json_path`: <folder>/<name of the JSON>.seg.nrrd."""
    return Path(folder) / f"{Path(json_path).name[: -len('.json')]}.seg.nrrd"


def _evaluate_planned(args: argparse.Namespace, mask_file: Path | None) -> dict:
    """The run, once the output plan passed (and while the mask file's lock is held)."""
    import numpy as np

    from ..engine.session import SegmentationSession
    from ..evaluation.cvpr25 import evaluate_cvpr25
    from ..evaluation.protocol import evaluate_structure
    from ..evaluation.saved_mask import check_existing
    from ..formats.volumes import read_labels_on_grid, read_volume
    from ..weights.checkpoint import CheckpointError

    t0 = time.perf_counter()
    try:
        volume = read_volume(args.volume)
        labels = read_labels_on_grid(args.labels, volume.array_kji.shape, volume.ijk_to_ras)
        truth = labels == args.label_value
        if not truth.any():
            present = ", ".join(str(v) for v in np.unique(labels[labels > 0])[:20])
            raise CommandError(
                f"--label-value {args.label_value} is not in {args.labels} (present: {present})"
            )
        if mask_file is not None and mask_file.exists() and mask_file.stat().st_size:
            check_existing(mask_file, volume.array_kji.shape, volume.ijk_to_ras)
        window = intensity_window(args.window, volume.array_kji, volume.modality, intensity_rule(args))
        model, info = load_model(args)
        predictor = make_predictor(args, model, info)
        session = SegmentationSession(
            predictor, model_sha256=info.sha256, intensity_rule=intensity_rule(args)
        )
        session.set_volume(volume.array_kji, volume.ijk_to_ras, volume.modality, window=window)
        engine = session.engine(args.axis)
        geometry = session.volume.geometry(args.axis)

        def progress(index: int, curve: list[float]) -> None:
            if not args.quiet:
                print(f"slice {index}: Dice " + " ".join(f"{v:.3f}" for v in curve), file=sys.stderr)

        if args.protocol == "cvpr25":
            result = evaluate_cvpr25(session, truth, args.axis, args.max_clicks)
        else:
            result = evaluate_structure(
                engine, geometry, volume.array_kji, truth, first=args.first, max_clicks=args.max_clicks,
                min_pixels=args.min_pixels, on_slice=progress,
            )  # fmt: skip
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        raise CommandError(str(exc)) from exc  # an unreadable --save-masks file included
    out = {
        "volume": str(args.volume),
        "labels": str(args.labels),
        "label_value": args.label_value,
        "axis": args.axis,
        "protocol": args.protocol,
        **({"first": args.first} if args.protocol == "clicks" else {}),
        "max_clicks": args.max_clicks,
        "model": {"build": info.build, "sha256": info.sha256, "precision": predictor.precision},
        "window": {"low": window.low, "high": window.high, "method": window.method},
        "seconds": round(time.perf_counter() - t0, 2),  # the whole run; cvpr25: the structure's protocol
        **result.as_json(),
    }
    _write(args, out, mask_file, getattr(result, "mask", None), volume.ijk_to_ras)
    return out


def _write(args: argparse.Namespace, out: dict, mask_file: Path | None, mask, ijk_to_ras) -> None:
    """The JSON and the saved mask, committed together (neither is replaced unless both are written)."""
    import json

    from ..evaluation.saved_mask import write_mask_segmentation
    from ..files import commit_outputs

    try:
        with commit_outputs() as outputs:
            outputs.path(args.json, suffix=".tmp.json").write_text(json.dumps(out, indent=1) + "\n",
                                                                   encoding="utf-8")  # fmt: skip
            if mask_file is not None:
                existing = mask_file if mask_file.exists() and mask_file.stat().st_size else None
                write_mask_segmentation(outputs.path(mask_file, suffix=".tmp.seg.nrrd"), mask, ijk_to_ras,
                                        f"label {args.label_value}", existing)  # fmt: skip
    except OSError as exc:
        raise OutputError(f"cannot write the outputs ({os_reason(exc)}); nothing written") from None
    except ValueError as exc:  # an existing --save-masks file that cannot be read or is on another grid
        raise CommandError(f"--save-masks: {exc}; nothing written") from None


def summary(out: dict) -> str:
    """The line a finished run prints on stderr."""
    if out["protocol"] == "cvpr25":
        steps = " ".join(f"{v:.3f}" for v in out["dsc_per_step"])
        kinds = [c["label"] for c in out["clicks"]]
        return (f"DSC per step {steps}; DSC AUC {out['dsc_auc']:.3f}, NSD AUC {out['nsd_auc']:.3f}; "
                f"final DSC {out['final_dsc']:.3f}, NSD {out['final_nsd']:.3f}; "
                f"clicks {kinds.count('fg')} fg, {kinds.count('bg')} bg")  # fmt: skip
    curve = " ".join(f"{v:.3f}" for v in out["dice_per_click"])
    base = out["baseline"]
    return (
        f"Dice per click {curve}; AUC {out['dice_auc']:.3f}, final {out['final_dice']:.3f}; propagation "
        f"{out['propagation_dice']:.3f}; region grow {base['dice']:.3f} per slice, "
        f"{base['propagation_dice']:.3f} in 3-D"
    )


def _run_manifest(args: argparse.Namespace) -> dict:
    """`evaluate --manifest cases.csv --json OUT.json`: `evaluate` once per row on Dask, as `batch` runs
    `segment` (cohort/evaluation.py says what each case gets). Writes OUT/<case>.json per case (OUT: --json
    without .json; with the case's resume digest), then OUT.json (cases, and per structure the mean and
    spread of every score, kept cases' included) and OUT.csv (the per-structure table). Exit status 1 when
    any case failed."""
    from ..cohort.cluster import placement
    from ..cohort.digest import case_digest
    from ..cohort.evaluation import (
        EVALUATION_SUMMARY,
        EVALUATION_TABLE,
        case_folder,
        forwarded_argv,
        kept_result,
        structure_name,
        write_evaluation,
    )
    from ..cohort.manifest import manifest_inputs, read_manifest
    from ..cohort.model_file import model_argv, model_file_sha256
    from ..cohort.runner import run_cohort
    from ..cohort.summary import COLUMNS, counts, per_structure, skipped_row
    from ..cohort.worker import CaseTask

    args.summarize, args.exit_status = _manifest_summary, _manifest_exit_status
    for option in ("volume", "labels", "label_value"):
        if getattr(args, option) is not None:
            raise CommandError(f"--manifest replaces --{option.replace('_', '-')}: give one or the other")
    out = Path(args.json).absolute()  # workers elsewhere have another working folder
    if out.suffix.lower() != ".json":
        raise CommandError(f"--json must name a .json file, got {out.name}")
    with cohort_errors():
        where = placement(args.scheduler, args.workers, args.threads_per_worker)
        cases = read_manifest(args.manifest, ("case", "volume", "labels", "label_value"))
        outputs = [("--json", out, EVALUATION_SUMMARY), ("table", out.with_suffix(".csv"), EVALUATION_TABLE)]
        plan = planned(outputs, manifest_inputs(args.manifest, cases))
        model_sha256 = model_file_sha256(args.checkpoint, args.model, args.download)
    cases_dir = out.with_suffix("")
    if cases_dir.exists() and not cases_dir.is_dir():
        raise CommandError(f"{cases_dir} (the per-case folder beside --json) exists and is not a folder")
    masks_dir = _save_masks_folder(args)  # DIR/<case> per case (`forwarded_argv`): DIR is made here
    model = model_argv(args.checkpoint, args.model, args.device, args.precision)
    rows: dict[str, dict] = {}
    results: dict[str, dict] = {}

    def plan_cases() -> list[CaseTask]:
        """The tasks to run; with --resume the kept cases' rows and results instead (decided under the
        --json lock: another run may be writing these results)."""
        tasks = []
        for case in cases:
            options = forwarded_argv(vars(args), case.name)
            digest = case_digest(case, model_sha256, {"model": model, "options": options})
            result = cases_dir / f"{case.name}.json"
            mask = mask_file_in(case_folder(args.save_masks, case.name), result) if args.save_masks else None
            if args.resume and (kept := kept_result(result, digest, mask)) is not None:
                rows[case.name] = skipped_row(case.name)
                results[case.name] = kept
                continue
            argv = ["--volume", str(case.file("volume")), "--labels", str(case.file("labels")),
                    "--label-value", case.cell("label_value"), *model, *options, "--json", str(result),
                    "--quiet"]  # fmt: skip
            argv += ["--axis", case.cell("axis")] if case.cell("axis") else []
            tasks.append(CaseTask(case.name, "evaluate", tuple(argv), model_sha256, report=str(result),
                                  batch={"digest": digest, "manifest_line": case.line},
                                  torch_threads=where.torch_threads))  # fmt: skip
        return tasks

    def finished(task: CaseTask, outcome) -> None:
        rows[task.case] = {k: getattr(outcome, k) for k in COLUMNS}
        if outcome.status == "done" and outcome.result is not None:
            results[task.case] = outcome.result

    cases_dir.mkdir(exist_ok=True)
    if masks_dir is not None:
        try:
            masks_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise CommandError(f"--save-masks: cannot make {masks_dir} ({exc.strerror})") from None
    with plan.lock("--json", quiet=args.quiet):
        tasks = plan_cases()
        if tasks:
            with cohort_errors(lambda: f"{len(results)} case result(s) in {cases_dir} (--resume keeps them)"):
                run_cohort(where, tasks, len(cases), len(cases) - len(tasks), finished, args.quiet)
        ordered = [{**{k: rows[c.name].get(k, "") for k in COLUMNS}, "structure": structure_name(c.row)}
                   for c in cases]  # fmt: skip
        scored = [(structure_name(c.row), results[c.name]) for c in cases if c.name in results]
        structures = per_structure(scored)
        document = {"manifest": str(args.manifest), "protocol": args.protocol, "counts": counts(ordered),
                    "structures": structures, "cases": ordered}  # fmt: skip
        try:
            write_evaluation(out, out.with_suffix(".csv"), document)
        except OSError as exc:
            message = f"cannot write {out} ({os_reason(exc)}); the per-case results are kept"
            raise OutputError(message) from None
    return document


def _manifest_summary(document: dict) -> str:
    n = document["counts"]
    return (f"evaluated {n['done']} case(s), {n['failed']} failed, {n['skipped']} kept from an earlier run; "
            "per-structure table beside the --json file")  # fmt: skip


def _manifest_exit_status(document: dict) -> int:
    return EXIT_SOME_FAILED if document["counts"]["failed"] else 0

"""`python -m SAMMed2DSegmentLib segment`: a structure in a volume from markups prompts, for batch work and
`make demo`.

Everything is validated before anything is written: one output plan (no output may be an input or another
output, links included), the inputs, an existing `OUT.seg.nrrd`, and then the model's results. All outputs are
written to temporary files beside their targets and renamed only when every one is complete, so a failure or
an interruption (Ctrl-C, SIGTERM) changes none of them. An existing `OUT.seg.nrrd` is updated (other segments
and untouched slices kept), never replaced. Exit status: 2 and one line on stderr for bad input, 1 and one
line when an output cannot be written (disk full), 130 (SIGINT), 143 (SIGTERM) or 129 (SIGHUP) when
interrupted.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from ..engine.geometry import AXES
from ..engine.propagation import DIRECTIONS, PropagationSettings
from ..files import commit_outputs, same_file
from ..outputs import DICOM_SEG, SEGMENT_REPORT, SEGMENTATION, STDOUT, OutputPlan, input_files
from .common import (
    CommandError,
    Interrupted,
    OutputError,
    add_model_options,
    dicom_source,
    earlier_provenance,
    intensity_rule,
    intensity_window,
    load_model,
    make_predictor,
    os_reason,
    planned,
    report_json,
)


def add_parser(subparsers) -> None:
    seg = subparsers.add_parser("segment", help="segment a structure in a volume from markups prompts")
    seg.set_defaults(run_command=run_segment, summarize=summary)
    seg.add_argument(
        "--volume", required=True, help=".nrrd/.nii(.gz)/.mha file, or a folder with one DICOM series"
    )
    seg.add_argument("--include", action="append", default=[], help="Slicer markups JSON of include points")
    seg.add_argument(
        "--exclude",
        action="append",
        default=[],
        help="Slicer markups JSON of exclude points; on a slice with no include point or box they correct "
        "the segment --out already holds there",
    )
    seg.add_argument("--roi", action="append", default=[], help="Slicer markups JSON of an ROI (box)")
    add_model_options(seg)
    seg.add_argument("--axis", default="axial", choices=AXES)
    seg.add_argument(
        "--propagate",
        choices=DIRECTIONS,
        help="walk from the prompted slices (default: both; none where every prompted slice holds only "
        "exclude points, a correction of the segment in --out)",
    )
    seg.add_argument("--segment-name", default="SAM-Med2D")
    seg.add_argument(
        "--window",
        default="auto",
        help="intensity window: 'auto' (the model's own rule; SA-Med2D-20M's percentile 0.5–99.5 rule for "
        "every registry model), a preset name, or LEVEL,WIDTH (e.g. 40,400)",
    )
    seg.add_argument(
        "--iou-threshold",
        type=float,
        default=PropagationSettings.iou_threshold,
        help="stop propagating below this predicted IoU",
    )
    seg.add_argument(
        "--overwrite-low-confidence",
        action="store_true",
        help="let a prompted slice below --iou-threshold replace voxels the segment already has there",
    )
    seg.add_argument("--cache-mb", type=int, default=1024, help="embedding cache bound in MB")
    seg.add_argument(
        "--embedding-cache",
        metavar="DIR",
        help="keep slice embeddings in DIR across runs (keyed by voxels, axis, window, model, precision)",
    )
    seg.add_argument(
        "--embedding-cache-mb", type=int, default=2048, help="bound of the --embedding-cache folder in MB"
    )
    seg.add_argument(
        "--out", required=True, help="output .seg.nrrd (updated if it exists; a symlink is written through)"
    )
    seg.add_argument("--dicom-seg", help="also write a DICOM-SEG file")
    seg.add_argument(
        "--report", help="write a JSON report (per-slice IoU, area, status, timings); - for standard output"
    )
    seg.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _input_files(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """Every file the run reads, with the role it plays (for the collision message)."""
    inputs = input_files("--volume", args.volume)
    for option in ("include", "exclude", "roi"):
        inputs += [(f"--{option}", Path(f)) for f in getattr(args, option)]
    if args.checkpoint:
        inputs.append(("--checkpoint", Path(args.checkpoint)))
    return inputs


def _check_outputs(args: argparse.Namespace) -> OutputPlan:
    out = Path(args.out)
    if out.is_dir():
        raise CommandError(f"--out {out} is a folder; give a file name ending in .seg.nrrd")
    if not out.name.endswith(".seg.nrrd"):
        raise CommandError(f"--out must end in .seg.nrrd, got {out.name}")
    if args.dicom_seg and not args.dicom_seg.lower().endswith(".dcm"):
        raise CommandError(f"--dicom-seg must end in .dcm, got {Path(args.dicom_seg).name}")
    outputs = [("--out", args.out, SEGMENTATION), ("--dicom-seg", args.dicom_seg, DICOM_SEG),
               ("--report", args.report, SEGMENT_REPORT)]  # fmt: skip
    plan = planned(outputs, _input_files(args))
    volume = Path(args.volume)
    if args.dicom_seg and volume.is_dir() and same_file(Path(args.dicom_seg).resolve().parent, volume):
        # Refused rather than recognised later: a SEG beside its source is read as part of the folder by
        # other tools (and by GDCM-based readers as a second series).
        raise CommandError(
            f"--dicom-seg {args.dicom_seg} is inside the source DICOM folder {volume}; write it elsewhere "
            "(one series per folder)"
        )
    if not 0.0 <= args.iou_threshold <= 1.0:
        raise CommandError(f"--iou-threshold must be within 0..1, got {args.iou_threshold}")
    if args.cache_mb < 0:
        raise CommandError(f"--cache-mb must be ≥ 0, got {args.cache_mb}")
    return plan


def _load_prompts(hs, args: argparse.Namespace):
    from ..mrml import markups

    points, rois = [], []
    for option, files, label in (("--include", args.include, 1), ("--exclude", args.exclude, 0)):
        for f in files:
            for node in markups.load_markups(hs, f):
                if node.IsA("vtkMRMLMarkupsROINode"):
                    raise CommandError(f"{option} {f} holds an ROI, not points; pass it with --roi")
                points += markups.points_from_markups(node, label)
    for f in args.roi:
        nodes = [n for n in markups.load_markups(hs, f) if n.IsA("vtkMRMLMarkupsROINode")]
        if not nodes:
            raise CommandError(f"--roi {f}: the file holds no ROI")
        rois += [markups.roi_from_node(n) for n in nodes]
    if not points and not rois:
        raise CommandError("no prompt: give --include points and/or an --roi (empty or unplaced markups?)")
    return points, rois


def _masks_to_refine(by_slice, seg_node, segment_name: str, volume_node, geometry, out: Path) -> dict:
    """The segment's masks on the slices whose prompts are exclude points only: there the points correct
    the segment the file already holds (`engine.prompts.masks_to_correct`), as a negative click does in the
    module. A correction needs that segment in --out."""
    from ..engine.prompts import masks_to_correct
    from ..mrml import segmentations

    slices = sorted(index for index, prompt in by_slice.items() if not prompt.has_include)
    if not slices:
        return {}
    segment_id = seg_node.GetSegmentation().GetSegmentIdBySegmentName(segment_name)
    if not segment_id:
        where = f"--out {out.name} holds no segment '{segment_name}'"
        raise CommandError(
            f"slice(s) {', '.join(map(str, slices))} have only exclude points, which correct an existing "
            f"segment, but {where if out.exists() else f'--out {out.name} does not exist yet'}: give its "
            "--segment-name, or add an include point or a box"
        )
    voxels = segmentations.segment_array(seg_node, segment_id, volume_node)
    return masks_to_correct(by_slice, lambda index: geometry.view(voxels, index))


def _check_finite_results(result) -> None:
    """Non-finite logits or IoU mean a broken model (or numerics): nothing of such a run may be written."""
    for index, outcome in sorted(result.slices.items()):
        logits_ok = outcome.low_res is None or bool(np.isfinite(outcome.low_res).all())
        if not (math.isfinite(outcome.predicted_iou) and logits_ok):
            raise CommandError(
                f"the model returned NaN or infinity on slice {index} (damaged checkpoint or numerical "
                "failure); nothing written"
            )


def _keep_out_low_confidence(masks: dict, result, existing_voxels, geometry, threshold: float) -> list[dict]:
    """Drop prompted slices below `threshold` whose slice of the segment already holds voxels: a doubtful
    result must not replace a good one unless --overwrite-low-confidence says so. The slices propagated from
    a dropped one go too (they were judged against it). Returns what was dropped."""
    kept_out = []
    for index, outcome in sorted(result.slices.items()):
        if outcome.status != "prompted" or outcome.predicted_iou >= threshold or index not in masks:
            continue
        if not geometry.view(existing_voxels, index).any():
            continue  # nothing to lose: an empty slice takes the result, as before
        del masks[index]
        kept_out.append({"index": index, "predicted_iou": round(outcome.predicted_iou, 4)})
    dropped = {entry["index"] for entry in kept_out}
    for walk in result.walks:
        if walk.seed not in dropped:
            continue
        for index in range(walk.seed + walk.step, walk.last_accepted + walk.step, walk.step):
            if masks.pop(index, None) is not None:
                outcome = result.slices[index]
                kept_out.append({"index": index, "predicted_iou": round(outcome.predicted_iou, 4),
                                 "propagated_from": walk.seed})  # fmt: skip
    return kept_out


def _kept_out_message(kept_out: list[dict], threshold: float, segment_name: str) -> str:
    prompted = [k for k in kept_out if "propagated_from" not in k]
    slices = ", ".join(f"{k['index']} (IoU {k['predicted_iou']:.2f})" for k in prompted)
    walked = len(kept_out) - len(prompted)
    also = f" with the {walked} slice(s) propagated from them" if walked else ""
    return (
        f"prompted slice(s) {slices} below --iou-threshold {threshold:.2f} kept out{also}: segment "
        f"'{segment_name}' already has voxels there (--overwrite-low-confidence writes them)"
    )


def _provenance(points, rois, info, args: argparse.Namespace, outcomes, window, precision: str, refined):
    """What a reviewer needs to re-run the case: model and hash, prompts, per-slice confidence, window,
    precision, and the slices corrected from the segment as it was."""
    from ..formats.provenance import build_provenance

    return build_provenance(
        points, rois, outcomes, model=f"SAM-Med2D {info.build}", model_sha256=info.sha256,
        axis=args.axis, propagate=args.propagate, segment=args.segment_name, window=(window.low, window.high),
        precision=precision, window_method=window.method, refined=refined,
    )  # fmt: skip


def run_segment(args: argparse.Namespace) -> dict:
    """`segment`: the output plan is checked, then the run holds the lock beside --out from reading the
    existing file to the final rename, so two runs updating one file take turns and both segments stay."""
    plan = _check_outputs(args)
    with plan.lock("--out", quiet=args.quiet):
        return _segment_locked(args)


def _segment_locked(args: argparse.Namespace) -> dict:
    from ..engine.geometry import SliceGeometry
    from ..engine.prompts import prompts_by_slice
    from ..engine.session import SegmentationSession
    from ..formats.volumes import read_volume
    from ..mrml import scene, segmentations, volumes

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out = Path(args.out)
    try:
        # Everything is read and checked before the (slow) segmentation, and before anything is written.
        volume = read_volume(args.volume)
        timings["read_volume_s"] = time.perf_counter() - t0
        hs = scene.create_headless_scene()
        points, rois = _load_prompts(hs, args)
        geometry = SliceGeometry.create(volume.array_kji.shape, volume.ijk_to_ras, args.axis)
        by_slice = prompts_by_slice(geometry, points, rois)  # off-volume points and the per-slice limit
        if args.propagate is None:  # a correction changes its slices only, unless a walk is asked for
            args.propagate = "none" if all(not p.has_include for p in by_slice.values()) else "both"
        # An empty --out holds nothing (the output plan lets it be replaced): it is written as a new file.
        existing = segmentations.load_segmentation(hs, out) if out.exists() and out.stat().st_size else None
        earlier = earlier_provenance(out) if existing is not None else []
        datasets = dicom_source(args, volume) if args.dicom_seg else None
        volume_node = volumes.add_volume_from_array(hs, volume.array_kji, volume.ijk_to_ras, "volume")
        seg_node = segmentations.ensure_segmentation(hs, volume_node, existing)
        if existing is not None:
            segmentations.check_segments_on_grid(seg_node, volume_node, out.name)
        to_correct = _masks_to_refine(by_slice, seg_node, args.segment_name, volume_node, geometry, out)
        window = intensity_window(args.window, volume.array_kji, volume.modality, intensity_rule(args))
        t = time.perf_counter()
        model, info = load_model(args)
        timings["load_model_s"] = time.perf_counter() - t
        settings = PropagationSettings(iou_threshold=args.iou_threshold)
        t = time.perf_counter()
        predictor = make_predictor(args, model, info)
        timings["precision_s"] = time.perf_counter() - t
        choice = predictor.precision_choice
        if not args.quiet:
            print(f"encoder precision: {choice.precision} ({choice.reason})", file=sys.stderr)
        t = time.perf_counter()
        disk = None
        if args.embedding_cache:
            from ..engine.disk_cache import DiskEmbeddingCache

            disk = DiskEmbeddingCache(args.embedding_cache, args.embedding_cache_mb << 20)
        session = SegmentationSession(predictor, cache_bytes=args.cache_mb << 20, disk_cache=disk,
                                      model_sha256=info.sha256)  # fmt: skip
        session.set_volume(volume.array_kji, volume.ijk_to_ras, volume.modality, window=window)
        walk = session.propagate(points, rois, args.axis, args.propagate, settings, current_masks=to_correct)
        for outcome in walk:
            if not args.quiet:
                print(
                    f"slice {outcome.index}: {outcome.status} IoU {outcome.predicted_iou:.2f} "
                    f"area {outcome.area_px} px {outcome.reason}",
                    file=sys.stderr,
                )
        seg = session.last
        timings["propagation_s"] = time.perf_counter() - t
    except (ValueError, FileNotFoundError) as exc:  # every input check raises a ValueError subclass
        raise CommandError(str(exc)) from exc
    if seg.geometry.obliquity_degrees > 1.0:
        print(
            f"warning: the volume is tilted {seg.geometry.obliquity_degrees:.1f}° from the {args.axis} view; "
            "slices follow the voxel grid",
            file=sys.stderr,
        )
    result = seg.result
    _check_finite_results(result)
    masks = result.masks()
    if not masks:
        raise CommandError("the model found nothing at the prompts (no slice accepted); nothing written")

    t = time.perf_counter()
    had_segment = bool(seg_node.GetSegmentation().GetSegmentIdBySegmentName(args.segment_name))
    segment_id = segmentations.ensure_segment(seg_node, args.segment_name)
    kept_out = []
    if not args.overwrite_low_confidence and had_segment:
        current = segmentations.segment_array(seg_node, segment_id, volume_node)
        kept_out = _keep_out_low_confidence(masks, result, current, seg.geometry, args.iou_threshold)
    if kept_out:
        message = _kept_out_message(kept_out, args.iou_threshold, args.segment_name)
        if not masks:
            raise CommandError(f"{message}; nothing written")
        print(f"warning: {message}", file=sys.stderr)
    segmentations.write_segment_slices(seg_node, segment_id, volume_node, seg.geometry, masks)
    provenance = _provenance(points, rois, info, args, result.slices.values(), window, choice.precision,
                             [i for i in to_correct if i in masks])  # fmt: skip
    report = _report(args, seg, info, window, segment_id, masks, kept_out, timings, choice, session.cache)
    try:
        with commit_outputs() as outputs:
            _write_outputs(args, outputs, seg_node, volume_node, datasets, info, provenance, earlier)
            timings["write_s"] = time.perf_counter() - t
            timings["encode_s"] = result.encode_seconds
            timings["decode_s"] = result.decode_seconds
            timings["total_s"] = time.perf_counter() - t0
            report["timings"] = {k: round(v, 4) for k, v in timings.items()}
            if args.report and args.report != STDOUT:
                report_file = outputs.path(args.report, suffix=".tmp.json")
                report_file.write_text(report_json(report), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write the outputs ({os_reason(exc)}); nothing written") from None
    except KeyboardInterrupt as exc:
        if outputs.committed:
            status = getattr(exc, "status", 130)
            raise Interrupted("interrupted after the outputs were written", status) from None
        raise
    if args.report == STDOUT:
        print(report_json(report), flush=True)
    return report


def _write_outputs(args, outputs, seg_node, volume_node, datasets, info, provenance, earlier) -> None:
    """Every output into its temporary file (renamed by the caller's `commit_outputs` once all are done)."""
    from ..mrml import segmentations
    from ..mrml.dicom_segmentations import export_dicom_seg

    segmentations.save_segmentation(
        seg_node, outputs.path(args.out, suffix=".tmp.seg.nrrd"), provenance.to_metadata(earlier)
    )
    if datasets is not None:
        by_segment = {p.segment: p for p in [*earlier, provenance]}  # the latest run on each segment
        try:
            export_dicom_seg(
                seg_node, volume_node, datasets, outputs.path(args.dicom_seg, suffix=".tmp.dcm"),
                info.sha256, f"SAM-Med2D {info.build}", provenance=by_segment,
            )  # fmt: skip
        except ValueError as exc:
            raise CommandError(f"--dicom-seg: {exc}") from exc


def _report(args, seg, info, window, segment_id, masks, kept_out, timings, choice, cache) -> dict:
    """The --report content (also returned by `run_segment`): per-slice IoU, area, status; walks; timings."""
    result = seg.result
    area_mm2 = seg.geometry.pixel_spacing[0] * seg.geometry.pixel_spacing[1]
    return {
        "volume": str(args.volume),
        "axis": args.axis,
        "propagate": args.propagate,
        "segment_name": args.segment_name,
        "segment_id": segment_id,
        "output": str(args.out),
        "dicom_seg": args.dicom_seg,
        "model": {"build": info.build, "source": info.source, "sha256": info.sha256},
        "window": {"low": window.low, "high": window.high, "method": window.method},
        "precision": {"requested": args.precision, "used": choice.precision, "reason": choice.reason},
        "seed_slices": sorted(seg.seeds),
        "obliquity_deg": round(seg.geometry.obliquity_degrees, 3),
        "slices": [
            {
                "index": o.index,
                "status": o.status,
                "predicted_iou": round(o.predicted_iou, 4),
                "confidence": round(o.confidence, 4),
                "area_px": o.area_px,
                "area_mm2": round(o.area_px * area_mm2, 2),
                "reason": o.reason,
                "written": o.index in masks,
            }
            for _, o in sorted(result.slices.items())
        ],
        "walks": [
            {
                "seed": w.seed,
                "direction": "up" if w.step == seg.geometry.normal_sign else "down",
                "last_slice": w.last_accepted,
                "stopped_because": w.reason,
            }
            for w in result.walks
        ],
        "slices_written": sorted(masks),
        "kept_out_low_confidence": kept_out,
        "encoded_slices": result.encoded_slices,
        "embedding_cache": None
        if cache.disk is None
        else {
            "dir": str(cache.disk.folder),
            "read": cache.disk.hits,
            "written": cache.disk.writes,
            "discarded": cache.disk.discarded,
        },  # fmt: skip
        "cancelled": result.cancelled,
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }


def summary(report: dict) -> str:
    """The line a finished run prints on stderr."""
    return (
        f"wrote {len(report['slices_written'])} slice(s) of segment '{report['segment_name']}' to "
        f"{report['output']} in {report['timings']['total_s']:.1f} s"
    )

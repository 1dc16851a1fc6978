"""The headless command line (`python -m SAMMed2DSegmentLib segment …`), for batch work and `make demo`.

Everything is validated before anything is written; outputs are written atomically, and an existing
`OUT.seg.nrrd` is updated (other segments and untouched slices kept), never replaced. On bad input the
command exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .engine.geometry import AXES
from .engine.propagation import DIRECTIONS, PropagationSettings
from .files import atomic_path

EXIT_BAD_INPUT = 2


class CommandError(Exception):
    """Bad input: reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m SAMMed2DSegmentLib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    seg = sub.add_parser("segment", help="segment a structure in a volume from markups prompts")
    seg.add_argument(
        "--volume", required=True, help=".nrrd/.nii(.gz)/.mha file, or a folder with one DICOM series"
    )
    seg.add_argument("--include", action="append", default=[], help="Slicer markups JSON of include points")
    seg.add_argument("--exclude", action="append", default=[], help="Slicer markups JSON of exclude points")
    seg.add_argument("--roi", action="append", default=[], help="Slicer markups JSON of an ROI (box)")
    model = seg.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", help="checkpoint file (official .pth, state dict, or .safetensors)")
    model.add_argument(
        "--model", help="model name from the registry: demo (bundled, the default) or sam-med2d_b"
    )
    seg.add_argument(
        "--download", action="store_true", help="download a registry model that is not in the cache yet"
    )
    seg.add_argument("--axis", default="axial", choices=AXES)
    seg.add_argument("--propagate", default="both", choices=DIRECTIONS)
    seg.add_argument("--segment-name", default="SAM-Med2D")
    seg.add_argument("--device", default="auto", choices=["cpu", "cuda", "mps", "auto"])
    seg.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="encoder arithmetic: fp32 is the exact, parity-tested path; auto takes bf16 where the CPU has "
        "bf16 instructions and it measured faster, bf16/fp16 on GPUs (default: auto)",
    )
    seg.add_argument(
        "--window",
        default="auto",
        help="intensity window: 'auto', a preset name, or LEVEL,WIDTH (e.g. 40,400)",
    )
    seg.add_argument(
        "--iou-threshold",
        type=float,
        default=PropagationSettings.iou_threshold,
        help="stop propagating below this predicted IoU",
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
    seg.add_argument("--out", required=True, help="output .seg.nrrd (updated if it exists)")
    seg.add_argument("--dicom-seg", help="also write a DICOM-SEG file")
    seg.add_argument("--report", help="write a JSON report (per-slice IoU, area, status, timings)")
    seg.add_argument("--quiet", action="store_true", help="no progress on stderr")
    from .finetune.training import add_parser as add_finetune_parser

    add_finetune_parser(sub)
    return parser


def _check_outputs(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if not out.name.endswith(".seg.nrrd"):
        raise CommandError(f"--out must end in .seg.nrrd, got {out.name}")
    for path in filter(None, [args.out, args.report, args.dicom_seg]):
        parent = Path(path).resolve().parent
        if not parent.is_dir():
            raise CommandError(f"output folder does not exist: {parent}")
        if not os.access(parent, os.W_OK):
            raise CommandError(f"output folder is not writable: {parent}")
    if args.dicom_seg and not args.dicom_seg.lower().endswith(".dcm"):
        raise CommandError(f"--dicom-seg must end in .dcm, got {Path(args.dicom_seg).name}")
    if not 0.0 <= args.iou_threshold <= 1.0:
        raise CommandError(f"--iou-threshold must be within 0..1, got {args.iou_threshold}")
    if args.cache_mb < 0:
        raise CommandError(f"--cache-mb must be ≥ 0, got {args.cache_mb}")


def _window(spec: str, volume: np.ndarray, modality: str | None):
    from .engine.intensity import PRESETS, IntensityWindow, default_window

    if spec == "auto":
        return default_window(volume, modality if modality in ("CT", "MR", "PT") else None)
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


def _write_json_atomic(path: Path, data: dict) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2))


def _load_prompts(hs, args: argparse.Namespace):
    from .mrml import markups

    points, rois = [], []
    for files, label in ((args.include, 1), (args.exclude, 0)):
        for f in files:
            for node in markups.load_markups(hs, f):
                points += markups.points_from_markups(node, label)
    for f in args.roi:
        nodes = [n for n in markups.load_markups(hs, f) if n.IsA("vtkMRMLMarkupsROINode")]
        if not nodes:
            raise CommandError(f"--roi {f}: the file holds no ROI")
        rois += [markups.roi_from_node(n) for n in nodes]
    if not points and not rois:
        raise CommandError("no prompt: give --include points and/or an --roi (empty or unplaced markups?)")
    return points, rois


def _model(args: argparse.Namespace):
    """--checkpoint FILE, else --model NAME from the weights registry, else the bundled demo model."""
    from .weights.checkpoint import load_model
    from .weights.registry import REGISTRY, WeightsError, resolve_model

    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            raise CommandError(f"--checkpoint: no such file: {args.checkpoint}")
        return load_model(args.checkpoint, device=args.device)
    name = args.model or "demo"
    try:
        path = resolve_model(name, download=args.download)
    except WeightsError as exc:
        raise CommandError(f"--model {name}: {exc}") from exc
    entry = REGISTRY.get(name)
    return load_model(path, device=args.device, build=entry.build if entry else None)


def _dicom_source(args: argparse.Namespace, volume) -> list:
    """The source series for --dicom-seg, checked against the volume before any work is done."""
    from .formats.dicom_seg import check_series_grid, read_series_datasets

    if not volume.dicom_files:
        raise CommandError(
            "--dicom-seg needs --volume to be a folder holding the DICOM series the SEG will reference "
            f"({args.volume} is not one)"
        )
    datasets = read_series_datasets(args.volume)
    check_series_grid(datasets, volume.array_kji.shape, volume.ijk_to_ras)
    return datasets


def _provenance(points, rois, info, args: argparse.Namespace, outcomes, window, precision: str):
    """What a reviewer needs to re-run the case: model and hash, prompts, per-slice confidence, window,
    precision."""
    from .formats.provenance import build_provenance

    return build_provenance(
        points, rois, outcomes, model=f"SAM-Med2D {info.build}", model_sha256=info.sha256,
        axis=args.axis, propagate=args.propagate, segment=args.segment_name, window=(window.low, window.high),
        precision=precision,
    )  # fmt: skip


def _earlier_provenance(out: Path) -> list:
    """Runs recorded in the file being updated, so its other segments keep their provenance."""
    from .mrml.segmentations import read_segmentation_provenance

    try:
        return read_segmentation_provenance(out)
    except ValueError as exc:
        print(f"warning: {out.name}: {exc}; its earlier provenance is not carried over", file=sys.stderr)
        return []


def run_segment(args: argparse.Namespace) -> dict:
    from .engine.embedding_cache import EmbeddingCache
    from .engine.predictor import SamMed2DPredictor
    from .engine.segmenter import segment_volume
    from .formats.volumes import read_volume
    from .mrml import scene, segmentations, volumes
    from .mrml.dicom_segmentations import export_dicom_seg

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    _check_outputs(args)
    out = Path(args.out)
    try:
        # Everything is read and checked before the (slow) segmentation, and before anything is written.
        volume = read_volume(args.volume)
        timings["read_volume_s"] = time.perf_counter() - t0
        hs = scene.create_headless_scene()
        points, rois = _load_prompts(hs, args)
        existing = segmentations.load_segmentation(hs, out) if out.exists() else None
        earlier = _earlier_provenance(out) if existing is not None else []
        datasets = _dicom_source(args, volume) if args.dicom_seg else None
        window = _window(args.window, volume.array_kji, volume.modality)
        t = time.perf_counter()
        model, info = _model(args)
        timings["load_model_s"] = time.perf_counter() - t
        settings = PropagationSettings(iou_threshold=args.iou_threshold)
        progress = None
        if not args.quiet:

            def progress(n: int, outcome) -> None:
                print(
                    f"slice {outcome.index}: {outcome.status} IoU {outcome.predicted_iou:.2f} "
                    f"area {outcome.area_px} px {outcome.reason}",
                    file=sys.stderr,
                )

        t = time.perf_counter()
        predictor = SamMed2DPredictor(model, precision=args.precision)
        timings["precision_s"] = time.perf_counter() - t
        choice = predictor.precision_choice
        if not args.quiet:
            print(f"encoder precision: {choice.precision} ({choice.reason})", file=sys.stderr)
        t = time.perf_counter()
        cache, cache_key = EmbeddingCache(args.cache_mb << 20), None
        if args.embedding_cache:
            from .engine.disk_cache import DiskEmbeddingCache, content_key

            cache.disk = DiskEmbeddingCache(args.embedding_cache, args.embedding_cache_mb << 20)
            cache_key = content_key(volume.array_kji, volume.ijk_to_ras, info.sha256, choice.precision)
        seg = segment_volume(
            predictor, volume.array_kji, volume.ijk_to_ras, window, points, rois,
            axis=args.axis, direction=args.propagate, settings=settings,
            cache=cache, cache_key=cache_key, progress=progress,
        )  # fmt: skip
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
    masks = result.masks()
    if not masks:
        raise CommandError("the model found nothing at the prompts (no slice accepted); nothing written")

    t = time.perf_counter()
    volume_node = volumes.add_volume_from_array(hs, volume.array_kji, volume.ijk_to_ras, "volume")
    seg_node = segmentations.ensure_segmentation(hs, volume_node, existing)
    segment_id = segmentations.ensure_segment(seg_node, args.segment_name)
    segmentations.write_segment_slices(seg_node, segment_id, volume_node, seg.geometry, masks)
    provenance = _provenance(points, rois, info, args, result.slices.values(), window, choice.precision)
    if datasets is not None:
        by_segment = {p.segment: p for p in [*earlier, provenance]}  # the latest run on each segment
        try:
            export_dicom_seg(
                seg_node, volume_node, datasets, args.dicom_seg, info.sha256, f"SAM-Med2D {info.build}",
                provenance=by_segment,
            )  # fmt: skip
        except ValueError as exc:
            raise CommandError(f"--dicom-seg: {exc}") from exc
    segmentations.save_segmentation(seg_node, out, provenance.to_metadata(earlier))
    timings["write_s"] = time.perf_counter() - t
    timings["encode_s"] = result.encode_seconds
    timings["decode_s"] = result.decode_seconds
    timings["total_s"] = time.perf_counter() - t0

    area_mm2 = seg.geometry.pixel_spacing[0] * seg.geometry.pixel_spacing[1]
    report = {
        "volume": str(args.volume),
        "axis": args.axis,
        "propagate": args.propagate,
        "segment_name": args.segment_name,
        "segment_id": segment_id,
        "output": str(out),
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
        "encoded_slices": result.encoded_slices,
        "embedding_cache": None if cache.disk is None else {
            "dir": str(cache.disk.folder), "read": cache.disk.hits, "written": cache.disk.writes,
            "discarded": cache.disk.discarded,
        },  # fmt: skip
        "cancelled": result.cancelled,
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
    if args.report:
        _write_json_atomic(Path(args.report), report)
    return report


def _segment_summary(report: dict) -> str:
    return (
        f"wrote {len(report['slices_written'])} slice(s) of segment '{report['segment_name']}' to "
        f"{report['output']} in {report['timings']['total_s']:.1f} s"
    )


def _finetune_summary(result) -> str:
    scores = ", ".join(f"{k} {v:.3f}" for k, v in result.best_score.items())
    best = f"best validation at step {result.best_step}: {scores}" if scores else "no validation slices"
    return (
        f"trained {result.steps} steps in {result.seconds / 60:.1f} min "
        f"({result.samples_per_second:.1f} samples/s); {best}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    from .finetune.training import FinetuneError, run_finetune

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.command == "finetune":
        run, summary = run_finetune, _finetune_summary
    else:
        run, summary = run_segment, _segment_summary
    try:
        outcome = run(args)
    except (CommandError, FinetuneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.quiet:
        print(summary(outcome), file=sys.stderr)
    return 0

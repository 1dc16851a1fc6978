"""`python -m SAMMed2DSegmentLib convert`: a DICOM-SEG from any tool onto its source volume as .seg.nrrd, or a
.seg.nrrd onto its DICOM series as DICOM-SEG, under the same rules as `segment` (one output plan, atomic
writes, an existing output updated under its lock)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..files import commit_outputs, same_file
from ..outputs import DICOM_SEG, SEGMENTATION, OutputPlan, input_files
from .common import CommandError, OutputError, dicom_source, earlier_provenance, os_reason, planned


def add_parser(subparsers) -> None:
    conv = subparsers.add_parser(
        "convert",
        help="DICOM-SEG (any tool's) -> .seg.nrrd on its source volume, or .seg.nrrd -> DICOM-SEG",
        description="convert --dicom-seg IN.dcm --volume SOURCE --out OUT.seg.nrrd, or "
        "convert --seg IN.seg.nrrd --volume DICOM_FOLDER --dicom-seg OUT.dcm",
    )
    conv.set_defaults(run_command=run_convert, summarize=summary)
    conv.add_argument(
        "--volume", required=True, help="the source: a DICOM series folder, or a volume file on the same grid"
    )
    conv.add_argument("--dicom-seg", help="input DICOM-SEG (with --out), or output DICOM-SEG (with --seg)")
    conv.add_argument("--seg", help="input .seg.nrrd to export as DICOM-SEG (with --dicom-seg)")
    conv.add_argument(
        "--out",
        help="output .seg.nrrd (with an input --dicom-seg); an existing one is updated: the SEG's segments "
        "are added or replace those of the same name, its other segments stay",
    )
    conv.add_argument("--quiet", action="store_true", help="no summary on stderr")


def _check_convert(args: argparse.Namespace) -> tuple[str, str, OutputPlan]:
    """The direction of a `convert` run, its output and the checked output plan."""
    if args.seg:
        if args.out or not args.dicom_seg:
            raise CommandError("convert --seg IN.seg.nrrd needs --dicom-seg OUT.dcm (and no --out)")
        source, target, direction = args.seg, args.dicom_seg, "to-dicom"
        if not target.lower().endswith(".dcm"):
            raise CommandError(f"--dicom-seg must end in .dcm, got {Path(target).name}")
        outputs, inputs = [("--dicom-seg", target, DICOM_SEG)], [("--seg", Path(source))]
    else:
        if not args.dicom_seg or not args.out:
            raise CommandError(
                "convert needs --dicom-seg IN.dcm --out OUT.seg.nrrd, "
                "or --seg IN.seg.nrrd --dicom-seg OUT.dcm"
            )
        source, target, direction = args.dicom_seg, args.out, "from-dicom"
        if not target.endswith(".seg.nrrd"):
            raise CommandError(f"--out must end in .seg.nrrd, got {Path(target).name}")
        outputs, inputs = [("--out", target, SEGMENTATION)], [("--dicom-seg", Path(source))]
    if not Path(source).is_file():
        raise CommandError(f"{'--seg' if args.seg else '--dicom-seg'}: no such file: {source}")
    plan = planned(outputs, [*inputs, *input_files("--volume", args.volume)])
    volume = Path(args.volume)
    if direction == "to-dicom" and volume.is_dir() and same_file(Path(target).resolve().parent, volume):
        raise CommandError(
            f"--dicom-seg {target} is inside the source DICOM folder {volume}; write it elsewhere "
            "(one series per folder)"
        )
    return direction, target, plan


def run_convert(args: argparse.Namespace) -> dict:
    """`convert`: a DICOM-SEG from any tool onto its source volume as .seg.nrrd (through the same import the
    module uses), or a .seg.nrrd onto its DICOM series as DICOM-SEG. Same rules as `segment`: everything is
    checked before anything is written, the output appears complete or not at all, and an existing --out is
    updated under its lock: the SEG's segments are added, or replace the segments of the same name; the
    file's other segments (and their provenance) stay."""
    direction, target, plan = _check_convert(args)
    with plan.lock("--out", quiet=args.quiet):
        return _convert_locked(args, direction, target)


def _kept_provenance_metadata(out: Path, replaced: set[str]) -> dict[str, str] | None:
    """The provenance of an updated file's segments that a convert did not replace, as header fields."""
    kept = [p for p in earlier_provenance(out) if p.segment not in replaced]
    return kept[-1].to_metadata(kept[:-1]) if kept else None


def _convert_locked(args: argparse.Namespace, direction: str, target: str) -> dict:
    from ..formats.volumes import read_volume
    from ..mrml import scene, segmentations, volumes
    from ..mrml.dicom_segmentations import export_dicom_seg, import_dicom_seg

    out = Path(target)
    existing, metadata = None, None
    try:
        volume = read_volume(args.volume)
        hs = scene.create_headless_scene()
        volume_node = volumes.add_volume_from_array(hs, volume.array_kji, volume.ijk_to_ras, "volume")
        if direction == "from-dicom":
            datasets = None
            if volume.dicom_files:
                from ..formats.dicom.series import REQUIRED_FOR_GEOMETRY, sort_series_datasets

                required = (*REQUIRED_FOR_GEOMETRY, "SOPInstanceUID")
                datasets = sort_series_datasets(volume.dicom_datasets, required)
            if out.exists() and out.stat().st_size:
                existing = segmentations.load_segmentation(hs, out)
                segmentations.check_segments_on_grid(existing, volume_node, out.name)
            seg_node = import_dicom_seg(hs, args.dicom_seg, volume_node, datasets, seg_node=existing)
        else:
            datasets = dicom_source(args, volume)
            seg_node = segmentations.load_segmentation(hs, args.seg)
            segmentations.check_segments_on_grid(seg_node, volume_node, Path(args.seg).name)
            earlier = earlier_provenance(Path(args.seg))
    except (ValueError, FileNotFoundError) as exc:
        raise CommandError(str(exc)) from exc
    segment_names = [
        seg_node.GetSegmentation().GetNthSegment(n).GetName()
        for n in range(seg_node.GetSegmentation().GetNumberOfSegments())
    ]
    if existing is not None:
        from ..formats.dicom.seg_read import read_seg_labels

        metadata = _kept_provenance_metadata(out, set(read_seg_labels(args.dicom_seg)))
    try:
        with commit_outputs() as outputs:
            if direction == "from-dicom":
                segmentations.save_segmentation(
                    seg_node, outputs.path(target, suffix=".tmp.seg.nrrd"), metadata
                )
            else:
                by_segment = {p.segment: p for p in earlier}  # the latest run on each segment
                try:
                    export_dicom_seg(
                        seg_node, volume_node, datasets, outputs.path(target, suffix=".tmp.dcm"), None,
                        provenance=by_segment,
                    )  # fmt: skip
                except ValueError as exc:
                    raise CommandError(f"--dicom-seg: {exc}") from exc
    except OSError as exc:
        raise OutputError(f"cannot write the output ({os_reason(exc)}); nothing written") from None
    return {"output": target, "segments": segment_names}


def summary(result: dict) -> str:
    """The line a finished run prints on stderr."""
    names = ", ".join(result["segments"])
    return f"wrote {len(result['segments'])} segment(s) to {result['output']}: {names}"

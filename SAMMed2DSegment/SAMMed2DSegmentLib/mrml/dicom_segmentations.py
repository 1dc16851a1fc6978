"""Segmentation nodes ↔ DICOM-SEG files: what the command line's `--dicom-seg` and the module's
"Export DICOM-SEG" / reopen actions call. The DICOM work itself is the pure layer's `formats.dicom`."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import vtk

from ..engine.geometry import LPS_TO_RAS, SliceGeometry
from ..formats.dicom.seg_read import read_seg_segments
from ..formats.dicom.seg_write import SegmentSpec, parse_slicer_terminology, write_dicom_seg
from ..formats.dicom.series import check_series_grid, series_affine
from ..formats.provenance import Provenance
from .scene import HeadlessScene
from .segmentations import ensure_segment, ensure_segmentation, segment_array, write_segment_slices
from .volumes import volume_ijk_to_world


def _check_volume_matches_series(volume_node: vtk.vtkObject, datasets: Sequence) -> None:
    image = volume_node.GetImageData()
    shape = tuple(reversed(image.GetDimensions())) if image is not None else (0, 0, 0)
    check_series_grid(datasets, shape, volume_ijk_to_world(volume_node))


def export_dicom_seg(
    seg_node: vtk.vtkObject,
    volume_node: vtk.vtkObject,
    datasets: Sequence,
    path: str | os.PathLike[str],
    model_hash: str | None,
    algorithm_name: str = "SAM-Med2D",
    segment_ids: Sequence[str] | None = None,
    provenance: Mapping[str, Provenance] | None = None,
) -> Path:
    """Write the segments (all by default) as a DICOM-SEG referencing `datasets` (sorted source series),
    with their names, colors and terminology. `provenance` ({segment name: record}, e.g. from
    `build_provenance` or `read_segmentation_provenance`) goes, in LPS, into each segment's
    AlgorithmParameters. Atomic; raises ValueError on any mismatch."""
    _check_volume_matches_series(volume_node, datasets)
    segmentation = seg_node.GetSegmentation()
    ids = list(segment_ids) if segment_ids is not None else list(segmentation.GetSegmentIDs())
    specs = []
    for segment_id in ids:
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            raise ValueError(f"no segment {segment_id!r} in {seg_node.GetName()!r}")
        tag = vtk.reference("")
        segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
        category, kind = parse_slicer_terminology(str(tag))
        specs.append(
            SegmentSpec(
                label=segment.GetName(),
                # Made when the writer reaches this segment: one whole-volume mask is held at a time.
                mask_kji=functools.partial(segment_array, seg_node, segment_id, volume_node),
                color_rgb=tuple(segment.GetColor()),
                category=category,
                type=kind,
                provenance=(provenance or {}).get(segment.GetName()),
            )
        )
    return write_dicom_seg(
        datasets, specs, path, model_hash=model_hash, algorithm_name=algorithm_name,
        mask_affine=series_affine(datasets),
    )  # fmt: skip


def import_dicom_seg(
    hs: HeadlessScene,
    path: str | os.PathLike[str],
    volume_node: vtk.vtkObject,
    datasets: Sequence | None = None,
    seg_node: vtk.vtkObject | None = None,
    threshold: float = 0.5,
) -> vtk.vtkObject:
    """Read a DICOM-SEG (ours or any tool's) into a segmentation node on `volume_node`'s grid: one segment per
    SEG segment, with its label as name, its colour, and its category/type/region as Slicer's terminology
    entry; FRACTIONAL segments are thresholded at `threshold` (a .seg.nrrd holds binary labelmaps). With
    `datasets` (the sorted source series) the SEG must belong to that series; without (a volume file), its
    frames must lie on the volume's grid. What `convert --dicom-seg` and the module's reopen action call."""
    image = volume_node.GetImageData()
    shape = tuple(reversed(image.GetDimensions())) if image is not None else (0, 0, 0)
    if datasets is not None:
        _check_volume_matches_series(volume_node, datasets)
    ijk_to_lps = LPS_TO_RAS @ volume_ijk_to_world(volume_node)  # the flip is its own inverse
    segments = read_seg_segments(path, shape, ijk_to_lps, datasets)
    seg_node = ensure_segmentation(hs, volume_node, seg_node, name=Path(path).stem)
    geometry = SliceGeometry.create(shape, volume_ijk_to_world(volume_node), "axial")
    for read in segments:
        segment_id = ensure_segment(seg_node, read.label, read.color_rgb)
        segment = seg_node.GetSegmentation().GetSegment(segment_id)
        segment.SetTag(segment.GetTerminologyEntryTagName(), read.terminology)
        mask = read.mask_kji >= threshold if read.mask_kji.dtype.kind == "f" else read.mask_kji
        # Put the [k, j, i] mask in through the slice views, so every slice of it is written exactly.
        slices = {index: geometry.extract(mask, index) for index in range(geometry.num_slices)}
        write_segment_slices(seg_node, segment_id, volume_node, geometry, slices)
    return seg_node

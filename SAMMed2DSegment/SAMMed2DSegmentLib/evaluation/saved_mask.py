"""`evaluate --save-masks DIR`: the protocol's final 3-D mask as a segment of a `.seg.nrrd` on the volume's
grid, written with Slicer's own segmentation classes, as `segment` writes its result, so that it opens in
Slicer beside the CT and the reference labels. An existing file is updated: its other segments stay."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _scene_with_grid(shape_kji: tuple[int, ...], ijk_to_ras: np.ndarray):
    """A headless scene holding an empty volume on the grid (the segments' reference geometry)."""
    from ..mrml import scene, volumes

    hs = scene.create_headless_scene()
    return hs, volumes.add_volume_from_array(hs, np.zeros(shape_kji, np.uint8), ijk_to_ras, "volume")


def _open_existing(hs, grid, existing: Path):
    from ..mrml import segmentations

    node = segmentations.load_segmentation(hs, existing)
    segmentations.check_segments_on_grid(node, grid, existing.name)
    return node


def check_existing(existing: Path, shape_kji: tuple[int, ...], ijk_to_ras: np.ndarray) -> None:
    """ValueError, before any work, when the file to update cannot be read or lies on another grid."""
    hs, grid = _scene_with_grid(shape_kji, ijk_to_ras)
    _open_existing(hs, grid, existing)


def write_mask_segmentation(
    path: Path, mask_kji: np.ndarray, ijk_to_ras: np.ndarray, segment_name: str, existing: Path | None = None
) -> None:
    """Write `mask_kji` (boolean, KJI order, on the grid of `ijk_to_ras`) as segment `segment_name` into
    `path` (a temporary file of the caller's output set). With `existing` (the file being updated), its
    other segments are kept and a segment of that name is replaced whole."""
    from ..engine.geometry import SliceGeometry
    from ..mrml import segmentations

    mask_kji = np.asarray(mask_kji, dtype=bool)
    hs, grid = _scene_with_grid(mask_kji.shape, ijk_to_ras)
    node = _open_existing(hs, grid, existing) if existing is not None else None
    seg_node = segmentations.ensure_segmentation(hs, grid, node)
    segment_id = segmentations.ensure_segment(seg_node, segment_name)
    geometry = SliceGeometry.create(mask_kji.shape, ijk_to_ras, "axial")
    every_slice = {i: geometry.extract(mask_kji, i) for i in range(geometry.num_slices)}
    segmentations.write_segment_slices(seg_node, segment_id, grid, geometry, every_slice)
    segmentations.save_segmentation(seg_node, path)

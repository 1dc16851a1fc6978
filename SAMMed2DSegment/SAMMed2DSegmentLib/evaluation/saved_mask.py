"""`evaluate --save-masks DIR`: the protocol's final 3-D mask as a segment of a `.seg.nrrd` on the volume's
grid, written with Slicer's own segmentation classes, as `segment` writes its result, so that it opens in
Slicer beside the CT and the reference labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_mask_segmentation(
    path: Path, mask_kji: np.ndarray, ijk_to_ras: np.ndarray, segment_name: str, existing: Path | None = None
) -> None:
    """Write `mask_kji` (boolean, KJI order, on the grid of `ijk_to_ras`) as segment `segment_name` into
    `path` (a temporary file of the caller's output set). With `existing` (the file being updated), its
    other segments are kept and a segment of that name is replaced whole."""
    from ..engine.geometry import SliceGeometry
    from ..mrml import scene, segmentations, volumes

    mask_kji = np.asarray(mask_kji, dtype=bool)
    hs = scene.create_headless_scene()
    grid = volumes.add_volume_from_array(hs, np.zeros(mask_kji.shape, np.uint8), ijk_to_ras, "volume")
    node = segmentations.load_segmentation(hs, existing) if existing is not None else None
    seg_node = segmentations.ensure_segmentation(hs, grid, node)
    if node is not None:
        segmentations.check_segments_on_grid(seg_node, grid, existing.name)
    segment_id = segmentations.ensure_segment(seg_node, segment_name)
    geometry = SliceGeometry.create(mask_kji.shape, ijk_to_ras, "axial")
    every_slice = {i: geometry.extract(mask_kji, i) for i in range(geometry.num_slices)}
    segmentations.write_segment_slices(seg_node, segment_id, grid, geometry, every_slice)
    segmentations.save_segmentation(seg_node, path)

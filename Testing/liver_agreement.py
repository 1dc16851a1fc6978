"""Mask agreement between two predictors on the bundled CT: one include point per slice that shows the
liver (the labelled pixel nearest the label's centroid). Shared by the precision tests and the GPU
benchmark, so it imports nothing from pytest."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from SAMMed2DSegmentLib.engine.geometry import SliceGeometry
from SAMMed2DSegmentLib.engine.intensity import default_window, to_uint8
from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor
from SAMMed2DSegmentLib.formats.volumes import read_volume

CT = Path(__file__).resolve().parent / "Data" / "totalseg-example-ct"
LIVER = 5
MIN_LIVER_PIXELS = 20


def liver_slice_ious(
    reference: SamMed2DPredictor, other: SamMed2DPredictor, limit: int | None = None
) -> list[float]:
    """IoU of `other`'s mask against `reference`'s on each liver slice (the first `limit` ones if given)."""
    volume = read_volume(CT / "ct")
    labels = read_volume(CT / "labels" / "labels_on_ct_grid.nrrd").array_kji == LIVER
    geometry = SliceGeometry.create(volume.array_kji.shape, volume.ijk_to_ras, "axial")
    window = default_window(volume.array_kji, volume.modality)
    ious: list[float] = []
    for index in range(geometry.num_slices):
        if limit is not None and len(ious) >= limit:
            break
        liver = geometry.view(labels, index)
        if liver.sum() < MIN_LIVER_PIXELS:
            continue
        rows, cols = np.nonzero(liver)
        nearest = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
        point = np.array([[cols[nearest], rows[nearest]]], dtype=np.float64)
        image = np.ascontiguousarray(to_uint8(geometry.view(volume.array_kji, index), window))
        masks = []
        for predictor in (reference, other):
            predictor.set_image(image)
            masks.append(predictor.predict(point, np.array([1]))[0][0])
        union = (masks[0] | masks[1]).sum()
        ious.append(float((masks[0] & masks[1]).sum() / union) if union else 1.0)
    return ious

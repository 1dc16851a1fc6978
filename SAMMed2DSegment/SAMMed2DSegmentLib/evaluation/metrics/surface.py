"""Normalized surface Dice (NSD): the share of both surfaces, weighted by area, that lies within a tolerance
of the other surface.

The definition the CVPR 2025 interactive challenge scores with (`compute_surface_distances` and
`compute_surface_dice_at_tolerance` in `SurfaceDice.py` of JunMa11/CVPR-MedSegFMCompetition, commit
748e862d162e3e3ee8197bd4085b19bbbe0bb8a0, after DeepMind's surface-distance): surfels sit on the corners of
the voxel grid, one per 2x2x2 neighbourhood that is neither empty nor full; each has the area of its
marching-cubes triangles (`surfels.py`) and its distance, in mm, to the nearest surfel of the other mask.
Written here with numpy and ITK's exact Euclidean distance map (Maurer) instead of SciPy; the distances
are single precision, so a surfel exactly at the tolerance could in principle round the other way.
"""

from __future__ import annotations

import numpy as np

from ...engine.masks import extent
from .surfels import surfel_areas

#: Bit of each corner of the 2x2x2 neighbourhood (offsets along the three array axes), as their kernel.
_CORNER_BITS = {(a, b, c): 1 << (7 - (4 * a + 2 * b + c)) for a in (0, 1) for b in (0, 1) for c in (0, 1)}


def neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """The code of every grid corner around `mask` (one more than its size along each axis): which of the
    8 voxels meeting there are set. Outside the array counts as empty."""
    padded = np.pad(np.asarray(mask, dtype=bool), 1).astype(np.uint8)
    n0, n1, n2 = (s - 1 for s in padded.shape)
    codes = np.zeros((n0, n1, n2), dtype=np.uint8)
    for (a, b, c), bit in _CORNER_BITS.items():
        codes |= padded[a : a + n0, b : b + n1, c : c + n2] * np.uint8(bit)
    return codes


def distance_to(surface: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Distance in mm from every grid point to the nearest point of `surface` (0 on it; inf everywhere when
    it is empty)."""
    import SimpleITK as sitk

    if not surface.any():
        return np.full(surface.shape, np.inf)
    image = sitk.GetImageFromArray(surface.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_mm)))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)  # fmt: skip
    return np.maximum(sitk.GetArrayFromImage(distance).astype(np.float64), 0.0)


def surface_dice(
    truth: np.ndarray, prediction: np.ndarray, spacing_mm: tuple[float, float, float],
    tolerance_mm: float = 2.0,
) -> float:  # fmt: skip
    """NSD of two 3-D boolean masks with voxels of `spacing_mm` (array axis order): 0 when one is empty,
    NaN when both are (as theirs)."""
    truth, prediction = np.asarray(truth, dtype=bool), np.asarray(prediction, dtype=bool)
    if truth.shape != prediction.shape or truth.ndim != 3:
        raise ValueError(f"surface Dice needs two 3-D masks of one shape: {truth.shape}, {prediction.shape}")
    box = extent(truth | prediction)
    if box is None:
        return float("nan")
    areas = surfel_areas(spacing_mm)
    codes_truth, codes_pred = neighbour_codes(truth[box]), neighbour_codes(prediction[box])
    border_truth = (codes_truth != 0) & (codes_truth != 255)
    border_pred = (codes_pred != 0) & (codes_pred != 255)
    area_truth, area_pred = areas[codes_truth[border_truth]], areas[codes_pred[border_pred]]
    near_truth = distance_to(border_pred, spacing_mm)[border_truth] <= tolerance_mm
    near_pred = distance_to(border_truth, spacing_mm)[border_pred] <= tolerance_mm
    total = area_truth.sum() + area_pred.sum()
    return float((area_truth[near_truth].sum() + area_pred[near_pred].sum()) / total)

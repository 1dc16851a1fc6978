"""The simulated user of the interactive protocol: where the next corrective click goes.

The rule the field uses (SAM-Med2D's iterative test draws a random error pixel; the CVPR 2025 interactive
3-D challenge and nnInteractive's simulator click the centre of the largest error): the click goes to the
point deepest inside the largest connected error region, an include click where the structure was missed and
an exclude click where the mask spilled over. "Deepest" is the largest distance to the region's edge in
millimetres (the slice's pixel spacing), through ITK's Maurer distance map; the deterministic rule makes
every run of `evaluate` repeatable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine.masks import component_labels

INCLUDE, EXCLUDE = 1, 0


@dataclass(frozen=True)
class Click:
    x: int  # column
    y: int  # row
    label: int  # INCLUDE or EXCLUDE


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (nothing to find, nothing found)."""
    total = int(prediction.sum()) + int(truth.sum())
    return 2.0 * int(np.logical_and(prediction, truth).sum()) / total if total else 1.0


def deepest_point(region: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> tuple[int, int]:
    """(x, y) of the pixel of `region` farthest from its edge (image borders count as edges), in mm with
    `spacing` = (row, column) pixel size; the first in raster order on ties."""
    import SimpleITK as sitk

    region = np.asarray(region, dtype=bool)
    if not region.any():
        raise ValueError("an empty region has no deepest point")
    padded = np.pad(region, 1).astype(np.uint8)
    image = sitk.GetImageFromArray(padded)
    image.SetSpacing((float(spacing[1]), float(spacing[0])))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=True, squaredDistance=False,
                                            useImageSpacing=True)  # fmt: skip
    depth = sitk.GetArrayFromImage(distance)[1:-1, 1:-1]
    depth = np.where(region, depth, -np.inf)
    row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return int(col), int(row)


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected piece of `mask` (the lowest label on ties)."""
    labels = component_labels(mask)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(np.argmax(counts))


def next_click(
    prediction: np.ndarray, truth: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)
) -> Click | None:
    """The corrective click for `prediction` against `truth`, or None when they agree everywhere."""
    prediction, truth = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    error = prediction ^ truth
    if not error.any():
        return None
    x, y = deepest_point(largest_region(error), spacing)
    return Click(x, y, INCLUDE if truth[y, x] else EXCLUDE)

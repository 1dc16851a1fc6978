"""The simulated user of the CVPR 2025 interactive challenge ("Foundation Models for Interactive 3D
Biomedical Image Segmentation"): where its box and its clicks go, as its scripts place them
(github.com/JunMa11/CVPR-MedSegFMCompetition, commit 748e862d162e3e3ee8197bd4085b19bbbe0bb8a0, Apache-2.0).

- The box (`get_boxes.py`, `mask3D_to_bbox` and `mask2D_to_bbox`): the structure's z-range, its middle
  slice (the middle of the slices it is on, upper middle for an even count), and the tight box on that slice
  widened on every side by `shift × size / 256` pixels (per axis, rounded down, clipped to the slice), with
  `shift` drawn from 0..5 by NumPy's legacy generator seeded 2025. Their script draws once per structure in
  file order from one seeded generator per worker process; one structure at a time cannot know its place
  in that order, so every structure here takes the first draw.
- The click (`CVPR25_iter_eval.py`): in the largest 26-connected 3-D error component (ties: the component
  met first in array order, as cc3d numbers them), at the maximum of its Euclidean distance transform in
  voxel units (outside the component and the volume count as background), one of the maxima picked by the
  legacy generator seeded 42; foreground when the structure was missed there, background when the mask
  spilled over. They halve the EDT's resolution for error boxes over 60 million voxels; this does not.

Here "z" is the slice index along the chosen view axis, and slices are in display orientation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine.geometry import SliceGeometry
from ..engine.masks import bounding_box, extent

BOX_SEED, CLICK_SEED = 2025, 42
FOREGROUND, BACKGROUND = "fg", "bg"


@dataclass(frozen=True)
class ChallengeBox:
    z_min: int
    z_max: int
    z_mid: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 on slice z_mid, inclusive pixel corners

    def as_json(self) -> dict:
        x0, y0, x1, y1 = self.box
        return {"z_min": self.z_min, "z_max": self.z_max, "z_mid": self.z_mid,
                "z_mid_x_min": x0, "z_mid_y_min": y0, "z_mid_x_max": x1, "z_mid_y_max": y1}  # fmt: skip


@dataclass(frozen=True)
class Click3D:
    kji: tuple[int, int, int]  # voxel index in array (K, J, I) order
    label: str  # FOREGROUND or BACKGROUND


def challenge_box(truth: np.ndarray, geometry: SliceGeometry, seed: int = BOX_SEED) -> ChallengeBox:
    """The z-range and the jittered box on the middle slice of a non-empty 3-D label (KJI order)."""
    present = [i for i in range(geometry.num_slices) if geometry.view(truth, i).any()]
    if not present:
        raise ValueError("the label is empty: there is nothing to put a box around")
    z_mid = present[len(present) // 2]
    plane = geometry.view(truth, z_mid)
    x0, y0, x1, y1 = bounding_box(plane)
    rows, cols = plane.shape
    shift = int(np.random.RandomState(seed).randint(0, 6, 1)[0])
    dx, dy = int(shift * cols / 256), int(shift * rows / 256)
    box = (max(0, x0 - dx), max(0, y0 - dy), min(cols - 1, x1 + dx), min(rows - 1, y1 + dy))
    return ChallengeBox(present[0], present[-1], z_mid, box)


def largest_component_3d(error: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a non-empty 3-D mask (the first in array order on ties)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(error, dtype=np.uint8))
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(image, True)).ravel()
    counts = np.bincount(labels)
    counts[0] = 0
    tied = np.flatnonzero(counts == counts.max())
    first = tied[0] if len(tied) == 1 else min(tied, key=lambda t: int(np.argmax(labels == t)))
    return (labels == first).reshape(error.shape)


def squared_depth(region: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance, in voxels, from each voxel of `region` to the nearest voxel outside it
    (the volume's outside included); 0 off the region. Squared distances are integers, so ties are exact."""
    import SimpleITK as sitk

    box = extent(region)
    depth = np.zeros(region.shape, dtype=np.float64)
    if box is None:
        return depth
    crop = np.pad(region[box], 1)
    image = sitk.GetImageFromArray((~crop).astype(np.uint8))  # the outside is the object: distances to it
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=True,
                                            useImageSpacing=False)  # fmt: skip
    inner = sitk.GetArrayFromImage(distance)[1:-1, 1:-1, 1:-1].astype(np.float64)
    depth[box] = np.where(region[box], np.rint(inner), 0.0)
    return depth


def next_click_3d(prediction: np.ndarray, truth: np.ndarray, seed: int = CLICK_SEED) -> Click3D | None:
    """The challenge's next click for a 3-D prediction against the truth, or None when they agree."""
    prediction, truth = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape or truth.ndim != 3:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} must be 3-D of one shape")
    error = prediction ^ truth
    if not error.any():
        return None
    depth = squared_depth(largest_component_3d(error))
    deepest = np.argwhere(depth == depth.max())
    chosen = deepest[np.random.RandomState(seed).choice(len(deepest))]
    kji = (int(chosen[0]), int(chosen[1]), int(chosen[2]))
    return Click3D(kji, FOREGROUND if truth[kji] else BACKGROUND)


def slice_position(geometry: SliceGeometry, kji: tuple[int, int, int]) -> tuple[int, int, int]:
    """(slice index, x, y) at which `geometry`'s displayed slices show voxel `kji`: the inverse of
    `SliceGeometry.view` for one voxel."""
    ijk = kji[::-1]
    rows, cols = geometry.slice_shape
    x, y = ijk[geometry.col_axis], ijk[geometry.row_axis]
    if geometry.col_flip:
        x = cols - 1 - x
    if geometry.row_flip:
        y = rows - 1 - y
    return int(ijk[geometry.slice_axis]), int(x), int(y)

"""Prompts in physical space (markups points, ROI boxes) and their per-slice form for the predictor.

Points and ROIs are in world RAS millimetres, never voxel indices. A point prompts the slice whose
thickness contains it; an ROI gives a box on every slice it crosses, computed from the exact cross-section
of the (possibly rotated) ROI with that slice's slab, so rotated ROIs need all eight corners and more.
Anything that falls off the volume is reported, never clamped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import product

import numpy as np

from .geometry import SliceGeometry

INCLUDE = 1
EXCLUDE = 0
#: At most this many points on one slice. SAM (and SAM-Med2D) were trained with a handful of clicks per mask
#: (iterative correction clicks), so more points do not help, while the decoder's attention over the prompt
#: tokens grows quadratically with their number (10,000 points on one slice peaked at 7.2 GB RSS).
MAX_POINTS_PER_SLICE = 64
#: An ROI must span at least this many pixels in both directions of the slices it prompts.
MIN_ROI_PIXELS = 1.0


class PromptError(ValueError):
    """A prompt cannot be used on this volume (off the volume, empty, malformed)."""


@dataclass(frozen=True)
class PointPrompt:
    """One control point in world RAS; label 1 includes, 0 excludes."""

    position: tuple[float, float, float]
    label: int
    name: str = ""

    def __post_init__(self) -> None:
        if self.label not in (INCLUDE, EXCLUDE):
            raise PromptError(f"point label must be 1 (include) or 0 (exclude), got {self.label!r}")
        if len(self.position) != 3 or not np.isfinite(self.position).all():
            raise PromptError(f"point position must be 3 finite RAS coordinates, got {self.position!r}")


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class RoiPrompt:
    """A box in world RAS: centre, unit axis directions (3×3, columns) and full side lengths."""

    center: tuple[float, float, float]
    axes: np.ndarray
    size: tuple[float, float, float]
    name: str = ""

    def __post_init__(self) -> None:
        axes = np.asarray(self.axes, dtype=np.float64)
        if axes.shape != (3, 3) or not np.isfinite(axes).all() or abs(np.linalg.det(axes)) < 1e-9:
            raise PromptError(f"ROI {self.name!r}: axes must be a non-singular 3×3 matrix")
        if len(self.size) != 3 or not np.isfinite(self.size).all() or min(self.size) < 0:
            raise PromptError(f"ROI {self.name!r}: size must be three non-negative lengths, got {self.size}")

    def corners(self) -> np.ndarray:
        """8×3 world RAS corners."""
        axes = np.asarray(self.axes, dtype=np.float64)
        half = np.asarray(self.size, dtype=np.float64) / 2
        signs = np.array(list(product((-1, 1), repeat=3)), dtype=np.float64)
        return np.asarray(self.center, dtype=np.float64) + (signs * half) @ axes.T


@dataclass
class SlicePrompt:
    """Prompts for one slice in display pixel coordinates (x = column, y = row), as the predictor takes."""

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    box: np.ndarray | None = None

    @property
    def has_points(self) -> bool:
        return len(self.points) > 0

    @property
    def has_include(self) -> bool:
        return bool((self.labels == INCLUDE).any()) or self.box is not None

    def predictor_kwargs(self) -> dict[str, np.ndarray | None]:
        return {
            "point_coords": self.points if self.has_points else None,
            "point_labels": self.labels if self.has_points else None,
            "box": self.box,
        }


# The 12 edges of a box, as pairs of corner indices (corners ordered as in `RoiPrompt.corners`).
_EDGES = [(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]


def roi_box_on_slice(corners_syx: np.ndarray, index: int, geometry: SliceGeometry) -> np.ndarray | None:
    """Bounding box (x0, y0, x1, y1) of an ROI's cross-section with slice `index`'s slab, clipped to the
    slice, or None when the ROI does not reach that slab or misses the slice in-plane."""
    lo, hi = index - 0.5, index + 0.5
    s = corners_syx[:, 0]
    pts = [corners_syx[(s >= lo) & (s <= hi), 1:]]
    for a, b in _EDGES:
        sa, sb = s[a], s[b]
        for plane in (lo, hi):
            if (sa - plane) * (sb - plane) < 0:
                t = (plane - sa) / (sb - sa)
                pts.append((corners_syx[a, 1:] + t * (corners_syx[b, 1:] - corners_syx[a, 1:]))[None])
    xy = np.concatenate(pts)
    if len(xy) == 0:
        return None
    rows, cols = geometry.slice_shape
    x0, y0 = np.maximum(xy.min(axis=0), -0.5)
    x1 = min(xy[:, 0].max(), cols - 0.5)
    y1 = min(xy[:, 1].max(), rows - 0.5)
    if x1 < x0 or y1 < y0:
        return None
    return np.array([x0, y0, x1, y1])


def roi_slices(roi: RoiPrompt, geometry: SliceGeometry) -> dict[int, np.ndarray]:
    """Box for every slice the ROI crosses; raises PromptError when it crosses none."""
    corners = geometry.ras_to_continuous(roi.corners())
    first = max(0, int(np.floor(corners[:, 0].min() + 0.5)))
    last = min(geometry.num_slices - 1, int(np.floor(corners[:, 0].max() + 0.5)))
    boxes = {}
    for index in range(first, last + 1):
        box = roi_box_on_slice(corners, index, geometry)
        if box is not None:
            boxes[index] = box
    label = f"ROI {roi.name!r}" if roi.name else "ROI"
    if not boxes:
        raise PromptError(f"{label} lies outside the volume")
    # Degenerate: thinner than a pixel across the slices (a 1e-9 mm side). It would prompt with a box around
    # nothing, whose empty mask says nothing; refused here, at input. A flat ROI across the slices (as placed
    # in a slice view) is fine.
    low = np.min([b[:2] for b in boxes.values()], axis=0)
    high = np.max([b[2:] for b in boxes.values()], axis=0)
    if (high - low).min() < MIN_ROI_PIXELS:
        width, height = (high - low) * np.asarray(geometry.pixel_spacing)[::-1]
        raise PromptError(
            f"{label} is degenerate on the {geometry.axis} slices: {width:.3g} × {height:.3g} mm, less than "
            "a pixel across; draw a box around the structure"
        )
    return boxes


def prompts_by_slice(
    geometry: SliceGeometry,
    points: Sequence[PointPrompt] = (),
    rois: Iterable[RoiPrompt] = (),
) -> dict[int, SlicePrompt]:
    """Group point and ROI prompts by the slice they prompt. Raises PromptError naming every point that is
    off the volume (between slices it would be ambiguous; outside the slice it would be clamped)."""
    result: dict[int, SlicePrompt] = {}
    outside = []
    if points:
        syx = geometry.ras_to_continuous(np.array([p.position for p in points]))
        for point, (s, x, y) in zip(points, syx, strict=True):
            index = geometry.slice_of(s)
            if index is None or not geometry.in_plane(x, y):
                outside.append(f"{point.name or 'point'} at RAS {tuple(round(c, 2) for c in point.position)}")
                continue
            prompt = result.setdefault(index, SlicePrompt())
            prompt.points = np.vstack([prompt.points, [[x, y]]])
            prompt.labels = np.append(prompt.labels, point.label)
    if outside:
        shown = "; ".join(outside[:10]) + (f"; and {len(outside) - 10} more" if len(outside) > 10 else "")
        raise PromptError("outside the volume: " + shown)
    crowded = {index: len(p.points) for index, p in result.items() if len(p.points) > MAX_POINTS_PER_SLICE}
    if crowded:
        index, count = max(crowded.items(), key=lambda item: item[1])
        raise PromptError(
            f"{count} points on slice {index}: at most {MAX_POINTS_PER_SLICE} per slice (the model was "
            "trained with a few clicks per mask, and memory grows with the square of the number of points)"
        )
    for roi in rois:
        for index, box in roi_slices(roi, geometry).items():
            prompt = result.setdefault(index, SlicePrompt())
            if prompt.box is not None:  # two ROIs on one slice: the box around both
                box = np.r_[np.minimum(prompt.box[:2], box[:2]), np.maximum(prompt.box[2:], box[2:])]
            prompt.box = box
    return result


def masks_to_correct(
    by_slice: dict[int, SlicePrompt], segment_slice: Callable[[int], np.ndarray]
) -> dict[int, np.ndarray]:
    """The segment's masks (display orientation, `segment_slice(index)`) on the slices whose prompts are
    exclude points only and that the segment covers: what those points correct (`SegmentationSession.
    propagate`'s `current_masks`). A slice the segment does not cover is left out: the engine refuses it in
    one line. Only those slices are read (in Slicer, reading a whole segment costs ~0.4 s on a large CT)."""
    wanted = [index for index, prompt in by_slice.items() if not prompt.has_include]
    masks = {index: np.array(segment_slice(index), dtype=bool) for index in wanted}
    return {index: mask for index, mask in masks.items() if mask.any()}

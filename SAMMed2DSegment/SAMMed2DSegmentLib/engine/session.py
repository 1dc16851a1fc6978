"""What the Slicer module does between a click and a mask, without Slicer (pure layer: numpy + torch).

The module's Logic keeps one `SegmentationSession` per loaded model and calls it from the background worker:
the volume is handed over as a `VolumeSnapshot` (a copy taken on the main thread, so the worker never reads a
node that the user may change or delete meanwhile), embeddings stay in one cache shared by clicks,
propagation and the pre-computation of slices near the one on screen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .geometry import AXES, VIEW_ORIENTATIONS, SliceGeometry
from .intensity import PRESETS, IntensityWindow, default_window
from .prompts import PointPrompt, RoiPrompt

if TYPE_CHECKING:  # torch-free at import: the Slicer module uses this file before torch is installed
    from .predictor import SamMed2DPredictor
    from .propagation import ProgressCallback, PropagationResult, PropagationSettings
    from .segmenter import VolumeSegmentation

#: Intensity window choices offered by the module: automatic, the named presets, or level/width by hand.
WINDOW_CHOICES = ("auto", *PRESETS, "custom")


@dataclass(frozen=True, eq=False)
class VolumeSnapshot:
    """A volume as the worker sees it. `key` changes whenever the voxels or geometry change (node ID plus
    modification time), so cached embeddings of an edited volume are never reused."""

    key: str
    array_kji: np.ndarray
    ijk_to_ras: np.ndarray
    modality: str | None = None

    def geometry(self, axis: str) -> SliceGeometry:
        return SliceGeometry.create(self.array_kji.shape, self.ijk_to_ras, axis)


def window_for(
    snapshot: VolumeSnapshot, choice: str, level: float | None = None, width: float | None = None
) -> IntensityWindow:
    """The window the module's "Intensity window" choice means for this volume."""
    if choice == "auto":
        return default_window(snapshot.array_kji, snapshot.modality)
    if choice == "custom":
        if level is None or width is None:
            raise ValueError("a custom intensity window needs a level and a width")
        return IntensityWindow.from_level_width(level, width)
    if choice in PRESETS:
        return IntensityWindow.from_preset(choice)
    raise ValueError(f"unknown intensity window {choice!r}; choose one of {', '.join(WINDOW_CHOICES)}")


@dataclass(frozen=True)
class SliceConfidence:
    index: int
    status: str
    confidence: float
    predicted_iou: float
    reason: str


def confidence_table(result: PropagationResult) -> list[SliceConfidence]:
    """Visited slices, least certain first: the ones a user should look at before accepting the result.
    Rejected slices (where a walk stopped) come first, since the structure may continue there."""
    rows = [
        SliceConfidence(o.index, o.status, o.confidence, o.predicted_iou, o.reason)
        for o in result.slices.values()
    ]
    return sorted(rows, key=lambda r: (r.status != "rejected", r.confidence, r.index))


def slice_center_ras(geometry: SliceGeometry, index: int) -> np.ndarray:
    """World RAS of the centre of slice `index`, to jump the views there."""
    rows, cols = geometry.slice_shape
    return geometry.continuous_to_ras([[index, (cols - 1) / 2, (rows - 1) / 2]])[0]


_SLICER_ORIENTATIONS = {"Axial": "axial", "Coronal": "coronal", "Sagittal": "sagittal"}


def axis_from_views(
    point_ras: Sequence[float], views: Iterable[tuple[str, np.ndarray]], tolerance_mm: float = 0.01
) -> str | None:
    """The axis of the slice view a point was placed in: the views are (orientation name as Slicer's slice
    node reports it, SliceToRAS 4×4); a point placed in a view lies on its plane. None when no view, or
    views of different axes, contain the point (then the user's explicit choice stays)."""
    p = np.asarray(point_ras, dtype=np.float64)
    found = set()
    for orientation, slice_to_ras in views:
        m = np.asarray(slice_to_ras, dtype=np.float64)
        normal = m[:3, 2] / np.linalg.norm(m[:3, 2])
        if abs(float((p - m[:3, 3]) @ normal)) > tolerance_mm:
            continue
        axis = _SLICER_ORIENTATIONS.get(orientation)
        if axis is None:  # a reformatted view: use the preset its normal is closest to
            axis = max(AXES, key=lambda a: abs(float(VIEW_ORIENTATIONS[a][:, 2] @ normal)))
        found.add(axis)
    return found.pop() if len(found) == 1 else None


class SegmentationSession:
    """A predictor and its embedding cache; every method runs on the one worker thread."""

    def __init__(self, predictor: SamMed2DPredictor, cache_bytes: int | None = None) -> None:
        from .embedding_cache import DEFAULT_MAX_BYTES, EmbeddingCache  # torch

        self.predictor = predictor
        self.cache = EmbeddingCache(DEFAULT_MAX_BYTES if cache_bytes is None else cache_bytes)

    def segment(
        self,
        snapshot: VolumeSnapshot,
        window: IntensityWindow,
        points: Sequence[PointPrompt],
        rois: Sequence[RoiPrompt],
        axis: str,
        direction: str,
        settings: PropagationSettings | None = None,
        progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> VolumeSegmentation:
        """The prompted slice(s) only (`direction="none"`) or with propagation; cached embeddings reused."""
        from .segmenter import segment_volume

        return segment_volume(
            self.predictor, snapshot.array_kji, snapshot.ijk_to_ras, window, points, rois,
            axis=axis, direction=direction, settings=settings, cache=self.cache, cache_key=snapshot.key,
            progress=progress, should_cancel=should_cancel,
        )  # fmt: skip

    def prefetch(
        self,
        snapshot: VolumeSnapshot,
        window: IntensityWindow,
        axis: str,
        center: int,
        radius: int = 2,
        should_cancel: Callable[[], bool] | None = None,
    ) -> list[int]:
        """Encode the slices around `center` (nearest first) that are not cached yet, so the first click
        there does not wait for the encoder. Returns the slices encoded."""
        from .segmenter import make_engine

        geometry = snapshot.geometry(axis)
        engine = make_engine(self.predictor, snapshot.array_kji, geometry, window, cache=self.cache,
                             cache_key=snapshot.key)  # fmt: skip
        order = [center] + [center + d * s for d in range(1, radius + 1) for s in (1, -1)]
        encoded = []
        for index in order:
            if should_cancel is not None and should_cancel():
                break
            if 0 <= index < geometry.num_slices and (engine.cache_key, index) not in self.cache:
                engine.prepare(index)
                encoded.append(index)
        return encoded


__all__ = [
    "WINDOW_CHOICES",
    "SegmentationSession",
    "SliceConfidence",
    "VolumeSnapshot",
    "axis_from_views",
    "confidence_table",
    "slice_center_ras",
    "window_for",
]

"""The interactive segmentation session: one loaded model and one volume, the only way front ends segment
(the engine process, the command line and the tests), as nnInteractive's session is for its users.

`set_volume` once, then `propagate` (a generator of per-slice outcomes the caller iterates and can stop, as
SAM2's `propagate_in_video`) and `prefetch`; embeddings stay in one bounded cache shared by clicks,
propagation and the pre-encoding of slices near the one on screen. The helpers above the class are
torch-free: the Slicer process uses them while torch lives only in the engine process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from .geometry import AXES, VIEW_ORIENTATIONS, SliceGeometry
from .intensity import PRESETS, SA_MED2D_20M, IntensityWindow, default_window
from .prompts import PointPrompt, RoiPrompt, prompts_by_slice

if TYPE_CHECKING:  # torch-free at import (see the module docstring)
    from .disk_cache import DiskEmbeddingCache
    from .predictor import SamMed2DPredictor
    from .propagation import PropagationEngine, PropagationSettings, SliceOutcome
    from .segmenter import VolumeSegmentation

T = TypeVar("T")

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
    array_kji: np.ndarray,
    modality: str | None,
    choice: str,
    level: float | None = None,
    width: float | None = None,
    rule: str = SA_MED2D_20M,
) -> IntensityWindow:
    """The window the "Intensity window" choice means for this volume; "auto" is the model's own `rule`."""
    if choice == "auto":
        return default_window(array_kji, modality, rule)
    if choice == "custom":
        if level is None or width is None:
            raise ValueError("a custom intensity window needs a level and a width")
        return IntensityWindow.from_level_width(level, width)
    if choice in PRESETS:
        return IntensityWindow.from_preset(choice)
    raise ValueError(f"unknown intensity window {choice!r}; choose one of {', '.join(WINDOW_CHOICES)}")


def confidence_table(rows: Iterable[T]) -> list[T]:
    """Visited slices (anything with index, status, confidence), least certain first: the ones a user should
    look at before accepting the result. Rejected slices (where a walk stopped) come first, since the
    structure may continue there."""
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
    """A predictor, its embedding cache and the current volume. Not thread-safe: one caller at a time (the
    engine process runs every request on its main thread)."""

    def __init__(
        self,
        predictor: SamMed2DPredictor,
        cache_bytes: int | None = None,
        disk_cache: DiskEmbeddingCache | str | os.PathLike[str] | None = None,
        model_sha256: str | None = None,
        intensity_rule: str = SA_MED2D_20M,
    ) -> None:
        """`disk_cache` (a folder or a `DiskEmbeddingCache`) keeps embeddings across sessions, keyed by the
        volume's content and `model_sha256` (the checkpoint file's hash; else hashed from the weights).
        `intensity_rule` is the model's own conversion (`weights.registry.intensity_rule`), used when
        `set_volume` gets no window."""
        from .disk_cache import DiskEmbeddingCache, weights_hash  # torch
        from .embedding_cache import DEFAULT_MAX_BYTES, EmbeddingCache

        self.predictor = predictor
        self.intensity_rule = intensity_rule
        if disk_cache is not None and not isinstance(disk_cache, DiskEmbeddingCache):
            disk_cache = DiskEmbeddingCache(disk_cache)
        memory_bytes = DEFAULT_MAX_BYTES if cache_bytes is None else cache_bytes
        self.cache = EmbeddingCache(memory_bytes, disk=disk_cache)
        if disk_cache is not None:  # an entry of another shape or dtype on disk is discarded, not fatal
            prompts = predictor.model.prompt_encoder
            shape = (1, prompts.embed_dim, *prompts.image_embedding_size)
            disk_cache.expect(shape, predictor.embedding_dtype)
        if disk_cache is not None and model_sha256 is None:
            model_sha256 = weights_hash(predictor.model)
        self.model_sha256 = model_sha256
        self.cache_key: object = None  # the volume's part of every embedding key (see `set_volume`)
        self.volume: VolumeSnapshot | None = None
        self.window: IntensityWindow | None = None
        self.last: VolumeSegmentation | None = None  # what the last `propagate` did (filled as it goes)

    def set_volume(
        self,
        array_kji: np.ndarray,
        ijk_to_ras: np.ndarray,
        modality: str | None = None,
        window: IntensityWindow | None = None,
        key: str | None = None,
    ) -> None:
        """The volume to segment, and the window the model sees it through (default: the model's rule).
        `key` names this state of the volume: embeddings cached under another key are never reused."""
        array_kji = np.asarray(array_kji)
        if array_kji.ndim != 3 or min(array_kji.shape) < 1:
            raise ValueError(f"expected a 3-D volume, got shape {array_kji.shape}")
        if key is None:
            key = f"volume-{id(array_kji)}"
        self.volume = VolumeSnapshot(key, array_kji, np.asarray(ijk_to_ras, dtype=np.float64), modality)
        if window is None:
            window = default_window(array_kji, modality, self.intensity_rule)
        self.window = window
        self.cache_key = key
        if self.cache.disk is not None:  # on disk only the content can name the volume (hashed once here)
            from .disk_cache import content_key

            ijk_to_ras, precision = self.volume.ijk_to_ras, self.predictor.precision
            self.cache_key = content_key(array_kji, ijk_to_ras, self.model_sha256, precision)

    def set_window(self, window: IntensityWindow) -> None:
        self.window = window

    def _require_volume(self) -> VolumeSnapshot:
        if self.volume is None or self.window is None:
            raise RuntimeError("no volume: call set_volume first")
        return self.volume

    def engine(self, axis: str, settings: PropagationSettings | None = None) -> PropagationEngine:
        from .segmenter import make_engine

        volume = self._require_volume()
        return make_engine(self.predictor, volume.array_kji, volume.geometry(axis), self.window, settings,
                           cache=self.cache, cache_key=self.cache_key)  # fmt: skip

    def propagate(
        self,
        points: Sequence[PointPrompt] = (),
        rois: Sequence[RoiPrompt] = (),
        axis: str = "axial",
        direction: str = "both",
        settings: PropagationSettings | None = None,
        seed_masks: Mapping[int, np.ndarray] | None = None,
        current_masks: Mapping[int, np.ndarray] | None = None,
    ) -> Iterator[SliceOutcome]:
        """Segment the slices holding the prompts (points and ROIs in world RAS), then walk `direction`
        ("none", "up", "down", "both"), yielding each slice as it is done. `seed_masks` ({slice: mask in
        display orientation}) start the walk from masks the user already has ("propagate from here") instead
        of prompts. `current_masks` ({slice: the segment's mask there}) let a slice with only exclude points
        refine that mask (`PropagationEngine.with_current_masks`).
        `self.last` holds the geometry, seeds and result, including after an early stop."""
        from .propagation import PropagationResult
        from .segmenter import VolumeSegmentation, split_prompts

        volume = self._require_volume()
        geometry = volume.geometry(axis)
        roi_boxes: dict[int, np.ndarray] = {}
        if seed_masks:
            seeds: dict = {int(i): np.asarray(m, dtype=bool) for i, m in seed_masks.items()}
            if rois:
                _, roi_boxes = split_prompts(prompts_by_slice(geometry, (), rois), True)
        else:
            seeds, roi_boxes = split_prompts(prompts_by_slice(geometry, points, rois), bool(rois))
        engine = self.engine(axis, settings)
        if current_masks:
            seeds = engine.with_current_masks(seeds, current_masks, roi_boxes)
        result = PropagationResult()
        self.last = VolumeSegmentation(geometry, self.window, seeds, roi_boxes, result)
        up = geometry.normal_sign
        yield from engine.iterate(seeds, direction, up, roi_boxes=roi_boxes or None, result=result)

    def prefetch(
        self, axis: str, indices: Iterable[int], should_cancel: Callable[[], bool] | None = None
    ) -> list[int]:
        """Encode those of `indices` that are on the volume and not cached yet, in the order given, so a click
        there does not wait for the encoder (an embedding found in the disk cache is read, not encoded).
        Returns the slices encoded."""
        engine = self.engine(axis)
        encoded = []
        for index in indices:
            if should_cancel is not None and should_cancel():
                break
            if 0 <= index < engine.num_slices and (engine.cache_key, index) not in self.cache:
                before = engine.encoded_slices
                engine.prepare(index)
                if engine.encoded_slices > before:
                    encoded.append(index)
        return encoded


def nearest_first(center: int, count: int, radius: int | None = None) -> list[int]:
    """Slice indices from `center` outwards (center, +1, −1, +2, …) within 0..count−1 and `radius`."""
    radius = count if radius is None else radius
    order = [center] + [center + d * s for d in range(1, radius + 1) for s in (1, -1)]
    return [i for i in order if 0 <= i < count]


__all__ = [
    "WINDOW_CHOICES",
    "SegmentationSession",
    "VolumeSnapshot",
    "axis_from_views",
    "nearest_first",
    "confidence_table",
    "slice_center_ras",
    "window_for",
]

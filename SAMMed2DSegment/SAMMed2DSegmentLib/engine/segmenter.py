"""Segment a structure in a volume from physical-space prompts: the one call the command line and the
Slicer module's Logic share (pure layer; the caller reads volumes and markups and writes the result)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .embedding_cache import EmbeddingCache
from .geometry import SliceGeometry
from .intensity import IntensityWindow, to_uint8
from .predictor import SamMed2DPredictor
from .prompts import PointPrompt, PromptError, RoiPrompt, SlicePrompt, prompts_by_slice
from .propagation import ProgressCallback, PropagationEngine, PropagationResult, PropagationSettings


@dataclass
class VolumeSegmentation:
    geometry: SliceGeometry
    window: IntensityWindow
    seeds: dict[int, SlicePrompt]
    roi_boxes: dict[int, np.ndarray]
    result: PropagationResult


def split_prompts(
    prompts: dict[int, SlicePrompt], has_roi: bool
) -> tuple[dict[int, SlicePrompt], dict[int, np.ndarray]]:
    """Seeds are the slices with points (with the ROI's box there, if any); without points the ROI's middle
    slice seeds with its box alone. The ROI's boxes on every slice bound the propagation."""
    roi_boxes = {i: p.box for i, p in prompts.items() if p.box is not None} if has_roi else {}
    seeds = {i: p for i, p in prompts.items() if p.has_points}
    if not seeds and roi_boxes:
        ordered = sorted(roi_boxes)
        middle = ordered[len(ordered) // 2]
        seeds = {middle: SlicePrompt(box=roi_boxes[middle])}
    if not seeds:
        raise PromptError("no prompt: place at least one include point or an ROI")
    return seeds, roi_boxes


def make_slice_source(
    volume_kji: np.ndarray, geometry: SliceGeometry, window: IntensityWindow
) -> Callable[[int], np.ndarray]:
    """uint8 display-oriented slices for the model, windowed the same way for every slice."""

    def slice_image(index: int) -> np.ndarray:
        return np.ascontiguousarray(to_uint8(geometry.view(volume_kji, index), window))

    return slice_image


def make_engine(
    predictor: SamMed2DPredictor,
    volume_kji: np.ndarray,
    geometry: SliceGeometry,
    window: IntensityWindow,
    settings: PropagationSettings | None = None,
    cache: EmbeddingCache | None = None,
    cache_key: object = None,
) -> PropagationEngine:
    """The engine for one volume, view and window; engines made with the same `cache` and `cache_key` share
    embeddings (the module pre-computes slices near the one the user looks at with one)."""
    return PropagationEngine(
        predictor,
        make_slice_source(volume_kji, geometry, window),
        geometry.num_slices,
        geometry.slice_shape,
        pixel_spacing=geometry.pixel_spacing,
        cache=cache,
        cache_key=(cache_key, geometry.axis, window.low, window.high),
        settings=settings,
    )


def segment_volume(
    predictor: SamMed2DPredictor,
    volume_kji: np.ndarray,
    ijk_to_ras: np.ndarray,
    window: IntensityWindow,
    points: Sequence[PointPrompt] = (),
    rois: Sequence[RoiPrompt] = (),
    axis: str = "axial",
    direction: str = "both",
    settings: PropagationSettings | None = None,
    cache: EmbeddingCache | None = None,
    cache_key: object = None,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> VolumeSegmentation:
    """Prompts in world RAS → per-slice masks (in display orientation) with status and confidence."""
    geometry = SliceGeometry.create(volume_kji.shape, ijk_to_ras, axis)
    prompts = prompts_by_slice(geometry, points, rois)
    seeds, roi_boxes = split_prompts(prompts, bool(rois))
    engine = make_engine(predictor, volume_kji, geometry, window, settings, cache, cache_key)
    result = engine.run(
        seeds,
        direction=direction,
        up_step=geometry.normal_sign,
        roi_boxes=roi_boxes or None,
        progress=progress,
        should_cancel=should_cancel,
    )
    return VolumeSegmentation(geometry, window, seeds, roi_boxes, result)

"""The pieces the session assembles for one volume, view and window: windowed display-oriented slices, the
propagation engine over them, and seeds from physical-space prompts (pure layer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .embedding_cache import EmbeddingCache
from .geometry import SliceGeometry
from .intensity import IntensityWindow, to_uint8
from .predictor import SamMed2DPredictor
from .prompts import PromptError, SlicePrompt
from .propagation import PropagationEngine, PropagationResult, PropagationSettings


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

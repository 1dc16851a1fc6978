"""The interactive protocol on one structure of a labelled volume: a first prompt on every slice where the
structure is present, then simulated corrective clicks; one propagated seed scored in 3-D; and a region-grow
baseline beside both.

Per slice (the loop SAM-Med2D's iterative test runs, with the first prompt kept): the first prompt is the
label's bounding box (or, with ``first="point"``, its deepest point as an include click). Each corrective
click (``clicks.next_click``) is added to the prompts so far, and the previous low-resolution logits go back
in as the mask prompt, as sigmoid probabilities (how SAM-Med2D trains and tests, and how the engine feeds
them). No post-processing: the evaluation scores the model, not the engine's "keep the clicked pieces" step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..engine.geometry import SliceGeometry
from ..engine.masks import bounding_box
from ..engine.prompts import SlicePrompt
from ..engine.propagation import PropagationEngine
from .clicks import INCLUDE, deepest_point, dice, next_click

#: predict(prompt, mask_input or None) → (mask, low-res logits): one decoder call on the current slice.
Predict = Callable[[SlicePrompt, np.ndarray | None], tuple[np.ndarray, np.ndarray]]

FIRST_PROMPTS = ("box", "point")
REGION_GROW_HU = 35.0


def first_prompt(truth: np.ndarray, first: str, spacing: tuple[float, float]) -> SlicePrompt:
    """The label's tight bounding box (inclusive pixel corners), or its deepest point as an include click."""
    if first == "box":
        x0, y0, x1, y1 = bounding_box(truth)
        return SlicePrompt(box=np.array([x0, y0, x1, y1], dtype=np.float64))
    if first == "point":
        x, y = deepest_point(truth, spacing)
        return SlicePrompt(points=np.array([[x, y]], dtype=np.float64), labels=np.array([INCLUDE]))
    raise ValueError(f"first prompt must be one of {', '.join(FIRST_PROMPTS)}, got {first!r}")


def interactive_slice(
    predict: Predict, truth: np.ndarray, first: str = "box", max_clicks: int = 5,
    spacing: tuple[float, float] = (1.0, 1.0),
) -> list[float]:  # fmt: skip
    """Dice after the first prompt, then after each corrective click (`max_clicks` + 1 values). Once the
    mask is exact there is nothing to click: the remaining values repeat it."""
    prompt = first_prompt(truth, first, spacing)
    mask, low_res = predict(prompt, None)
    scores = [dice(mask, truth)]
    for _ in range(max_clicks):
        click = next_click(mask, truth, spacing)
        if click is None:
            scores.append(scores[-1])
            continue
        prompt = SlicePrompt(
            points=np.vstack([prompt.points, [[click.x, click.y]]]),
            labels=np.append(prompt.labels, click.label).astype(np.int64),
            box=prompt.box,
        )
        mask, low_res = predict(prompt, 1.0 / (1.0 + np.exp(-np.asarray(low_res, dtype=np.float64))))
        scores.append(dice(mask, truth))
    return scores


def area_under_curve(curve: list[float]) -> float:
    """Trapezoid area under Dice against click number, divided by the number of clicks (0..1); with no
    clicks, the first prompt's Dice."""
    values = np.asarray(curve, dtype=np.float64)
    if len(values) == 1:
        return float(values[0])
    return float(((values[1:] + values[:-1]) / 2).sum() / (len(values) - 1))


def engine_predict(engine: PropagationEngine, index: int) -> Predict:
    """The model's decoder on slice `index` of the engine (encoded once, then cached), best of the three
    multimask outputs by predicted IoU as every official entry point does."""

    def predict(prompt: SlicePrompt, mask_input: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if mask_input is not None:
            mask_input = mask_input.astype(np.float32)
        mask, _, low_res = engine.segment(index, prompt, mask_input=mask_input)
        return mask, low_res

    return predict


def region_grow(
    values: np.ndarray, seed_index: tuple[int, ...], tolerance: float = REGION_GROW_HU
) -> np.ndarray:
    """Voxels connected to the seed (array index order) within ±`tolerance` of its value (2-D or 3-D), by
    ITK's ConnectedThreshold: the simple baseline the model has to beat."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
    value = float(values[seed_index])
    grown = sitk.ConnectedThreshold(image, seedList=[tuple(int(v) for v in reversed(seed_index))],
                                    lower=value - tolerance, upper=value + tolerance)  # fmt: skip
    return sitk.GetArrayFromImage(grown).astype(bool)


@dataclass
class StructureResult:
    """What `evaluate_structure` measured; `as_json` is the documented `evaluate` output."""

    slices: list[dict] = field(default_factory=list)
    propagation_dice: float = 0.0
    propagation_slices: int = 0
    seed_slice: int = -1
    baseline_slices: list[float] = field(default_factory=list)
    baseline_propagation_dice: float = 0.0

    @property
    def dice_per_click(self) -> list[float]:
        curves = np.array([s["dice_per_click"] for s in self.slices], dtype=np.float64)
        return [float(v) for v in curves.mean(axis=0)]

    def as_json(self) -> dict:
        curve = self.dice_per_click
        return {
            "dice_per_click": [round(v, 4) for v in curve],
            "dice_auc": round(area_under_curve(curve), 4),
            "final_dice": round(curve[-1], 4),
            "slices": self.slices,
            "propagation_dice": round(self.propagation_dice, 4),
            "propagation": {"seed_slice": self.seed_slice, "slices_written": self.propagation_slices},
            "baseline": {
                "method": f"region grow ±{REGION_GROW_HU:g} (volume units) from the label's deepest point",
                "dice": round(float(np.mean(self.baseline_slices)), 4),
                "dice_per_slice": [round(v, 4) for v in self.baseline_slices],
                "propagation_dice": round(self.baseline_propagation_dice, 4),
            },
        }


def evaluate_structure(
    engine: PropagationEngine, geometry: SliceGeometry, values: np.ndarray, truth: np.ndarray, *,
    first: str = "box", max_clicks: int = 5, min_pixels: int = 1,
    on_slice: Callable[[int, list[float]], None] | None = None,
) -> StructureResult:  # fmt: skip
    """The whole protocol for one structure: `values` is the volume (for the baseline) and `truth` its
    boolean label, both in KJI order on the grid `geometry` slices; `engine` sees the same volume, and its
    settings (the engine's defaults unless the caller chose others) drive the propagation."""
    spacing = geometry.pixel_spacing
    present = [i for i in range(geometry.num_slices) if int(geometry.view(truth, i).sum()) >= min_pixels]
    if not present:
        raise ValueError(f"the label has no slice with ≥ {min_pixels} voxels along this axis")
    result = StructureResult()
    for index in present:
        label = np.ascontiguousarray(geometry.view(truth, index))
        curve = interactive_slice(engine_predict(engine, index), label, first, max_clicks, spacing)
        result.slices.append({"index": index, "pixels": int(label.sum()),
                              "dice_per_click": [round(v, 4) for v in curve]})  # fmt: skip
        x, y = deepest_point(label, spacing)
        grown = region_grow(np.ascontiguousarray(geometry.view(values, index)), (y, x))
        result.baseline_slices.append(dice(grown, label))
        if on_slice is not None:
            on_slice(index, curve)

    # One seed on the largest slice, propagated both ways with the engine's settings.
    seed = largest_slice(geometry, truth)
    label = np.ascontiguousarray(geometry.view(truth, seed))
    result.propagation_dice, result.propagation_slices = propagation_dice(
        engine, geometry, truth, seed, first_prompt(label, first, spacing)
    )
    result.seed_slice = seed
    x, y = deepest_point(label, spacing)
    seed_kji = np.argwhere(_index_volume(geometry, seed, x, y, truth.shape))[0]
    result.baseline_propagation_dice = dice(region_grow(values, tuple(int(v) for v in seed_kji)), truth)
    return result


def largest_slice(geometry: SliceGeometry, truth: np.ndarray) -> int:
    """The slice where the structure is largest (the first of equals): where a user would start."""
    areas = [int(geometry.view(truth, i).sum()) for i in range(geometry.num_slices)]
    return int(np.argmax(areas))


def propagation_dice(
    engine: PropagationEngine, geometry: SliceGeometry, truth: np.ndarray, seed: int, prompt: SlicePrompt
) -> tuple[float, int]:
    """3-D Dice of the volume the engine propagates from one prompted slice (both ways), and the number of
    slices it wrote."""
    propagated = np.zeros(truth.shape, dtype=bool)
    written = 0
    for outcome in engine.iterate({seed: prompt}, "both", geometry.normal_sign):
        if outcome.accepted and outcome.mask is not None:
            geometry.view(propagated, outcome.index)[...] = outcome.mask
            written += 1
    return dice(propagated, truth), written


def _index_volume(geometry: SliceGeometry, index: int, x: int, y: int, shape: tuple[int, ...]) -> np.ndarray:
    """A volume marking the voxel shown at (x, y) of slice `index`: the slice's display view may be flipped
    or transposed, so the voxel is found through the same view rather than by formula."""
    marker = np.zeros(shape, dtype=bool)
    geometry.view(marker, index)[y, x] = True
    return marker

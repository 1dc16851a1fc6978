"""Slice-by-slice propagation that stops where the structure ends (pure layer: numpy + torch).

From each prompted ("seed") slice the engine steps outwards one slice at a time. The next slice is prompted
with what the previous result says about the structure: a box around the previous mask with a margin, one
include point deep inside it, and optionally the previous low-resolution logits as a mask prompt. A slice is
rejected, and the walk in that direction stops, when the model's own predicted IoU drops below a
threshold, the mask empties, its area collapses or jumps, its centroid jumps, or the walk leaves the ROI or
the volume. Every visited slice gets a status, a confidence and the reason the walk ended there.

Embeddings come from a bounded LRU cache and are computed only for slices actually visited.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from .embedding_cache import EmbeddingCache
from .masks import bounding_box, centroid, components_touching, interior_point
from .predictor import SamMed2DPredictor
from .prompts import INCLUDE, SlicePrompt

DIRECTIONS = ("both", "up", "down", "none")


@dataclass(frozen=True)
class PropagationSettings:
    """Stopping rules and prompt derivation; defaults are documented in the README's propagation section."""

    iou_threshold: float = 0.5  # reject a slice whose predicted IoU is lower
    min_area_mm2: float = 10.0  # smaller masks count as "structure ended"
    area_shrink: float = 0.2  # reject when area < area_shrink × previous area (ends taper fast)
    area_growth: float = 2.5  # reject when area > area_growth × previous area
    centroid_jump: float = 2.0  # reject when the centroid moves more than this × previous equivalent radius
    box_margin: float = 0.1  # derived box grows by this fraction of its size on each side ...
    min_box_margin_px: int = 3  # ... and by at least this many pixels
    use_interior_point: bool = True
    use_mask_prompt: bool = False  # feed sigmoid(previous low-res logits) as mask prompt
    keep_connected: bool = True  # keep only the pieces containing include points / the interior point

    def __post_init__(self) -> None:
        if not 0 <= self.iou_threshold <= 1:
            raise ValueError(f"iou_threshold must be within 0..1, got {self.iou_threshold}")
        if self.area_shrink <= 0 or self.area_shrink >= 1:
            raise ValueError(f"area_shrink must be within (0, 1), got {self.area_shrink}")
        if self.area_growth <= 1:
            raise ValueError(f"area_growth must be > 1, got {self.area_growth}")
        if self.centroid_jump <= 0 or self.min_area_mm2 < 0 or self.box_margin < 0:
            raise ValueError("centroid_jump must be > 0; min_area_mm2 and box_margin must be ≥ 0")


@dataclass
class SliceOutcome:
    index: int
    status: str  # "prompted" | "given" (a mask the user had) | "propagated" | "rejected"
    predicted_iou: float
    confidence: float
    area_px: int
    reason: str = ""  # for the last slice of a walk: why the walk stopped
    mask: np.ndarray | None = None  # None for rejected slices
    low_res: np.ndarray | None = field(default=None, repr=False)

    @property
    def accepted(self) -> bool:
        return self.status != "rejected"


@dataclass
class Walk:
    """One direction from one seed: where it went and why it ended."""

    seed: int
    step: int
    last_accepted: int
    reason: str


@dataclass
class PropagationResult:
    slices: dict[int, SliceOutcome] = field(default_factory=dict)
    walks: list[Walk] = field(default_factory=list)
    cancelled: bool = False
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0
    total_seconds: float = 0.0
    encoded_slices: int = 0

    def masks(self) -> dict[int, np.ndarray]:
        """Accepted, non-empty masks by slice index: what should be written into the segment. An empty mask
        says the model found nothing there; it never replaces voxels the segment already has."""
        kept = {i: o for i, o in sorted(self.slices.items()) if o.accepted and o.mask is not None}
        return {i: o.mask for i, o in kept.items() if o.mask.any()}


ProgressCallback = Callable[[int, SliceOutcome], None]


class PropagationEngine:
    """Segments slices of one volume seen along one axis.

    `slice_image(index)` returns the uint8 image the model sees (already windowed, display orientation),
    of shape `slice_shape`; `pixel_spacing` is the (row, col) pixel size in mm (area and centroid rules).
    """

    def __init__(
        self,
        predictor: SamMed2DPredictor,
        slice_image: Callable[[int], np.ndarray],
        num_slices: int,
        slice_shape: tuple[int, int],
        pixel_spacing: tuple[float, float] = (1.0, 1.0),
        cache: EmbeddingCache | None = None,
        cache_key: object = None,
        settings: PropagationSettings | None = None,
    ) -> None:
        if num_slices < 1:
            raise ValueError("volume has no slices")
        self.predictor = predictor
        self.slice_image = slice_image
        self.num_slices = num_slices
        self.slice_shape = (int(slice_shape[0]), int(slice_shape[1]))
        self.pixel_area = float(pixel_spacing[0] * pixel_spacing[1])
        self.pixel_spacing = pixel_spacing
        self.cache = cache if cache is not None else EmbeddingCache()
        self.cache_key = cache_key
        self.settings = settings or PropagationSettings()
        self.encode_seconds = 0.0
        self.decode_seconds = 0.0
        self.encoded_slices = 0

    # -- one slice -------------------------------------------------------------------------------
    def _encode(self, index: int) -> object:
        start = time.perf_counter()
        self.predictor.set_image(self.slice_image(index))
        self.encode_seconds += time.perf_counter() - start
        self.encoded_slices += 1
        return self.predictor.get_image_embedding()

    def prepare(self, index: int) -> None:
        """Make `index` the predictor's current image, encoding it only when not cached."""
        if not 0 <= index < self.num_slices:
            raise IndexError(f"slice {index} outside 0..{self.num_slices - 1}")
        key = (self.cache_key, index)
        cached = self.cache.get(key)
        if cached is None:
            self.cache.put(key, self._encode(index))
        else:
            self.predictor.set_embedding(cached, self.slice_shape)

    def segment(
        self,
        index: int,
        prompt: SlicePrompt,
        mask_input: np.ndarray | None = None,
        seeds: np.ndarray | None = None,
    ) -> tuple[np.ndarray, float, np.ndarray]:
        """Mask, predicted IoU and low-res logits for one slice (multimask output, best by predicted IoU)."""
        self.prepare(index)
        start = time.perf_counter()
        masks, iou, low_res = self.predictor.predict(**prompt.predictor_kwargs(), mask_input=mask_input)
        mask = masks[0]
        if self.settings.keep_connected and seeds is not None and len(seeds):
            mask = components_touching(mask, seeds)
        self.decode_seconds += time.perf_counter() - start
        return mask, float(iou[0]), low_res

    # -- prompts from a previous result ------------------------------------------------------------
    def derive_prompt(self, mask: np.ndarray, roi_box: np.ndarray | None) -> tuple[SlicePrompt, np.ndarray]:
        """Box around `mask` with a margin (limited to the ROI's box) and an interior include point."""
        x0, y0, x1, y1 = bounding_box(mask)
        s = self.settings
        mx = max(s.min_box_margin_px, s.box_margin * (x1 - x0 + 1))
        my = max(s.min_box_margin_px, s.box_margin * (y1 - y0 + 1))
        rows, cols = mask.shape
        box = np.array(
            [max(x0 - mx, 0), max(y0 - my, 0), min(x1 + mx, cols - 1), min(y1 + my, rows - 1)], float
        )
        if roi_box is not None:
            box = np.r_[np.maximum(box[:2], roi_box[:2]), np.minimum(box[2:], roi_box[2:])]
        prompt = SlicePrompt(box=box)
        seeds = np.zeros((0, 2))
        if s.use_interior_point:
            seeds = np.array([interior_point(mask)], dtype=np.float64)
            prompt.points, prompt.labels = seeds, np.array([INCLUDE])
        return prompt, seeds

    def refine_prompt(self, mask: np.ndarray, prompt: SlicePrompt, roi_box: np.ndarray | None) -> SlicePrompt:
        """An exclude-only correction of a slice that has a mask already (a negative click refines the current
        mask, as in SAM tools): the prompt a propagated slice gets from that mask (box with a margin, interior
        include point) plus the exclude points. On the bundled CT this removed more of a spill than the
        mask's box alone or its logits as mask prompt, and kept the liver's Dice (README, step 6)."""
        if mask.shape != self.slice_shape or not mask.any():
            raise ValueError("the current mask is empty or of another shape")
        derived, _ = self.derive_prompt(mask, roi_box)
        points = np.vstack([prompt.points, derived.points])
        return SlicePrompt(points, np.r_[prompt.labels, derived.labels].astype(np.int64), derived.box)

    def with_current_masks(
        self,
        seeds: dict[int, SlicePrompt | np.ndarray],
        current: Mapping[int, np.ndarray],
        roi_boxes: dict[int, np.ndarray] | None = None,
    ) -> dict[int, SlicePrompt | np.ndarray]:
        """`seeds` with each exclude-only prompt whose slice has voxels in `current` (the segment's masks, in
        display orientation) turned into a `refine_prompt`; the others are left for `iterate` to judge."""
        refined = dict(seeds)
        for index, prompt in seeds.items():
            mask = current.get(index)
            if isinstance(prompt, SlicePrompt) and not prompt.has_include and mask is not None and mask.any():
                roi_box = roi_boxes.get(index) if roi_boxes else None
                refined[index] = self.refine_prompt(np.asarray(mask, dtype=bool), prompt, roi_box)
        return refined

    def _confidence(self, iou: float, area: int, previous_area: int | None) -> float:
        """Predicted IoU (clipped to 0..1) times area consistency with the previous slice."""
        conf = min(max(iou, 0.0), 1.0)
        if previous_area:
            ratio = area / previous_area
            conf *= min(ratio, 1 / ratio) if ratio > 0 else 0.0
        return conf

    def _rejection(self, mask: np.ndarray, iou: float, previous: SliceOutcome) -> str:
        s = self.settings
        area = int(mask.sum())
        if area == 0:
            return "structure ended (empty mask)"
        if iou < s.iou_threshold:
            return f"low predicted IoU ({iou:.2f} < {s.iou_threshold:.2f})"
        if area * self.pixel_area < s.min_area_mm2 or area < s.area_shrink * previous.area_px:
            return f"area collapsed ({previous.area_px} → {area} px)"
        if area > s.area_growth * previous.area_px:
            return f"area jumped ({previous.area_px} → {area} px)"
        (cx, cy), (px, py) = centroid(mask), centroid(previous.mask)
        row_mm, col_mm = self.pixel_spacing
        shift = math.hypot((cx - px) * col_mm, (cy - py) * row_mm)
        radius = math.sqrt(previous.area_px * self.pixel_area / math.pi)
        if shift > s.centroid_jump * radius:
            return f"centroid jumped ({shift:.1f} mm > {s.centroid_jump:.2f} × radius {radius:.1f} mm)"
        return ""

    # -- the walk ------------------------------------------------------------------------------------
    def run(
        self,
        seeds: dict[int, SlicePrompt | np.ndarray],
        direction: str = "both",
        up_step: int = 1,
        roi_boxes: dict[int, np.ndarray] | None = None,
        progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> PropagationResult:
        """`iterate` to the end, or until `should_cancel()` says stop (checked before every slice)."""
        cancel = should_cancel or (lambda: False)
        result = PropagationResult()
        if cancel():
            result.cancelled = True
            return result
        walk = self.iterate(seeds, direction, up_step, roi_boxes, result=result)
        try:
            for outcome in walk:
                if progress:
                    progress(len(result.slices), outcome)
                if cancel():
                    result.cancelled = True
                    break
        finally:
            walk.close()
        return result

    def iterate(
        self,
        seeds: dict[int, SlicePrompt | np.ndarray],
        direction: str = "both",
        up_step: int = 1,
        roi_boxes: dict[int, np.ndarray] | None = None,
        result: PropagationResult | None = None,
    ) -> Iterator[SliceOutcome]:
        """Segment the seed slices, then walk outwards from each, yielding every slice as it is done (as
        SAM2's `propagate_in_video` does): the caller shows progress and stops by leaving the loop; `result`
        (filled as the walk goes) keeps every finished slice.

        A seed is a `SlicePrompt`, or a mask the user already has on that slice ("propagate from here":
        the walk starts from it and it is yielded with status "given", never re-segmented).
        `up_step` is the index step (+1 or −1) that moves "up" along the view normal. With an ROI
        (`roi_boxes`: its box on every slice it crosses) the walk stays inside the ROI's slices and boxes.
        Between two seeds, each covers the slices nearer to it.
        """
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")
        if up_step not in (1, -1):
            raise ValueError("up_step must be +1 or -1")
        if not seeds:
            raise ValueError("no prompted slice to start from")
        for index, prompt in seeds.items():
            if not 0 <= index < self.num_slices:
                raise IndexError(f"seed slice {index} outside 0..{self.num_slices - 1}")
            if isinstance(prompt, np.ndarray):
                if prompt.shape != self.slice_shape or not prompt.any():
                    raise ValueError(f"the mask given for slice {index} is empty or of another shape")
            elif not prompt.has_include:
                raise ValueError(
                    f"slice {index} has only exclude points and no segment there to correct: "
                    "add an include point or a box"
                )
        result = result if result is not None else PropagationResult()
        start = time.perf_counter()
        self.encode_seconds = self.decode_seconds = 0.0
        self.encoded_slices = 0
        order = sorted(seeds)
        steps = {"both": (up_step, -up_step), "up": (up_step,), "down": (-up_step,), "none": ()}[direction]
        try:
            for index in order:
                outcome = self._seed_outcome(index, seeds[index], roi_boxes)
                result.slices[index] = outcome
                yield outcome
            for pos, index in enumerate(order):
                for step in steps:
                    limit = self._limit(order, pos, step, len(steps) == 2, roi_boxes)
                    yield from self._walk(index, step, limit, roi_boxes, result)
        finally:
            result.encode_seconds = self.encode_seconds
            result.decode_seconds = self.decode_seconds
            result.encoded_slices = self.encoded_slices
            result.total_seconds = time.perf_counter() - start

    def _seed_outcome(
        self, index: int, prompt: SlicePrompt | np.ndarray, roi_boxes: dict[int, np.ndarray] | None
    ) -> SliceOutcome:
        if isinstance(prompt, np.ndarray):
            mask = prompt.astype(bool)
            return SliceOutcome(index, "given", 1.0, 1.0, int(mask.sum()), mask=mask)
        include = prompt.points[prompt.labels == INCLUDE] if prompt.has_points else np.zeros((0, 2))
        mask, iou, low_res = self.segment(index, prompt, seeds=include)
        if roi_boxes and index in roi_boxes:  # the ROI bounds the result on every slice it crosses
            mask = mask & _box_mask(mask.shape, roi_boxes[index])
        area = int(mask.sum())
        return SliceOutcome(
            index, "prompted", iou, self._confidence(iou, area, None), area, mask=mask, low_res=low_res
        )

    def _limit(
        self, order: list[int], pos: int, step: int, both: bool, roi_boxes: dict[int, np.ndarray] | None
    ) -> tuple[int, str]:
        """Last slice index the walk may reach in `step` direction, and the reason it stops there."""
        index = order[pos]
        neighbour = order[pos + 1] if step > 0 and pos + 1 < len(order) else None
        if step < 0 and pos > 0:
            neighbour = order[pos - 1]
        if neighbour is not None:
            # Split the gap between two seeds (each walks towards the other when both directions run).
            if both:
                mid = (index + neighbour) // 2
                last = mid if step > 0 else mid + 1
            else:
                last = neighbour - step
            return last, "reached the part covered by the next prompted slice"
        if roi_boxes:
            return (max(roi_boxes) if step > 0 else min(roi_boxes)), "left the ROI"
        return (self.num_slices - 1 if step > 0 else 0), "reached the volume edge"

    def _walk(
        self,
        seed: int,
        step: int,
        limit: tuple[int, str],
        roi_boxes: dict[int, np.ndarray] | None,
        result: PropagationResult,
    ) -> Iterator[SliceOutcome]:
        """One direction from one seed; the `Walk` record (where it ended and why) goes into `result`."""
        last, edge_reason = limit
        previous = result.slices[seed]
        index = seed
        walk = Walk(seed, step, index, "")
        result.walks.append(walk)
        while True:
            nxt = index + step
            walk.last_accepted = index
            if (nxt - last) * step > 0:
                walk.reason = edge_reason
                return
            if previous.mask is None or not previous.mask.any():
                walk.reason = "structure ended (empty mask)"
                return
            roi_box = roi_boxes.get(nxt) if roi_boxes else None
            prompt, seeds = self.derive_prompt(previous.mask, roi_box)
            mask_input = None
            if self.settings.use_mask_prompt and previous.low_res is not None:
                mask_input = 1.0 / (1.0 + np.exp(-previous.low_res))
            mask, iou, low_res = self.segment(nxt, prompt, mask_input=mask_input, seeds=seeds)
            if roi_box is not None:
                mask = mask & _box_mask(mask.shape, roi_box)
            area = int(mask.sum())
            reason = self._rejection(mask, iou, previous)
            if reason:
                outcome = SliceOutcome(nxt, "rejected", iou, 0.0, area, reason=reason, low_res=low_res)
                result.slices.setdefault(nxt, outcome)
                walk.reason = reason
                yield outcome
                return
            outcome = SliceOutcome(
                nxt,
                "propagated",
                iou,
                self._confidence(iou, area, previous.area_px),
                area,
                mask=mask,
                low_res=low_res,
            )
            result.slices[nxt] = outcome
            yield outcome
            previous, index = outcome, nxt


def _box_mask(shape: tuple[int, int], box: np.ndarray) -> np.ndarray:
    """Pixels whose centres lie inside a continuous (x0, y0, x1, y1) box."""
    rows, cols = shape
    ys = np.arange(rows)[:, None]
    xs = np.arange(cols)[None, :]
    return (xs >= box[0]) & (xs <= box[2]) & (ys >= box[1]) & (ys <= box[3])

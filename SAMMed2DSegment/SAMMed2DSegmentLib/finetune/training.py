"""Fine-tuning SAM-Med2D on one's own labelled volumes, with prompts simulated the way SAM-Med2D was trained.

Why it looks like this:

* Training samples are 2-D slices of labelled volumes in the three views, cut with the same `SliceGeometry`
  the engine uses, so a model sees slices oriented and stretched exactly as it will at inference (the image
  is resized to 256×256 without keeping the aspect ratio, as the official predictor does).
* Prompts follow SAM-Med2D's recipe: random include points from the mask, boxes with jitter, and a second
  round with a correction point from the error region and the previous logits as mask prompt.
* All randomness comes from one numpy generator whose state is saved with the weights, so a run is
  deterministic for a seed and an interrupted run resumes exactly where it stopped.
* Training state is one safetensors file (tensors) with the run's JSON in its metadata: nothing is ever
  unpickled, and a single atomic rename keeps weights, optimizer and counters consistent.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.geometry import AXES, SliceGeometry
from ..engine.intensity import SA_MED2D_20M, IntensityWindow, compute_window, looks_like_ct
from ..engine.masks import interior_point
from ..engine.preprocessing import opencv_nearest_indices
from ..files import OutputPlanError, atomic_path, check_output_plan, input_files
from ..formats.volumes import read_labels_on_grid, read_volume
from ..model import CONFIGS, SamMed2D, build_sam_med2d
from ..model.sam import PIXEL_MEAN, PIXEL_STD

STATE_FORMAT = "sammed2d-finetune-state/1"
MODEL_FORMAT = "sammed2d-model/1"
SIZE = 256
LOW_RES = SIZE // 4


class FinetuneError(ValueError):
    """Bad training input or state: reported as one line by the command line."""


# ----------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class FinetuneConfig:
    build: str = "small"
    steps: int = 3000
    batch_size: int = 16
    lr: float = 6e-4
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    seed: int = 0
    #: Fraction of training steps per view; the rest of a volume's slices are seen through other views.
    axis_weights: tuple[float, float, float] = (0.5, 0.25, 0.25)
    min_pixels: int = 25
    #: Axial slices held out for validation: a central band of this fraction of each volume.
    val_fraction: float = 0.15
    eval_every: int = 250
    save_every: int = 100
    #: Probability that a batch gets corrective prompting rounds after the first prompt, and at most how
    #: many (each adds a click from the error region, as the interactive evaluation does).
    correction_probability: float = 0.6
    correction_rounds: int = 3
    #: Probability that the correction rounds also get the previous prediction as mask prompt.
    mask_prompt_probability: float = 0.8
    #: Weight of the IoU head's MSE beside BCE + Dice. The predictor picks among the three multimask outputs
    #: by predicted IoU, and in demo model version 2 the head barely ranked them (one point on the liver:
    #: predictions within ±0.05 while the outputs' Dice differed by 0.5), so it often picked a part of an
    #: organ. Weight 10 did not fix that in the same 4,000 steps (see the model card), so SAM's 1 stays.
    iou_loss_weight: float = 1.0
    #: Weight of a ranking loss on the IoU head: cross-entropy between which multimask token is best
    #: (softmax of the actual IoUs at `RANK_TEMPERATURE`) and the head's own softmax. The MSE alone left
    #: the head unable to tell the whole organ from a part (model card); the predictor needs the order.
    iou_rank_weight: float = 0.0
    #: Train every multimask token on the structure instead of SAM's best-of-three. SAM's rule lets two
    #: tokens learn parts of a whole for the IoU head to rank; where the labels are whole structures there
    #: are no parts to learn, and a head too weak to rank (model card) then picks parts of organs.
    all_tokens: bool = False
    #: Structures are drawn uniformly per (slice, label) and then kept with probability
    #: min(1, (area / LARGE_AREA_PX)^size_exponent) of their 256×256 mask: 0 keeps all (most are small); 0.5
    #: shows large organs, the structures users start from, more often.
    size_exponent: float = 0.0
    #: Probabilities of the first prompt's kind: include points, a box, a box with one include point.
    prompt_mix: tuple[float, float, float] = (0.3, 0.35, 0.35)
    freeze_encoder: bool = False
    init_checkpoint: str | None = None
    #: "fp32", or "bf16": the forward and backward products under bf16 autocast, the weights, gradients and
    #: optimizer state staying fp32 (master weights); validation always in fp32.
    precision: str = "fp32"

    def check(self) -> None:
        if self.build not in CONFIGS:
            raise FinetuneError(f"unknown build {self.build!r}; known: {', '.join(CONFIGS)}")
        for name in ("steps", "batch_size", "eval_every", "save_every", "min_pixels", "correction_rounds"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FinetuneError(f"lr must be a positive number, got {self.lr}")
        for name in ("correction_probability", "mask_prompt_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                value = getattr(self, name)
                raise FinetuneError(f"{name.replace('_', '-')} must be within 0..1, got {value}")
        for name in ("iou_loss_weight", "iou_rank_weight", "size_exponent"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise FinetuneError(f"{name.replace('_', '-')} must be a number ≥ 0, got {value}")
        if len(self.prompt_mix) != 3 or min(self.prompt_mix) < 0 or not math.isclose(sum(self.prompt_mix), 1):
            raise FinetuneError(f"prompt mix must be three probabilities summing to 1, got {self.prompt_mix}")
        if not 0.0 <= self.val_fraction < 0.5:
            raise FinetuneError(f"val-fraction must be within 0..0.5, got {self.val_fraction}")
        if len(self.axis_weights) != 3 or min(self.axis_weights) < 0 or sum(self.axis_weights) <= 0:
            raise FinetuneError(f"axis weights must be three non-negative numbers, got {self.axis_weights}")
        if self.precision not in ("fp32", "bf16"):
            raise FinetuneError(f"training precision must be fp32 or bf16, got {self.precision!r}")


# ----------------------------------------------------------------------------------------------------
# Data


@dataclass
class LabelledSlice:
    image: np.ndarray  # float32 intensities, display orientation
    labels: np.ndarray  # integer label map of the same slice
    label_values: tuple[int, ...]  # labels with ≥ min_pixels pixels here
    axis: str
    volume: int
    index: int


@dataclass(frozen=True)
class VolumeIntensity:
    """What the intensity augmentation needs of one volume."""

    rule: IntensityWindow  # the model's rule on the volume as stored: what inference and validation use
    sorted_sample: np.ndarray  # up to 200 000 finite voxels, sorted: the rule's window under other paddings
    is_ct: bool


@dataclass
class TrainingSet:
    slices: list[list[LabelledSlice]]  # per axis (axial, coronal, sagittal)
    validation: list[tuple[LabelledSlice, int]]  # (slice, label) pairs held out
    intensity: list[VolumeIntensity] = field(default_factory=list)  # per volume
    samples_per_axis: list[int] = field(default_factory=list)
    #: Per volume, SHA-256 of its voxels, label map and geometry as read: what a resumed run must see again.
    digests: list[str] = field(default_factory=list)


Pair = tuple[str | os.PathLike[str], str | os.PathLike[str]]


def load_training_set(
    pairs: Sequence[Pair], config: FinetuneConfig, validation_pairs: Sequence[Pair] = ()
) -> TrainingSet:
    """Cut every labelled volume into slices of the three views; hold out a central axial band. Volumes of
    `validation_pairs` are never trained on: every labelled axial slice of theirs is validation."""
    if not pairs:
        raise FinetuneError("no training data: give at least one --image/--labels pair")
    per_axis: list[list[LabelledSlice]] = [[], [], []]
    validation: list[tuple[LabelledSlice, int]] = []
    intensity: list[VolumeIntensity] = []
    digests: list[str] = []
    everything = [*pairs, *validation_pairs]
    for number, (image_path, label_path) in enumerate(everything):
        validation_only = number >= len(pairs)
        try:
            image = read_volume(image_path)
        except ValueError as exc:
            raise FinetuneError(str(exc)) from exc
        try:
            if str(label_path).lower().endswith(".seg.nrrd"):
                labels = _read_segmentation(label_path, image.array_kji, image.ijk_to_ras)
            else:
                labels = read_labels_on_grid(label_path, image.array_kji.shape, image.ijk_to_ras)
        except FinetuneError:
            raise
        except ValueError as exc:
            raise FinetuneError(str(exc)) from exc
        values = image.array_kji.astype(np.float32)
        digest = hashlib.sha256(np.ascontiguousarray(values).tobytes())
        for array in (np.asarray(values.shape), labels.astype(np.int64), np.asarray(image.ijk_to_ras, float)):
            digest.update(np.ascontiguousarray(array).tobytes())
        digests.append(digest.hexdigest())
        finite = values[np.isfinite(values)].ravel()
        sample = np.sort(finite[:: max(1, finite.size // 200_000)])
        is_ct = image.modality == "CT" or (image.modality is None and looks_like_ct(values))
        intensity.append(VolumeIntensity(compute_window(values, SA_MED2D_20M), sample, is_ct))
        axial = SliceGeometry.create(values.shape, image.ijk_to_ras, AXES[0])
        count = axial.num_slices
        held = range(count) if validation_only else held_out_band(count, config.val_fraction)
        training_labels = labels  # a validation volume is only seen along the axial axis
        if not validation_only:
            # The held-out axial band is also blanked out of the other views' labels, so no held-out voxel
            # is ever trained on.
            training_labels = labels.copy()
            selector: list[object] = [slice(None)] * 3
            selector[2 - axial.slice_axis] = slice(held.start, held.stop)
            training_labels[tuple(selector)] = 0
        for a, axis in enumerate(AXES[:1] if validation_only else AXES):
            geometry = SliceGeometry.create(values.shape, image.ijk_to_ras, axis)
            source = labels if a == 0 else training_labels
            for index in range(geometry.num_slices):
                lab = geometry.extract(source, index)
                present, counts = np.unique(lab[lab > 0], return_counts=True)
                keep = tuple(int(v) for v, c in zip(present, counts, strict=True) if c >= config.min_pixels)
                if not keep:
                    continue
                item = LabelledSlice(geometry.extract(values, index), lab, keep, axis, number, index)
                if a == 0 and index in held:
                    validation += [(item, v) for v in keep]
                else:
                    per_axis[a].append(item)
    samples = [sum(len(s.label_values) for s in items) for items in per_axis]
    if sum(samples) == 0:
        raise FinetuneError(f"no slice holds a label with ≥ {config.min_pixels} pixels")
    for (image_path, _), digest in zip(validation_pairs, digests[len(pairs) :], strict=True):
        if digest in digests[: len(pairs)]:
            raise FinetuneError(f"--val-image {image_path} is also a training volume: validate on another")
    return TrainingSet(per_axis, validation, intensity, samples, digests)


def _read_segmentation(path: str | os.PathLike[str], image: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    """A Slicer .seg.nrrd (any extent, shared or separate layers) → label map on the image grid, segment n →
    label n (a later segment wins where two overlap), through Slicer's own segmentation classes."""
    from ..mrml.segmentations import read_segments_on_grid

    labels = np.zeros(image.shape, np.uint16)
    for number, (_, mask) in enumerate(read_segments_on_grid(path, image, ijk_to_ras)):
        labels[mask] = number + 1
    if not labels.any():
        raise FinetuneError(f"{path}: the segmentation is empty (no segment has voxels on the image grid)")
    return labels


def held_out_band(num_slices: int, fraction: float) -> range:
    """The central axial slices validation holds out (also what `benchmarks/select_model.py` scores)."""
    count = int(round(num_slices * fraction))
    start = (num_slices - count) // 2
    return range(start, start + count)


# ----------------------------------------------------------------------------------------------------
# Batches: augmentation and intensity conversion


@dataclass
class Batch:
    images: torch.Tensor  # B×3×256×256, normalised like the predictor's input
    masks: torch.Tensor  # B×256×256 bool


def _resize(array: np.ndarray, smooth: bool) -> torch.Tensor:
    """A slice → 256×256: the predictor's nearest-neighbour rule (OpenCV's, as the official code resizes), or
    bilinear, so upsampled low-resolution training slices do not all look blocky."""
    values = np.ascontiguousarray(array, dtype=np.float32)
    if not smooth:
        rows = opencv_nearest_indices(values.shape[0], SIZE)
        cols = opencv_nearest_indices(values.shape[1], SIZE)
        return torch.from_numpy(np.ascontiguousarray(values[rows[:, None], cols[None, :]]))
    t = torch.from_numpy(values)[None, None]
    return F.interpolate(t, (SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)[0, 0]


def _affine(rng: np.random.Generator, mask: torch.Tensor) -> torch.Tensor:
    """Zoom, aspect, rotation, flips and a shift that keeps the structure in view (2×3 theta)."""
    zoom = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
    aspect = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
    angle = math.radians(rng.uniform(-15, 15))
    sx, sy = 1.0 / (zoom * aspect**0.5), aspect**0.5 / zoom
    cos, sin = math.cos(angle), math.sin(angle)
    theta = np.array([[cos * sx, -sin * sy, 0.0], [sin * sx, cos * sy, 0.0]])
    if rng.random() < 0.5:
        theta[:, 0] *= -1
    if rng.random() < 0.2:
        theta[:, 1] *= -1
    ys, xs = torch.nonzero(mask, as_tuple=True)
    centre = np.array([xs.float().mean().item(), ys.float().mean().item()]) / (SIZE / 2) - 1
    # Output point p samples input theta[:, :2] @ p + t; send a random output point near the old centre's
    # place to the structure's centre.
    target = centre * rng.uniform(0.3, 1.0) + rng.uniform(-0.25, 0.25, 2)
    theta[:, 2] = centre - theta[:, :2] @ target
    return torch.from_numpy(theta).float()


def _to_uint8_like(values: torch.Tensor, low: float, high: float, gamma: float) -> torch.Tensor:
    """The engine's window → 0..255 rule (clip, scale, round), with a gamma for variety."""
    x = ((values.clamp(low, high) - low) / (high - low)).clamp(0, 1) ** gamma
    return torch.round(x * 255.0)


def _normalise(gray255: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    return (gray255[None].expand(3, -1, -1) - mean) / std


#: What scanners fill outside the reconstructed field of view with (HU); None: no padding. The SA-Med2D-20M
#: rule counts padding among the volume's voxels, so the grey level of air (5 to ≈ 150) depends on it.
PADDING_VALUES: tuple[float | None, ...] = (None, -1024.0, -2000.0, -2048.0, -3024.0)


def padded_rule_window(
    sorted_sample: np.ndarray, padding: float | None, fraction: float
) -> tuple[float, float]:
    """The SA-Med2D-20M rule's window (0.5th/99.5th percentiles of all voxels) of the volume if `fraction`
    of its voxels were `padding`, below every tissue value: the padding takes the lowest ranks, so the low end
    is the padding value and the high end is the volume's own (100 − 0.5/(1 − fraction))th percentile."""
    if padding is None or fraction <= 0:
        low, high = np.percentile(sorted_sample, [0.5, 99.5])
        return float(low), float(high)
    if fraction < 0.005:
        raise ValueError(f"a padding fraction below 0.5 % does not set the low end, got {fraction}")
    high = float(np.percentile(sorted_sample, 100.0 - 0.5 / (1.0 - fraction)))
    return float(min(padding, sorted_sample[0])), high


def _field_of_view(axis: str, rng: np.random.Generator) -> torch.Tensor:
    """Pixels outside a scanner's reconstruction circle (axial) or cylinder (side views) in a 256² slice."""
    yy, xx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                            indexing="ij")  # fmt: skip
    cx, cy = (SIZE / 2) * (1 + rng.uniform(-0.08, 0.08, 2))
    if axis == "axial":
        radius = SIZE * rng.uniform(0.42, 0.62)
        return (xx - cx) ** 2 + (yy - cy) ** 2 > radius**2
    return (xx - cx).abs() > SIZE * rng.uniform(0.35, 0.55)


def _intensity_mapping(
    info: VolumeIntensity, rng: np.random.Generator
) -> tuple[float, float, float | None]:
    """(low, high, padding value or None) for one sample. CT: mostly the model's rule under one of the common
    padding values and a range of upper ends (the 99.5th percentile depends on how much bone, contrast or
    metal the field holds: ≈ 270–630 HU in the project's CTs, ≈ 1300 HU in the dataset's AMOS sample), and
    15 % radiological soft-tissue windows so a user's preset still works. Other modalities: the rule,
    jittered by ±10 % of its span."""
    if not info.is_ct:
        low, high = info.rule.low, info.rule.high
        span = high - low
        return low + rng.uniform(-0.1, 0.1) * span, high + rng.uniform(-0.1, 0.1) * span, None
    if rng.random() < 0.15:
        level, width = rng.uniform(0, 100), rng.uniform(250, 600)
        return level - width / 2, level + width / 2, None
    padding = PADDING_VALUES[int(rng.integers(len(PADDING_VALUES)))]
    low, high = padded_rule_window(info.sorted_sample, padding, float(rng.uniform(0.05, 0.35)))
    if rng.random() < 0.5:
        high = math.exp(rng.uniform(math.log(max(high * 0.9, 150.0)), math.log(max(high, 1500.0))))
    return low, max(high, low + 1.0), padding


#: The mask area (pixels of 256×256) from which `FinetuneConfig.size_exponent` keeps every structure.
LARGE_AREA_PX = 4096


def make_batch(
    data: TrainingSet, rng: np.random.Generator, batch_size: int, axis_weights: Sequence[float],
    size_exponent: float = 0.0,
) -> Batch:  # fmt: skip
    weights = np.asarray([w if data.slices[a] else 0.0 for a, w in enumerate(axis_weights)], dtype=float)
    weights /= weights.sum()
    images, masks = [], []
    while len(images) < batch_size:
        a = int(rng.choice(3, p=weights))
        item = data.slices[a][int(rng.integers(len(data.slices[a])))]
        value = item.label_values[int(rng.integers(len(item.label_values)))]
        smooth = bool(rng.random() < 0.7)
        image = _resize(item.image, smooth)
        mask = _resize((item.labels == value).astype(np.float32), False) > 0.5
        if not mask.any():
            continue
        if size_exponent and rng.random() > (int(mask.sum()) / LARGE_AREA_PX) ** size_exponent:
            continue
        info = data.intensity[item.volume]
        low, high, padding = _intensity_mapping(info, rng)
        # Outside the slice the image is filled with the scanner's padding, else its own minimum (air).
        fill = float(image.min()) if padding is None else padding
        if rng.random() < 0.9:
            theta = _affine(rng, mask)[None]
            grid = F.affine_grid(theta, [1, 1, SIZE, SIZE], align_corners=False)
            moved = F.grid_sample((image - fill)[None, None], grid, mode="bilinear", align_corners=False)
            moved_mask = F.grid_sample(mask[None, None].float(), grid, mode="nearest", align_corners=False)
            if moved_mask.sum() >= 10:
                image, mask = moved[0, 0] + fill, moved_mask[0, 0] > 0.5
        if padding is not None and rng.random() < 0.7:
            # Air outside the reconstruction field becomes padding; tissue there is left alone, so a cropped
            # training volume never loses anatomy to the simulated circle.
            outside = _field_of_view(item.axis, rng) & (image < -900)
            image = torch.where(outside, torch.tensor(padding), image)
        # Noise in proportion to the window (0–15 HU on a W400 window): the same meaning for any mapping.
        noise = rng.uniform(0, 0.0375) * min(high - low, 400.0 if info.is_ct else high - low)
        if noise > 0.0025 * (high - low):
            image = image + torch.from_numpy(rng.normal(0, noise, (SIZE, SIZE)).astype(np.float32))
        gamma = math.exp(rng.uniform(math.log(0.9), math.log(1.1)))
        images.append(_normalise(_to_uint8_like(image, low, high, gamma)))
        masks.append(mask)
    return Batch(torch.stack(images), torch.stack(masks))


# ----------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompts:
    coords: torch.Tensor | None  # B×N×2 in the 256 frame (x, y)
    labels: torch.Tensor | None  # B×N (1 include, 0 exclude, −1 padding)
    boxes: torch.Tensor | None  # B×4 (x0, y0, x1, y1)
    mask_input: torch.Tensor | None = None  # B×1×64×64 probabilities: sigmoid of previous logits

    @property
    def single_point(self) -> bool:
        """One include point and nothing else: the ambiguous case where SAM trains only its best mask."""
        return self.boxes is None and self.coords is not None and self.coords.shape[1] == 1


def _random_pixels(mask: torch.Tensor, count: int, rng: np.random.Generator) -> torch.Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    pick = torch.from_numpy(rng.integers(len(xs), size=count))
    return torch.stack([xs[pick], ys[pick]], dim=1).float()


def _jittered_box(mask: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The mask's box with each side moved by −5..+15 % of the box size and a few pixels, mostly outwards
    (users draw loose boxes; propagation adds 10 %)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    x0, x1, y0, y1 = xs.min().item(), xs.max().item(), ys.min().item(), ys.max().item()
    w, h = x1 - x0 + 1, y1 - y0 + 1
    d = rng.uniform(-0.05, 0.15, 4) * np.array([w, h, w, h]) + rng.uniform(-2, 4, 4)
    box = np.array([x0 - d[0], y0 - d[1], x1 + d[2], y1 + d[3]])
    return torch.from_numpy(np.clip(box, 0, SIZE - 1)).float()


def sample_prompts(
    masks: torch.Tensor, rng: np.random.Generator, mix: Sequence[float] = FinetuneConfig.prompt_mix
) -> Prompts:
    """One prompt kind per batch (the prompt encoder takes a box for all samples or for none), drawn by
    `mix`: 1–3 include points, a jittered box (the evaluation's first prompt), or a box with one include
    point, as propagation prompts."""
    kind = rng.choice(3, p=list(mix))
    batch = masks.shape[0]
    if kind == 0:
        count = int(rng.integers(1, 4))
        coords = torch.stack([_random_pixels(m, count, rng) for m in masks])
        return Prompts(coords, torch.ones(batch, count, dtype=torch.int64), None)
    boxes = torch.stack([_jittered_box(m, rng) for m in masks])
    if kind == 1:
        return Prompts(None, None, boxes)
    coords = torch.stack([_random_pixels(m, 1, rng) for m in masks])
    return Prompts(coords, torch.ones(batch, 1, dtype=torch.int64), boxes)


def _inner_error(error: torch.Tensor) -> torch.Tensor:
    """Error pixels whose 7×7 neighbourhood is all error: clicks away from the region's rim, closer to the
    evaluation's "deepest point of the largest error region" (empty where the errors are thin)."""
    eroded = -F.max_pool2d(-error[None, None].float(), 7, stride=1, padding=3)[0, 0]
    return eroded > 0.5


def correction_prompts(
    prompts: Prompts, predicted: torch.Tensor, masks: torch.Tensor, low_res: torch.Tensor,
    rng: np.random.Generator, mask_prompt: bool | None = None,
) -> Prompts:  # fmt: skip
    """A corrective round: one point from each sample's error region (include where the mask was missed,
    exclude where it spilled over; half of the time from the error's interior) added to the earlier points,
    and with `mask_prompt` (drawn 50/50 when None) the previous prediction as mask prompt: sigmoid of its
    logits, as SAM-Med2D trains and as the engine feeds it (`PropagationSettings.use_mask_prompt`)."""
    points, labels = [], []
    for pred, truth in zip(predicted, masks, strict=True):
        error = pred ^ truth
        if not error.any():  # already right: confirm with an include point
            error = truth
        if rng.random() < 0.5:
            inner = _inner_error(error)
            if inner.any():
                error = inner
        xy = _random_pixels(error, 1, rng)[0]
        points.append(xy)
        labels.append(int(truth[int(xy[1]), int(xy[0])]))
    new_xy = torch.stack(points)[:, None]
    new_labels = torch.tensor(labels, dtype=torch.int64)[:, None]
    if prompts.coords is None:
        coords, point_labels = new_xy, new_labels
    else:
        coords = torch.cat([prompts.coords, new_xy], dim=1)
        point_labels = torch.cat([prompts.labels, new_labels], dim=1)
    if mask_prompt is None:
        mask_prompt = bool(rng.random() < 0.5)
    mask_input = torch.sigmoid(low_res.detach()) if mask_prompt else None
    return Prompts(coords, point_labels, prompts.boxes, mask_input)


# ----------------------------------------------------------------------------------------------------
# Model step


def decode(model: SamMed2D, features: torch.Tensor, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """All four mask tokens for a batch: (logits B×4×64×64, IoU B×4)."""
    points = None if prompts.coords is None else (prompts.coords, prompts.labels)
    sparse, dense = model.prompt_encoder(points, prompts.boxes, prompts.mask_input)
    return model.mask_decoder.predict_masks(features, model.prompt_encoder.get_dense_pe(), sparse, dense)


def _mask_losses(logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and token: BCE + Dice on the 64×64 logits against the mask's area fractions, and the
    actual IoU of the thresholded mask. The decoder's own resolution: upsampling every token to 256 for
    the loss cost a third of each step."""
    target = F.avg_pool2d(masks[:, None].float(), SIZE // LOW_RES).expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(2, 3))
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(2, 3))
    dice = 1 - (2 * inter + 1) / (prob.sum(dim=(2, 3)) + target.sum(dim=(2, 3)) + 1)
    with torch.no_grad():
        hard, truth = logits > 0, target > 0.5
        iou = (hard & truth).sum(dim=(2, 3)).float() / (hard | truth).sum(dim=(2, 3)).float().clamp(min=1)
    return bce + dice, iou


#: Softness of the ranking target: tokens whose IoUs differ by less than this share the credit.
RANK_TEMPERATURE = 0.05


def iou_ranking_loss(iou_pred: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the head's choice among the multimask tokens 1..3 against the actual best (soft)."""
    target = torch.softmax(iou[:, 1:].float() / RANK_TEMPERATURE, dim=1)
    chosen = torch.log_softmax(iou_pred[:, 1:].float() / RANK_TEMPERATURE, dim=1)
    return -(target * chosen).sum(dim=1).mean()


def round_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    masks: torch.Tensor,
    single_point: bool,
    iou_weight: float = 1.0,
    rank_weight: float = 0.0,
    all_tokens: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's rule: the multimask tokens 1..3 learn by their best mask only; the single-mask token 0 is
    trained too when the prompt is unambiguous. The IoU head learns every token's actual IoU, and with
    `rank_weight` also which token is best; with `all_tokens` every multimask token learns the structure.
    Returns (loss, the low-res logits of the token the predictor would pick: highest predicted IoU)."""
    losses, iou = _mask_losses(logits, masks)
    multimask = losses[:, 1:].mean(dim=1) if all_tokens else losses[:, 1:].min(dim=1).values
    loss = multimask.mean()
    if not single_point:
        loss = loss + losses[:, 0].mean()
    loss = loss + iou_weight * F.mse_loss(iou_pred, iou)
    if rank_weight:
        loss = loss + rank_weight * iou_ranking_loss(iou_pred, iou)
    chosen = iou_pred[:, 1:].detach().argmax(dim=1) + 1
    return loss, logits[torch.arange(logits.shape[0]), chosen][:, None]


def training_step(
    model: SamMed2D, batch: Batch, rng: np.random.Generator, config: FinetuneConfig
) -> torch.Tensor:
    """The first prompt, then (with `config.correction_probability`) 1..`correction_rounds` corrective
    clicks, each round seeing the mask the predictor would have shown; the loss is the rounds' mean."""
    features = model.image_encoder(batch.images)
    prompts = sample_prompts(batch.masks, rng, config.prompt_mix)
    logits, iou_pred = decode(model, features, prompts)
    options = config.iou_loss_weight, config.iou_rank_weight, config.all_tokens
    loss, chosen_logits = round_loss(logits, iou_pred, batch.masks, prompts.single_point, *options)
    losses = [loss]
    if rng.random() < config.correction_probability:
        rounds = int(rng.integers(1, config.correction_rounds + 1))
        mask_prompt = bool(rng.random() < config.mask_prompt_probability)
        for _ in range(rounds):
            with torch.no_grad():
                upsampled = F.interpolate(chosen_logits, (SIZE, SIZE), mode="bilinear", align_corners=False)
                predicted = upsampled[:, 0] > 0
            prompts = correction_prompts(prompts, predicted, batch.masks, chosen_logits, rng, mask_prompt)
            logits, iou_pred = decode(model, features, prompts)
            loss, chosen_logits = round_loss(logits, iou_pred, batch.masks, False, *options)
            losses.append(loss)
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------------------------------
# Validation


@dataclass
class ValidationBatch:
    """Held-out samples with what scoring them per prompt and per volume needs."""

    batch: Batch
    points: list[tuple[float, float]]  # each mask's interior point (x, y), the point prompt
    volumes: list[int]  # which volume each sample comes from


def _validation_batches(data: TrainingSet, size: int = 16) -> list[ValidationBatch]:
    """Held-out (slice, label) pairs through the model's intensity rule on the volume as stored (what
    inference uses), no augmentation; with each mask's interior point for the point prompt."""
    out = []
    items = []
    for item, value in data.validation:
        image = _resize(item.image, smooth=False)
        mask = _resize((item.labels == value).astype(np.float32), False) > 0.5
        if mask.sum() < 10:
            continue
        x, y = interior_point(mask.numpy())
        window = data.intensity[item.volume].rule
        gray = _to_uint8_like(image, window.low, window.high, 1.0)
        items.append((_normalise(gray), mask, (float(x), float(y)), item.volume))
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        batch = Batch(torch.stack([c[0] for c in chunk]), torch.stack([c[1] for c in chunk]))
        out.append(ValidationBatch(batch, [c[2] for c in chunk], [c[3] for c in chunk]))
    return out


def _check_validation_volumes(
    batches: list[ValidationBatch], validation_pairs: Sequence[Pair], first: int, min_pixels: int
) -> None:
    """A validation volume with nothing left to score (every structure too small on its slices, or under 10
    pixels once resized to 256²) would silently drop out of the per-volume mean."""
    scored = {volume for item in batches for volume in item.volumes}
    for number, (_, label_path) in enumerate(validation_pairs, start=first):
        if number not in scored:
            raise FinetuneError(
                f"{label_path}: no axial slice holds a structure large enough to score (≥ {min_pixels} "
                "pixels, ≥ 10 once resized to 256×256): nothing to validate on"
            )


def _dice(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    inter = (pred & truth).sum(dim=(1, 2)).float()
    return 2 * inter / (pred.sum(dim=(1, 2)) + truth.sum(dim=(1, 2))).float().clamp(min=1)


@torch.no_grad()
def validate(model: SamMed2D, batches: list[ValidationBatch]) -> dict[str, float]:
    """Mean Dice with one interior include point and with the tight box; the selected mask is the best of
    tokens 1..3 by predicted IoU, as the predictor picks it. Averaged per volume first, then over volumes,
    so a second patient counts as much as the first however many slices each has ("volume N": its mean)."""
    if not batches:
        return {}
    model.eval()
    scores: dict[str, list[float]] = {"point": [], "box": []}
    volumes: list[int] = []
    for item in batches:
        batch, points = item.batch, item.points
        volumes += item.volumes
        features = model.image_encoder(batch.images)
        coords = torch.tensor(points, dtype=torch.float32)[:, None]
        ones = torch.ones(len(points), 1, dtype=torch.int64)
        boxes = torch.stack([_tight_box(m) for m in batch.masks])
        for name, prompts in (("point", Prompts(coords, ones, None)), ("box", Prompts(None, None, boxes))):
            logits, iou = decode(model, features, prompts)
            best = iou[:, 1:].argmax(dim=1) + 1
            chosen = logits[torch.arange(len(best)), best][:, None]
            pred = F.interpolate(chosen, (SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0] > 0
            scores[name] += _dice(pred, batch.masks).tolist()
    model.train()
    number = np.asarray(volumes)
    per_volume = {
        v: {name: float(np.mean(np.asarray(values)[number == v])) for name, values in scores.items()}
        for v in sorted(set(volumes))
    }
    result = {name: float(np.mean([means[name] for means in per_volume.values()])) for name in scores}
    result["mean"] = float(np.mean(list(result.values())))
    if len(per_volume) > 1:
        result |= {f"volume {v}": float(np.mean(list(means.values()))) for v, means in per_volume.items()}
    return result


def _tight_box(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max(), ys.max()], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# State: weights + optimizer + counters + RNG in one safetensors file


def learning_rate(config: FinetuneConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 5 % of the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _optimizer(model: SamMed2D, config: FinetuneConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )


def _freeze(model: SamMed2D, freeze_encoder: bool) -> None:
    """With `freeze_encoder`, only the encoder's adapters (and the prompt encoder and decoder) learn:
    SAM-Med2D's own recipe for adapting a large encoder cheaply."""
    for name, param in model.image_encoder.named_parameters():
        param.requires_grad = not freeze_encoder or ".Adapter." in name


def save_state(path: Path, model: SamMed2D, optimizer: torch.optim.Optimizer, run: dict) -> None:
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, entry in opt["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{pid}.{key}"] = value.detach().contiguous()
    run = dict(run, param_groups=[{k: v for k, v in g.items()} for g in opt["param_groups"]])
    with atomic_path(path, suffix=".tmp.safetensors") as temporary:
        # Bytes written through the temporary file keep its umask permissions (save_file makes it 0600).
        temporary.write_bytes(save(tensors, metadata={"format": STATE_FORMAT, "run": json.dumps(run)}))


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(model state dict, optimizer tensors by 'pid.key', run JSON) of a training state file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise FinetuneError(f"cannot read training state {path}: {exc}") from exc
    if metadata.get("format") != STATE_FORMAT:
        raise FinetuneError(f"{path} is not a SAMMed2D training state")
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    optim = {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}
    return model_sd, optim, json.loads(metadata["run"])


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], run: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = run["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def canonical_safetensors(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted. safetensors writes the metadata map in hash order,
    which differs between processes, so two identical trainings gave different bytes; a key order changes
    neither the header's length nor any offset."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:  # cannot happen for a header safetensors wrote compactly; keep the file as is
        return data
    return data[:8] + text + b" " * (length - len(text)) + data[8 + length :]


def export_model(model: SamMed2D, path: str | os.PathLike[str], metadata: dict[str, str]) -> None:
    """Inference weights as plain safetensors (what `checkpoint.load_model` reads), written atomically and
    byte for byte the same for the same weights and metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(Path(path), suffix=".tmp.safetensors") as temporary:
        data = save(tensors, metadata={"format": MODEL_FORMAT, **metadata})
        temporary.write_bytes(canonical_safetensors(data))


# ----------------------------------------------------------------------------------------------------
# The loop


@dataclass
class FinetuneResult:
    steps: int
    seconds: float
    samples_per_second: float
    best_step: int
    best_score: dict[str, float]
    history: list[dict]


def _initial_model(config: FinetuneConfig) -> SamMed2D:
    from ..weights.checkpoint import CheckpointError, load_model

    if config.init_checkpoint is None:
        if config.build != "small":
            raise FinetuneError(
                f"training the {config.build} build from scratch is not supported; pass --init CHECKPOINT"
            )
        return build_sam_med2d(config.build)
    try:
        model, info = load_model(config.init_checkpoint, device="cpu")
    except CheckpointError as exc:
        raise FinetuneError(str(exc)) from exc
    if info.build != config.build:
        raise FinetuneError(
            f"--init {config.init_checkpoint} is a {info.build} checkpoint, but --build is {config.build}"
        )
    # load_model memory-maps the file read-only: train on owned copies of the tensors.
    for param in model.parameters():
        param.data = param.data.clone()
    return model


def finetune(
    config: FinetuneConfig,
    pairs: Sequence[Pair],
    out_dir: str | os.PathLike[str],
    *,
    validation_pairs: Sequence[Pair] = (),
    resume: bool = False,
    progress: Callable[[dict], None] | None = None,
    stop_after: int | None = None,
) -> FinetuneResult:
    """Train and keep `last.safetensors` (resumable state) and `best.safetensors` (inference weights of the
    best validation score) in `out_dir`. `stop_after` ends the run at that step, like an interruption.
    `validation_pairs`: volumes only validated on (see `load_training_set`)."""
    config.check()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"the output folder {out} is a file")
    state_path, best_path = out / "last.safetensors", out / "best.safetensors"
    data = load_training_set(pairs, config, validation_pairs)
    torch.manual_seed(config.seed)  # the initial weights of a build trained from scratch
    model = _initial_model(config)
    _freeze(model, config.freeze_encoder)
    optimizer = _optimizer(model, config)
    rng = np.random.default_rng(config.seed)
    inputs = {"training": data.digests[: len(pairs)], "validation": data.digests[len(pairs) :]}
    run: dict = {"config": asdict(config), "inputs": inputs, "step": 0, "seconds": 0.0, "best_step": -1,
                 "best_score": {}, "history": []}  # fmt: skip
    if resume and state_path.is_file():
        model_sd, optim_tensors, saved = load_state(state_path)
        # States written before a setting existed (precision, the loss and sampling options) ran with its
        # default.
        defaults = json.loads(json.dumps(asdict(FinetuneConfig())))
        if {**defaults, **saved["config"]} != json.loads(json.dumps(asdict(config))):
            raise FinetuneError(f"{state_path} was written with other settings; use them or a new folder")
        # Other volumes would mix two trainings in one run, and best-step scores from two validation sets.
        # States written before the inputs were recorded lack them and are taken on trust.
        if saved.get("inputs", inputs) != inputs:
            raise FinetuneError(
                f"{state_path} was written for other volumes or labels (training or validation); give the "
                "same ones or use a new folder"
            )
        model.load_state_dict(model_sd)
        _restore_optimizer(optimizer, optim_tensors, saved)
        rng.bit_generator.state = saved["rng"]
        run = {k: v for k, v in saved.items() if k not in ("rng", "param_groups")} | {"inputs": inputs}
        running = run.pop("running_loss", None)
    elif state_path.exists() and not resume:
        raise FinetuneError(f"{state_path} exists: pass --resume to continue it, or use a new folder")
    else:
        running = None
    val_batches = _validation_batches(data)
    _check_validation_volumes(val_batches, validation_pairs, first=len(pairs), min_pixels=config.min_pixels)
    out.mkdir(parents=True, exist_ok=True)  # created only once the inputs have been read and checked
    model.train()
    start_step, t_start = run["step"], time.perf_counter()
    elapsed_before = run["seconds"]
    last = stop_after if stop_after is not None else config.steps
    for step in range(start_step, min(last, config.steps)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        batch = make_batch(data, rng, config.batch_size, config.axis_weights, config.size_exponent)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            loss = training_step(model, batch, rng, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        done = step + 1
        seconds = elapsed_before + time.perf_counter() - t_start
        if done % config.eval_every == 0 or done == config.steps:
            score = validate(model, val_batches)
            entry = {"step": done, "loss": round(running, 4), "seconds": round(seconds, 1),
                     **{f"val_{k}": round(v, 4) for k, v in score.items()}}  # fmt: skip
            run["history"].append(entry)
            if score and score["mean"] > run["best_score"].get("mean", -1.0):
                run["best_step"], run["best_score"] = done, score
                export_model(model, best_path, _model_metadata(config, done, score))
            if progress:
                progress({"event": "eval", **entry})
        if done % config.save_every == 0 or done == config.steps:
            run.update(step=done, seconds=seconds, rng=rng.bit_generator.state, running_loss=running)
            save_state(state_path, model, optimizer, run)
            run.pop("rng"), run.pop("running_loss")
        if progress:
            progress({"event": "step", "step": done, "steps": config.steps, "loss": running,
                      "seconds": seconds, "samples": (done - start_step) * config.batch_size,
                      "session_steps": done - start_step,
                      "session_seconds": time.perf_counter() - t_start})  # fmt: skip
    if not val_batches and config.steps <= last:
        export_model(model, best_path, _model_metadata(config, config.steps, {}))
    seconds = elapsed_before + time.perf_counter() - t_start
    session = time.perf_counter() - t_start
    done_steps = min(last, config.steps)
    return FinetuneResult(
        steps=done_steps,
        seconds=seconds,
        samples_per_second=(done_steps - start_step) * config.batch_size / max(session, 1e-9),
        best_step=run["best_step"],
        best_score=run["best_score"],
        history=run["history"],
    )


def _model_metadata(config: FinetuneConfig, step: int, score: dict[str, float]) -> dict[str, str]:
    return {
        "build": config.build,
        "step": str(step),
        "seed": str(config.seed),
        "validation": json.dumps({k: round(v, 4) for k, v in score.items()}),
        "config": json.dumps(asdict(config)),
    }


# ----------------------------------------------------------------------------------------------------
# Command line


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="train a SAM-Med2D build on labelled volumes")
    p.add_argument("--image", action="append", default=[], required=True, help="image volume (repeatable)")
    p.add_argument("--labels", action="append", default=[], required=True,
                   help="label map on the image's grid, one per --image (same order)")  # fmt: skip
    p.add_argument("--val-image", action="append", default=[],
                   help="a volume only validated on, never trained on (repeatable)")
    p.add_argument("--val-labels", action="append", default=[], help="its label map, one per --val-image")
    p.add_argument("--out-dir", required=True, help="folder for last.safetensors and best.safetensors")
    p.add_argument("--build", default="small", choices=sorted(CONFIGS))
    p.add_argument("--init", help="checkpoint to start from (required for vit_b)")
    p.add_argument("--freeze-encoder", action="store_true", help="train only the encoder's adapters")
    p.add_argument("--iou-rank-weight", type=float, default=FinetuneConfig.iou_rank_weight,
                   help="weight of the IoU head's ranking loss (0: SAM's MSE only)")  # fmt: skip
    p.add_argument("--all-tokens", action="store_true",
                   help="train every multimask token on the whole structure (not SAM's best of three)")
    p.add_argument("--size-exponent", type=float, default=FinetuneConfig.size_exponent,
                   help=f"draw large structures more often: keep each with (area / {LARGE_AREA_PX} px)^this")
    p.add_argument("--prompt-mix", type=float, nargs=3, default=list(FinetuneConfig.prompt_mix),
                   metavar=("POINTS", "BOX", "BOX_POINT"), help="probabilities of the first prompt's kind")
    p.add_argument("--correction-probability", type=float, default=FinetuneConfig.correction_probability,
                   help="share of batches that go on with corrective clicks after the first prompt")
    p.add_argument("--correction-rounds", type=int, default=FinetuneConfig.correction_rounds,
                   help="at most this many corrective clicks in such a batch (1..this, drawn)")
    p.add_argument("--steps", type=int, default=FinetuneConfig.steps)
    p.add_argument("--batch-size", type=int, default=FinetuneConfig.batch_size)
    p.add_argument("--lr", type=float, default=FinetuneConfig.lr)
    p.add_argument("--seed", type=int, default=FinetuneConfig.seed)
    p.add_argument("--eval-every", type=int, default=FinetuneConfig.eval_every)
    p.add_argument("--save-every", type=int, default=FinetuneConfig.save_every)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="fp32 (default), bf16 autocast with fp32 master weights (how the shipped demo "
                   "model was trained), or auto (bf16 where the CPU has bf16 instructions and it is faster)",
                   )  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the state in --out-dir")
    p.add_argument("--export", help="copy the best weights to this .safetensors file at the end")
    p.add_argument("--quiet", action="store_true")


def run_finetune(args) -> FinetuneResult:
    for prefix, images, labels in (("", args.image, args.labels), ("val-", args.val_image, args.val_labels)):
        if len(images) != len(labels):
            raise FinetuneError(
                f"{len(images)} --{prefix}image but {len(labels)} --{prefix}labels: give them in pairs"
            )
    if args.threads < 0:
        raise FinetuneError(f"--threads must be ≥ 0 (0: torch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..engine.precision import resolve_precision

    choice = resolve_precision(args.precision, "cpu")
    config = replace(
        FinetuneConfig(),
        build=args.build, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        eval_every=args.eval_every, save_every=args.save_every, freeze_encoder=args.freeze_encoder,
        init_checkpoint=args.init, precision=choice.precision, iou_rank_weight=args.iou_rank_weight,
        size_exponent=args.size_exponent, prompt_mix=tuple(args.prompt_mix), all_tokens=args.all_tokens,
        correction_probability=args.correction_probability, correction_rounds=args.correction_rounds,
    )  # fmt: skip
    if args.export and not args.export.endswith(".safetensors"):
        raise FinetuneError(f"--export must end in .safetensors, got {args.export}")
    _check_finetune_outputs(args)
    if not args.quiet:  # only once the inputs and outputs passed: a refusal stays one line
        print(f"training precision: {choice.precision} ({choice.reason})", file=sys.stderr)
    result = finetune(
        config, list(zip(args.image, args.labels, strict=True)), args.out_dir, resume=args.resume,
        validation_pairs=list(zip(args.val_image, args.val_labels, strict=True)),
        progress=None if args.quiet else _print_progress,
    )  # fmt: skip
    best = Path(args.out_dir) / "best.safetensors"
    if args.export:
        with atomic_path(Path(args.export), suffix=".tmp.safetensors") as temporary:
            temporary.write_bytes(best.read_bytes())
    return result


def _check_finetune_outputs(args) -> None:
    """The same output plan as `segment`: no output (the states in --out-dir, --export) may be an input
    (images, labels, validation images and labels, --init) or another output, links included; --out-dir may
    be missing (it is created)."""
    given = {"--image": args.image, "--labels": args.labels, "--val-image": args.val_image,
             "--val-labels": args.val_labels, "--init": [args.init] if args.init else []}  # fmt: skip
    inputs = [item for flag, paths in given.items() for path in paths for item in input_files(flag, path)]
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out-dir {out} is a file; give a folder (it is created if missing)")
    if args.export and not Path(args.export).resolve().parent.is_dir():
        raise FinetuneError(f"--export: output folder does not exist: {Path(args.export).resolve().parent}")
    outputs = [(f"--out-dir's {name}", out / name) for name in ("last.safetensors", "best.safetensors")]
    try:
        check_output_plan([*outputs, ("--export", args.export)], inputs, missing_folders_ok=True)
    except OutputPlanError as exc:
        raise FinetuneError(str(exc)) from None


def _print_progress(event: dict) -> None:
    if event["event"] == "eval":
        scores = " ".join(f"{k[4:]} {v:.3f}" for k, v in event.items() if k.startswith("val_"))
        print(f"step {event['step']}: loss {event['loss']:.4f}, validation Dice {scores}", file=sys.stderr)
        return
    rate = event["samples"] / max(event["session_seconds"], 1e-9)
    per_step = event["session_seconds"] / max(event["session_steps"], 1)
    remaining = (event["steps"] - event["step"]) * per_step
    width = 30
    filled = int(width * event["step"] / event["steps"])
    end = "\r" if sys.stderr.isatty() else "\n"
    if end == "\n" and event["step"] % 50:
        return
    print(
        f"[{'#' * filled}{'.' * (width - filled)}] {event['step']}/{event['steps']} loss {event['loss']:.4f} "
        f"{rate:.1f} samples/s, {remaining / 60:.1f} min left",
        end=end, file=sys.stderr, flush=True,
    )  # fmt: skip

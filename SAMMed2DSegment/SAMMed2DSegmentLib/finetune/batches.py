"""Training batches: slices resized as the predictor resizes them, augmented in geometry and noise, and
mapped to grey levels the way the model's intensity rule would map them under every common scanner padding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.preprocessing import opencv_nearest_indices
from ..model.sam import PIXEL_MEAN, PIXEL_STD
from .data import TrainingSet, VolumeIntensity
from .settings import SIZE


@dataclass
class Batch:
    images: torch.Tensor  # B×3×256×256, normalised like the predictor's input
    masks: torch.Tensor  # B×256×256 bool


def resize(array: np.ndarray, smooth: bool) -> torch.Tensor:
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


def to_uint8_like(values: torch.Tensor, low: float, high: float, gamma: float) -> torch.Tensor:
    """The engine's window → 0..255 rule (clip, scale, round), with a gamma for variety."""
    x = ((values.clamp(low, high) - low) / (high - low)).clamp(0, 1) ** gamma
    return torch.round(x * 255.0)


def normalise(gray255: torch.Tensor) -> torch.Tensor:
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


def intensity_mapping(info: VolumeIntensity, rng: np.random.Generator) -> tuple[float, float, float | None]:
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
        image = resize(item.image, smooth)
        mask = resize((item.labels == value).astype(np.float32), False) > 0.5
        if not mask.any():
            continue
        if size_exponent and rng.random() > (int(mask.sum()) / LARGE_AREA_PX) ** size_exponent:
            continue
        info = data.intensity[item.volume]
        low, high, padding = intensity_mapping(info, rng)
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
        images.append(normalise(to_uint8_like(image, low, high, gamma)))
        masks.append(mask)
    return Batch(torch.stack(images), torch.stack(masks))

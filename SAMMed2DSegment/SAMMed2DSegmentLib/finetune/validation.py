"""The validation score that picks a run's best step: held-out pairs, one point and the box, averaged per
volume and then over volumes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.masks import interior_point
from ..model import SamMed2D
from .batches import normalise, resize, to_uint8_like
from .data import Pair, TrainingSet
from .prompts import Prompts
from .settings import SIZE, FinetuneError
from .step import decode


@dataclass
class ValidationBatch:
    """Held-out samples with what scoring them per prompt and per volume needs. The grey levels are kept as
    uint8 (the rule rounds to integers, so nothing is lost) and normalised only when scored: a float
    3×256×256 copy per pair would take 12× the memory on a large, fully labelled validation CT."""

    gray: torch.Tensor  # B×256×256 uint8, the model's intensity rule
    masks: torch.Tensor  # B×256×256 bool
    points: list[tuple[float, float]]  # each mask's interior point (x, y), the point prompt
    volumes: list[int]  # which volume each sample comes from

    def images(self) -> torch.Tensor:
        return torch.stack([normalise(g.float()) for g in self.gray])


def validation_batches(data: TrainingSet, size: int = 16) -> list[ValidationBatch]:
    """Held-out (slice, label) pairs through the model's intensity rule on the volume as stored (what
    inference uses), no augmentation; with each mask's interior point for the point prompt."""
    out = []
    items = []
    for item, value in data.validation:
        image = resize(item.image, smooth=False)
        mask = resize((item.labels == value).astype(np.float32), False) > 0.5
        if mask.sum() < 10:
            continue
        x, y = interior_point(mask.numpy())
        window = data.intensity[item.volume].rule
        gray = to_uint8_like(image, window.low, window.high, 1.0).to(torch.uint8)
        items.append((gray, mask, (float(x), float(y)), item.volume))
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        gray, masks = torch.stack([c[0] for c in chunk]), torch.stack([c[1] for c in chunk])
        out.append(ValidationBatch(gray, masks, [c[2] for c in chunk], [c[3] for c in chunk]))
    return out


def check_validation_volumes(
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
        masks, points = item.masks, item.points
        volumes += item.volumes
        features = model.image_encoder(item.images())
        coords = torch.tensor(points, dtype=torch.float32)[:, None]
        ones = torch.ones(len(points), 1, dtype=torch.int64)
        boxes = torch.stack([_tight_box(m) for m in masks])
        for name, prompts in (("point", Prompts(coords, ones, None)), ("box", Prompts(None, None, boxes))):
            logits, iou = decode(model, features, prompts)
            best = iou[:, 1:].argmax(dim=1) + 1
            chosen = logits[torch.arange(len(best)), best][:, None]
            pred = F.interpolate(chosen, (SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0] > 0
            scores[name] += _dice(pred, masks).tolist()
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

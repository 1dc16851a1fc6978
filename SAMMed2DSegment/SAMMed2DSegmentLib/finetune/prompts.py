"""Simulated prompts: first prompts of the kinds users give, then corrective clicks from the error region."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .settings import SIZE, FinetuneConfig


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

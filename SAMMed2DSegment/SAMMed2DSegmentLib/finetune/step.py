"""One training step: the decoder on every prompting round, and SAM's mask and IoU losses."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..model import SamMed2D
from .batches import Batch
from .prompts import Prompts, correction_prompts, sample_prompts
from .settings import LOW_RES, SIZE, FinetuneConfig


def decode(model: SamMed2D, features: torch.Tensor, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """All four mask tokens for a batch: (logits B×4×64×64, IoU B×4)."""
    points = None if prompts.coords is None else (prompts.coords, prompts.labels)
    sparse, dense = model.prompt_encoder(points, prompts.boxes, prompts.mask_input)
    return model.mask_decoder.predict_masks(features, model.prompt_encoder.get_dense_pe(), sparse, dense)


def mask_losses(logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    *,
    iou_weight: float = 1.0,
    rank_weight: float = 0.0,
    all_tokens: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's rule: the multimask tokens 1..3 learn by their best mask only; the single-mask token 0 is
    trained too when the prompt is unambiguous. The IoU head learns every token's actual IoU, and with
    `rank_weight` also which token is best; with `all_tokens` every multimask token learns the structure.
    Returns (loss, the low-res logits of the token the predictor would pick: highest predicted IoU)."""
    losses, iou = mask_losses(logits, masks)
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
    options = {"iou_weight": config.iou_loss_weight, "rank_weight": config.iou_rank_weight,
               "all_tokens": config.all_tokens}  # fmt: skip
    loss, chosen_logits = round_loss(logits, iou_pred, batch.masks, prompts.single_point, **options)
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
            loss, chosen_logits = round_loss(logits, iou_pred, batch.masks, False, **options)
            losses.append(loss)
    return torch.stack(losses).mean()

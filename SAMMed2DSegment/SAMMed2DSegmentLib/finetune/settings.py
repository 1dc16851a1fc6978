"""What a fine-tuning run is set by, checked before any data is read; the formats of its files; the network's
input size and its decoder's mask size."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..model import CONFIGS

STATE_FORMAT = "sammed2d-finetune-state/1"
MODEL_FORMAT = "sammed2d-model/1"
SIZE = 256
LOW_RES = SIZE // 4


class FinetuneError(ValueError):
    """Bad training input or state: reported as one line by the command line."""


#: Peak memory of one training step on the CPU, measured per build at two batch sizes (fp32, three
#: corrective rounds; bf16 takes less) as (weights, gradients, AdamW moments and the framework; per sample).
#: Small: 455 MB at batch 1, 769 MB at 8; vit_b: 4.8 GB at 1, 5.2 GB at 3; rounded up to err on the safe side.
TRAINING_MEMORY = {"small": (0.5e9, 50e6), "vit_b": (5.0e9, 200e6)}


def training_memory_bytes(build: str, batch_size: int) -> int:
    """Estimated peak memory of a training step with `batch_size` samples of the `build`; most of it grows
    with the batch (activations kept for the backward pass), so `--batch-size 512` took 15 GB."""
    fixed, per_sample = TRAINING_MEMORY.get(build, TRAINING_MEMORY["vit_b"])
    return int(fixed + per_sample * batch_size)


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
    #: (softmax of the actual IoUs at `step.RANK_TEMPERATURE`) and the head's own softmax. The MSE alone left
    #: the head unable to tell the whole organ from a part (model card); the predictor needs the order.
    iou_rank_weight: float = 0.0
    #: Train every multimask token on the structure instead of SAM's best-of-three. SAM's rule lets two
    #: tokens learn parts of a whole for the IoU head to rank; where the labels are whole structures there
    #: are no parts to learn, and a head too weak to rank (model card) then picks parts of organs.
    all_tokens: bool = False
    #: Structures are drawn uniformly per (slice, label) and then kept with probability
    #: min(1, (area / batches.LARGE_AREA_PX)^size_exponent) of their 256×256 mask: 0 keeps all (most are
    #: small); 0.5 shows large organs, the structures users start from, more often.
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

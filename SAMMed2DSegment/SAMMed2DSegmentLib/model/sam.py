"""The SAM-Med2D network: image encoder, prompt encoder and mask decoder under the checkpoint's names."""

from __future__ import annotations

import torch
from torch import nn

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class SamMed2D(nn.Module):
    """Container with the official attribute names; inference goes through `SamMed2DPredictor`."""

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self, image_encoder: ImageEncoderViT, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.reset_constants()

    def reset_constants(self, device: torch.device | str | None = None) -> None:
        """(Re)create the buffers that are not in the checkpoint (non-persistent, as in the official model);
        needed after building on the meta device and loading the weights with `assign=True`."""
        self.register_buffer(
            "pixel_mean", torch.tensor(PIXEL_MEAN, device=device).view(-1, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(PIXEL_STD, device=device).view(-1, 1, 1), persistent=False
        )

    @property
    def image_size(self) -> int:
        return self.image_encoder.img_size

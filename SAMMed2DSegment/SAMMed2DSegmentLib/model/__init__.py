"""SAM-Med2D network (PyTorch), reimplemented from the project's inference specification.

`build_sam_med2d("vit_b")` is the official inference build (256×256 input, adapters on); `"small"` is a
5 M-parameter build of the same classes used for the demo model and fast tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import SamMed2D


@dataclass(frozen=True)
class BuildConfig:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    image_size: int = 256
    adapter: bool = True


CONFIGS: dict[str, BuildConfig] = {
    "vit_b": BuildConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "small": BuildConfig(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,)),
}


def build_sam_med2d(config: str = "vit_b") -> SamMed2D:
    """Build an untrained SAM-Med2D network in eval mode; load weights with `checkpoint.load_into`."""
    if config not in CONFIGS:
        raise ValueError(f"unknown SAM-Med2D build {config!r}; known builds: {', '.join(CONFIGS)}")
    cfg = CONFIGS[config]
    prompt_dim = 256
    grid = cfg.image_size // 16
    model = SamMed2D(
        image_encoder=ImageEncoderViT(
            img_size=cfg.image_size,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            global_attn_indexes=cfg.global_attn_indexes,
            window_size=14,
            out_chans=prompt_dim,
            adapter=cfg.adapter,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(transformer_dim=prompt_dim, num_multimask_outputs=3),
    )
    return model.eval()


__all__ = ["CONFIGS", "BuildConfig", "SamMed2D", "build_sam_med2d"]

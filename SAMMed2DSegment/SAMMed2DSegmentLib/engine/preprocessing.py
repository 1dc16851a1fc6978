"""Image → model input exactly as the official SAM-Med2D predictor prepares it.

The official code normalises with SAM's pixel mean/std in float32 and then resizes the normalised image
to 256×256 with OpenCV's nearest-neighbour rule (no aspect preservation, no padding). OpenCV picks source
index ``min(floor(i * (1 / (dst / src))), src − 1)`` computed in float64 — not the pixel-centre rule, and not
what ``torch.nn.functional.interpolate(mode="nearest")`` does for some sizes (e.g. 186, 372, 744) — so the
rule is reproduced here instead of adding OpenCV as a dependency.
"""

from __future__ import annotations

import numpy as np

from ..model.sam import PIXEL_MEAN, PIXEL_STD


def opencv_nearest_indices(src_size: int, dst_size: int) -> np.ndarray:
    """Source index for every destination index under OpenCV's INTER_NEAREST rule."""
    scale = 1.0 / (float(dst_size) / float(src_size))
    idx = np.floor(np.arange(dst_size, dtype=np.float64) * scale).astype(np.int64)
    return np.minimum(idx, src_size - 1)


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Validate an H×W or H×W×3 uint8 image and return it as H×W×3 (gray copied to three channels)."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype.kind == "f" and np.isnan(image).any():
        raise ValueError("image contains NaN pixels; convert the slice to uint8 with a window first")
    if image.dtype != np.uint8:
        raise ValueError(
            f"image must be uint8 (0–255, as SAM-Med2D was trained), got {image.dtype}; "
            "apply an intensity window to convert CT/MR values first"
        )
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H×W or H×W×3, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: shape {image.shape}")
    return image


def model_input(image: np.ndarray, size: int = 256) -> np.ndarray:
    """H×W×3 uint8 → 1×3×size×size float32, normalised then nearest-resized (official order and dtype)."""
    mean = np.asarray(PIXEL_MEAN, dtype=np.float32)
    std = np.asarray(PIXEL_STD, dtype=np.float32)
    normalised = (image - mean) / std
    rows = opencv_nearest_indices(image.shape[0], size)
    cols = opencv_nearest_indices(image.shape[1], size)
    resized = normalised[rows[:, None], cols[None, :]]
    return np.ascontiguousarray(resized.transpose(2, 0, 1)[None], dtype=np.float32)

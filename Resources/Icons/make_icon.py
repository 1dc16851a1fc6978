"""Draw the SAMMed2D icons (128x128 RGBA PNG) with numpy, zlib and struct only.

The picture: a dark rounded tile holding a gray, CT-like axial slice (body outline, fat layer, spine and two
organs), one organ covered by a translucent green segmentation with a bright outline, and the include click
(a yellow point with a dark rim) that produced it.

Run from anywhere:  python Resources/Icons/make_icon.py
It rewrites Resources/Icons/SAMMed2D.png (extension icon) and
SAMMed2DSegment/Resources/Icons/SAMMed2DSegment.png (module icon), both relative to the repository root.
"""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import numpy as np

SIZE = 128
SUPERSAMPLE = 4  # draw at 4x and average down, for smooth (anti-aliased) edges


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in icon units (0..SIZE) for an n x n canvas."""
    c = (np.arange(n) + 0.5) * (SIZE / n)
    return np.meshgrid(c, c, indexing="xy")


def _ellipse(x, y, cx, cy, rx, ry, angle_deg=0.0) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    dx, dy = x - cx, y - cy
    u = dx * np.cos(a) + dy * np.sin(a)
    v = -dx * np.sin(a) + dy * np.cos(a)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _rounded_square(x, y, margin, radius) -> np.ndarray:
    lo, hi = margin + radius, SIZE - margin - radius
    qx = np.clip(x, lo, hi)
    qy = np.clip(y, lo, hi)
    inside_box = (x >= margin) & (x <= SIZE - margin) & (y >= margin) & (y <= SIZE - margin)
    return inside_box & ((x - qx) ** 2 + (y - qy) ** 2 <= radius**2)


def _blob(x, y, cx, cy, r, lobes) -> np.ndarray:
    """A smooth irregular organ-like shape: a circle whose radius varies with the angle."""
    t = np.arctan2(y - cy, x - cx)
    rr = np.full_like(t, r)
    for k, amp, phase in lobes:
        rr = rr + amp * np.cos(k * t + phase)
    return np.hypot(x - cx, y - cy) <= rr


def _over(dst: np.ndarray, mask: np.ndarray, rgba) -> None:
    """Paint colour rgba (0..1 floats) over dst where mask is true (straight-alpha 'over' compositing)."""
    src = np.zeros_like(dst)
    src[mask] = rgba
    sa = src[..., 3:4]
    da = dst[..., 3:4]
    out_a = sa + da * (1 - sa)
    safe = np.where(out_a > 0, out_a, 1)
    dst[..., :3] = (src[..., :3] * sa + dst[..., :3] * da * (1 - sa)) / safe
    dst[..., 3:4] = out_a


def draw(size: int = SIZE) -> np.ndarray:
    """Return the icon as a size x size x 4 uint8 RGBA array."""
    n = size * SUPERSAMPLE
    x, y = _grid(n)
    img = np.zeros((n, n, 4), dtype=np.float64)

    # Tile.
    _over(img, _rounded_square(x, y, 4, 18), (0.09, 0.13, 0.20, 1.0))

    # CT slice: body (fat layer, then soft tissue), spine, organs.
    _over(img, _ellipse(x, y, 64, 66, 52, 40), (0.36, 0.36, 0.36, 1.0))
    _over(img, _ellipse(x, y, 64, 66, 47, 35), (0.55, 0.55, 0.55, 1.0))
    _over(img, _ellipse(x, y, 64, 94, 9, 8), (0.93, 0.93, 0.90, 1.0))  # vertebral body
    _over(img, _ellipse(x, y, 64, 94, 4, 3.5), (0.62, 0.62, 0.62, 1.0))
    _over(img, _ellipse(x, y, 88, 70, 12, 9, 20), (0.66, 0.66, 0.66, 1.0))  # second organ (not segmented)
    _over(img, _ellipse(x, y, 64, 84, 5, 5), (0.78, 0.78, 0.78, 1.0))  # aorta

    # The segmented organ: darker parenchyma, then the translucent label and its outline.
    organ = _blob(x, y, 46, 58, 17.0, [(2, 2.5, 0.6), (3, 1.8, 2.0), (5, 0.8, 1.0)])
    _over(img, organ, (0.46, 0.46, 0.46, 1.0))
    _over(img, organ, (0.15, 0.85, 0.35, 0.55))
    inner = _blob(x, y, 46, 58, 14.8, [(2, 2.5, 0.6), (3, 1.8, 2.0), (5, 0.8, 1.0)])
    _over(img, organ & ~inner, (0.35, 1.0, 0.50, 1.0))

    # The include click that produced it.
    _over(img, _ellipse(x, y, 49, 56, 8.0, 8.0), (0.05, 0.05, 0.05, 0.85))
    _over(img, _ellipse(x, y, 49, 56, 6.0, 6.0), (1.0, 0.86, 0.10, 1.0))
    _over(img, _ellipse(x, y, 47.5, 54.5, 1.8, 1.8), (1.0, 1.0, 0.85, 1.0))

    # Average SUPERSAMPLE x SUPERSAMPLE blocks (premultiplied, so edges do not darken), then back to
    # straight alpha.
    premul = np.concatenate([img[..., :3] * img[..., 3:4], img[..., 3:4]], axis=-1)
    small = premul.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 4).mean(axis=(1, 3))
    alpha = small[..., 3:4]
    rgb = np.where(alpha > 0, small[..., :3] / np.where(alpha > 0, alpha, 1), 0)
    out = np.concatenate([rgb, alpha], axis=-1)
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def encode_png(rgba: np.ndarray) -> bytes:
    """Encode an H x W x 4 uint8 array as an 8-bit RGBA PNG (filter type 0 on every row)."""
    if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError("expected an H x W x 4 uint8 array")
    h, w, _ = rgba.shape
    raw = b"".join(b"\x00" + rgba[row].tobytes() for row in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)  # bit depth 8, colour type 6 (RGBA)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parents[2]
    targets = [Path(p) for p in argv] or [
        root / "Resources" / "Icons" / "SAMMed2D.png",
        root / "SAMMed2DSegment" / "Resources" / "Icons" / "SAMMed2DSegment.png",
    ]
    data = encode_png(draw())
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        print(f"wrote {target} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

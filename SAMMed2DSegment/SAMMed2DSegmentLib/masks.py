"""Small mask operations for propagation (numpy only): boxes, interior points, connected pieces.

Kept free of SciPy/OpenCV: each is a few array operations on the mask's bounding box.
"""

from __future__ import annotations

import numpy as np


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the foreground, inclusive pixel indices, or None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) centre of mass of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0] = out[-1] = False
    out[:, 0] = out[:, -1] = False
    return out


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of a pixel deep inside the mask: the last pixels left by repeated erosion, nearest their
    centre. A centroid can fall outside a C-shaped structure; this point cannot."""
    box = bounding_box(mask)
    if box is None:
        raise ValueError("empty mask has no interior point")
    x0, y0, x1, y1 = box
    crop = np.pad(mask[y0 : y1 + 1, x0 : x1 + 1], 1)
    while True:
        eroded = _erode(crop)
        if not eroded.any():
            break
        crop = eroded
    ys, xs = np.nonzero(crop)
    cx, cy = xs.mean(), ys.mean()
    best = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
    return int(xs[best]) - 1 + x0, int(ys[best]) - 1 + y0


def components_touching(mask: np.ndarray, seeds_xy: np.ndarray) -> np.ndarray:
    """The 8-connected pieces of `mask` that contain at least one seed pixel (x, y).

    A prompt on one organ can also light up separate look-alike pieces (e.g. spleen-like tissue in the
    liver); keeping the pieces under the user's points removes them. Returns the mask unchanged when no
    seed lies inside it (then there is nothing trustworthy to anchor to).
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    seeds = np.rint(np.asarray(seeds_xy, dtype=np.float64)).astype(int).reshape(-1, 2)
    seeds = seeds[(seeds[:, 0] >= 0) & (seeds[:, 0] < w) & (seeds[:, 1] >= 0) & (seeds[:, 1] < h)]
    inside = seeds[mask[seeds[:, 1], seeds[:, 0]]] if len(seeds) else seeds
    if len(inside) == 0:
        return mask.copy()
    x0, y0, x1, y1 = bounding_box(mask)
    labels = component_labels(mask[y0 : y1 + 1, x0 : x1 + 1])
    keep = np.unique(labels[inside[:, 1] - y0, inside[:, 0] - x0])
    out = np.zeros_like(mask)
    out[y0 : y1 + 1, x0 : x1 + 1] = np.isin(labels, keep) & mask[y0 : y1 + 1, x0 : x1 + 1]
    return out


def component_labels(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels (each pixel labelled with the smallest flat index in its piece; −1 off
    the mask). Minimum-label propagation with pointer jumping: a few dozen whole-array passes even for
    large organs, instead of one pass per pixel of the piece's diameter. Labels only decrease and always
    name a pixel of the same piece, and at the fixed point every pixel holds its 3×3 minimum, so each piece
    ends up with its smallest index."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big, dtype=np.int32).reshape(h, w), np.int32(big))
    while True:
        # 3×3 minimum, separable: along rows, then along columns.
        p = np.pad(labels, ((0, 0), (1, 1)), constant_values=big)
        low = np.minimum(np.minimum(p[:, :-2], p[:, 1:-1]), p[:, 2:])
        p = np.pad(low, ((1, 1), (0, 0)), constant_values=big)
        low = np.minimum(np.minimum(p[:-2], p[1:-1]), p[2:])
        low[~mask] = big
        flat = np.append(low.ravel(), np.int32(big))  # index `big` points to itself
        for _ in range(2):  # pointer jumping: take the label of the pixel one's label names
            flat = flat[flat]
        low = flat[:-1].reshape(h, w)
        if np.array_equal(low, labels):
            return np.where(mask, labels, -1)
        labels = low

"""Small mask operations for propagation: boxes, interior points, connected pieces (numpy, and ITK's
connected-component filter through SimpleITK; no SciPy or OpenCV)."""

from __future__ import annotations

import numpy as np


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the foreground, inclusive pixel indices, or None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def extent(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box (one slice per axis) holding every nonzero voxel of an n-d mask, or None when it is
    empty: writers of many segments crop each to it, so memory follows their size, not the volume's."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others) if others else mask)
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


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
    labels = component_labels(mask)
    keep = np.unique(labels[inside[:, 1], inside[:, 0]])
    return np.isin(labels, keep)


def warm_up() -> None:
    """Clean up a tiny mask once: the first call imports ITK and numpy's masked arrays (`np.unique` does),
    0.2-0.5 s that the user's first click would otherwise wait for (the engine runs this when a model
    loads)."""
    tiny = np.zeros((3, 3), dtype=bool)
    tiny[1, 1] = True
    components_touching(tiny, np.array([[1, 1]]))


def component_labels(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels (1, 2, …; 0 off the mask).

    ITK's linear-time labelling (SimpleITK, a dependency of the engine and part of Slicer): array-level
    label propagation in numpy needs one pass per step of a piece's geodesic diameter, which took up to a
    second on the speckled masks a weak prompt can produce.
    """
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    return sitk.GetArrayFromImage(sitk.ConnectedComponent(image, True))

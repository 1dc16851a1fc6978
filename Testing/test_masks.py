"""Mask helpers used by propagation, checked against plain reference implementations."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from SAMMed2DSegmentLib.engine.masks import (
    bounding_box,
    component_labels,
    components_touching,
    interior_point,
)


def flood_fill(mask: np.ndarray, seeds) -> np.ndarray:
    """Breadth-first 8-connected fill from the seeds: the obvious, slow reference."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    queue = deque()
    for x, y in seeds:
        if mask[y, x] and not out[y, x]:
            out[y, x] = True
            queue.append((y, x))
    while queue:
        y, x = queue.popleft()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not out[yy, xx]:
                    out[yy, xx] = True
                    queue.append((yy, xx))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_components_touching_matches_flood_fill(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((rng.integers(1, 50), rng.integers(1, 50))) < rng.uniform(0.2, 0.8)
    seeds = np.stack([rng.integers(0, mask.shape[1], 3), rng.integers(0, mask.shape[0], 3)], axis=1)
    expected = flood_fill(mask, seeds) if mask[seeds[:, 1], seeds[:, 0]].any() else mask
    np.testing.assert_array_equal(components_touching(mask, seeds), expected)


def test_component_labels_on_a_long_snake():
    snake = np.zeros((41, 41), bool)
    snake[::4] = True
    for row in range(0, 37, 8):
        snake[row : row + 4, -1] = True
        snake[row + 4 : row + 8, 0] = True
    labels = component_labels(snake)
    assert len(np.unique(labels[snake])) == 1 and (labels[~snake] == 0).all()
    np.testing.assert_array_equal(components_touching(snake, [[0, 0]]), flood_fill(snake, [(0, 0)]))


def test_interior_point_lies_inside_a_c_shape():
    ys, xs = np.mgrid[:80, :80]
    ring = ((xs - 40) ** 2 + (ys - 40) ** 2 < 35**2) & ((xs - 40) ** 2 + (ys - 40) ** 2 > 20**2)
    c_shape = ring & ~((xs > 40) & (abs(ys - 40) < 8))
    x, y = interior_point(c_shape)
    assert c_shape[y, x]
    assert bounding_box(c_shape) == (6, 6, 74, 74)
    with pytest.raises(ValueError):
        interior_point(np.zeros((5, 5), bool))


def test_warm_up_imports_what_the_first_clean_up_needs():
    """The engine runs `warm_up` when a model loads, so the first click does not import ITK and numpy's
    masked arrays (a fresh interpreter, since this one has them already)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from SAMMed2DSegmentLib.engine import masks\n"
        "assert 'SimpleITK' not in sys.modules and 'numpy.ma' not in sys.modules\n"
        "masks.warm_up()\n"
        "assert 'SimpleITK' in sys.modules and 'numpy.ma' in sys.modules\n"
    )
    from pathlib import Path

    lib = Path(__file__).resolve().parents[1] / "SAMMed2DSegment"
    env = {**os.environ, "PYTHONPATH": str(lib)}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env, cwd=lib)

"""Slice geometry and prompt mapping on plain matrices (tier A): any storage order, shown the Slicer way."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from SAMMed2DSegmentLib.engine.geometry import AXES, GeometryError, SliceGeometry
from SAMMed2DSegmentLib.engine.prompts import PointPrompt, PromptError, RoiPrompt, prompts_by_slice

SHAPE_KJI = (5, 6, 7)  # K, J, I


def reference_volume() -> tuple[np.ndarray, np.ndarray]:
    """A volume in standard RAS order (I → R, J → A, K → S) with anisotropic spacing and an origin."""
    vol = np.arange(np.prod(SHAPE_KJI), dtype=np.int32).reshape(SHAPE_KJI)
    m = np.diag([0.8, 1.1, 2.5, 1.0])
    m[:3, 3] = [-40.0, 12.0, 100.0]
    return vol, m


def reorder(vol: np.ndarray, m: np.ndarray, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]):
    """Same physical image, other voxel storage: new voxel axis a = old axis perm[a], optionally reversed."""
    old_sizes = vol.shape[::-1]  # I, J, K
    new = np.eye(4)
    arr_ijk = vol.transpose(2, 1, 0)  # index [i, j, k]
    arr = arr_ijk.transpose(perm)
    origin = m[:3, 3].copy()
    cols = []
    for a, (src, flip) in enumerate(zip(perm, flips, strict=True)):
        col = m[:3, src].copy()
        if flip:
            arr = np.flip(arr, axis=a)
            origin = origin + col * (old_sizes[src] - 1)
            col = -col
        cols.append(col)
    new[:3, :3] = np.stack(cols, axis=1)
    new[:3, 3] = origin
    return np.ascontiguousarray(arr.transpose(2, 1, 0)), new


def test_standard_axial_is_radiological():
    vol, m = reference_volume()
    g = SliceGeometry.create(vol.shape, m, "axial")
    assert (g.slice_axis, g.col_axis, g.row_axis) == (2, 0, 1)
    # I grows towards patient right, which the axial view shows on screen left: column 0 is the highest I.
    # Anterior is up: row 0 is the highest J.
    assert g.col_flip and g.row_flip and g.normal_sign == 1
    img = g.extract(vol, 2)
    assert img.shape == (6, 7)
    assert img[0, 0] == vol[2, 5, 6]  # k=2, j=max, i=max


@pytest.mark.parametrize("axis", AXES)
def test_storage_order_does_not_change_slices(axis):
    vol, m = reference_volume()
    ref = SliceGeometry.create(vol.shape, m, axis)
    ref_slices = [ref.extract(vol, s) for s in range(ref.num_slices)]
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product([False, True], repeat=3):
            v2, m2 = reorder(vol, m, perm, flips)
            g = SliceGeometry.create(v2.shape, m2, axis)
            assert g.num_slices == ref.num_slices
            for s in range(g.num_slices):
                # The same physical slice may have the opposite index when the slice axis is flipped.
                s_ref = s if g.normal_sign == ref.normal_sign else g.num_slices - 1 - s
                np.testing.assert_array_equal(g.extract(v2, s), ref_slices[s_ref])


@pytest.mark.parametrize("axis", AXES)
def test_point_at_voxel_maps_to_its_slice_and_pixel(axis):
    vol, m = reference_volume()
    v2, m2 = reorder(vol, m, (1, 2, 0), (True, False, True))
    theta = np.deg2rad(10)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    rot[:3, 3] = [5, -3, 7]
    world = rot @ m2  # parent transform applied
    g = SliceGeometry.create(v2.shape, world, axis)
    nk, nj, ni = v2.shape
    for k, j, i in [(0, 0, 0), (nk // 2, nj // 2, ni // 2), (nk - 1, nj - 1, ni - 1), (1, nj - 1, 0)]:
        marked = np.zeros(v2.shape, dtype=bool)
        marked[k, j, i] = True
        ras = (world @ [i, j, k, 1])[:3]
        prompts = prompts_by_slice(g, [PointPrompt(tuple(ras), 1)])
        ((index, prompt),) = prompts.items()
        x, y = prompt.points[0]
        assert g.view(marked, index)[int(round(y)), int(round(x))]
        assert abs(x - round(x)) < 1e-9 and abs(y - round(y)) < 1e-9
        np.testing.assert_allclose(g.continuous_to_ras([[index, x, y]])[0], ras, atol=1e-9)


def test_view_writes_back_into_the_volume():
    vol, m = reference_volume()
    v2, m2 = reorder(vol, m, (2, 0, 1), (True, True, False))
    g = SliceGeometry.create(v2.shape, m2, "coronal")
    out = np.zeros(v2.shape, dtype=np.int32)
    g.view(out, 3)[...] = g.extract(v2, 3)
    touched = np.zeros(v2.shape, dtype=bool)
    g.view(touched, 3)[...] = True
    np.testing.assert_array_equal(out[touched], v2[touched])
    assert not out[~touched].any()


def test_points_off_the_volume_are_reported():
    vol, m = reference_volume()
    g = SliceGeometry.create(vol.shape, m, "axial")
    inside = (m @ [3, 3, 2, 1])[:3]
    above = (m @ [3, 3, 4.6, 1])[:3]  # beyond the last slice's slab
    beside = (m @ [-0.7, 3, 2, 1])[:3]  # off the slice in-plane
    with pytest.raises(PromptError, match="outside the volume") as err:
        prompts_by_slice(
            g,
            [
                PointPrompt(tuple(inside), 1),
                PointPrompt(tuple(above), 1, "up"),
                PointPrompt(tuple(beside), 0, "side"),
            ],
        )
    assert "up" in str(err.value) and "side" in str(err.value)
    edge = (m @ [3, 3, 4.4, 1])[:3]  # inside the last slab
    assert list(prompts_by_slice(g, [PointPrompt(tuple(edge), 1)])) == [4]


def test_rotated_roi_boxes_per_slice():
    vol, m = reference_volume()
    g = SliceGeometry.create(vol.shape, m, "axial")
    center = (m @ [3, 3, 2, 1])[:3]
    c, s = np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))
    axes = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])  # rotated about S
    roi = RoiPrompt(tuple(center), axes, (3.0, 1.0, 5.0), "box")
    prompts = prompts_by_slice(g, rois=[roi])
    assert sorted(prompts) == [1, 2, 3]  # 5 mm across slabs of 2.5 mm centred on slice 2
    box = prompts[2].box
    # Cross-section of a rotated 3×1 mm rectangle: half extents |c|·1.5+|s|·0.5 (R) and |s|·1.5+|c|·0.5 (A).
    half_r = (c * 1.5 + s * 0.5) / 0.8
    half_a = (s * 1.5 + c * 0.5) / 1.1
    cx, cy = 6 - 3, 5 - 3  # flipped columns and rows
    np.testing.assert_allclose(box, [cx - half_r, cy - half_a, cx + half_r, cy + half_a], atol=1e-9)
    far = RoiPrompt(tuple(center + [0, 0, 100]), np.eye(3), (1.0, 1.0, 1.0))
    with pytest.raises(PromptError, match="outside"):
        prompts_by_slice(g, rois=[far])


@pytest.mark.parametrize(
    "shape, matrix, axis, message",
    [
        ((5, 6, 7), np.eye(4), "oblique", "unknown axis"),
        ((5, 6), np.eye(4), "axial", "3-D"),
        ((5, 0, 7), np.eye(4), "axial", "3-D"),
        ((5, 6, 7), np.eye(3), "axial", "4×4"),
        ((5, 6, 7), np.diag([1.0, 1.0, 0.0, 1.0]), "axial", "singular"),
        ((5, 6, 7), np.full((4, 4), np.nan), "axial", "NaN"),
    ],
)
def test_bad_geometry(shape, matrix, axis, message):
    with pytest.raises(GeometryError, match=message):
        SliceGeometry.create(shape, matrix, axis)


def test_obliquity_is_measured():
    vol, m = reference_volume()
    assert SliceGeometry.create(vol.shape, m, "axial").obliquity_degrees < 1e-6
    theta = np.deg2rad(12)
    tilt = np.eye(4)
    tilt[1:3, 1:3] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    g = SliceGeometry.create(vol.shape, tilt @ m, "axial")
    assert abs(g.obliquity_degrees - 12) < 1e-6

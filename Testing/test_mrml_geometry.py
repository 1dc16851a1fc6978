"""Tier B: the pure layer's slice geometry agrees with Slicer's own matrices, presets and volume reader.

Volumes here have flipped and permuted axes, anisotropic spacing, a non-zero origin and a rotated, translated
parent transform; positions are computed with Slicer's matrices and transform nodes, never with our own code.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk

from SAMMed2DSegmentLib.engine.geometry import AXES, VIEW_ORIENTATIONS, SliceGeometry
from SAMMed2DSegmentLib.engine.prompts import prompts_by_slice
from SAMMed2DSegmentLib.mrml import (
    add_volume_from_array,
    create_headless_scene,
    load_volume,
    points_from_markups,
    volume_array,
    volume_ijk_to_world,
)

from .oblique_volume import IJK_TO_RAS, SHAPE_KJI


@pytest.fixture
def hs():
    return create_headless_scene()


def _linear_transform_node(
    hs, angle: float, axis: tuple[float, float, float], shift: tuple[float, float, float]
):
    transform = vtk.vtkTransform()
    transform.Translate(*shift)
    transform.RotateWXYZ(angle, *axis)
    node = hs.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(transform.GetMatrix())
    return node


def _slicer_world_position(volume, ijk) -> list[float]:
    """World RAS of a voxel centre, computed only with Slicer's matrices and transform nodes."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    ras = ijk_to_ras.MultiplyPoint([*map(float, ijk), 1.0])[:3]
    parent = volume.GetParentTransformNode()
    if parent is None:
        return list(ras)
    to_world = vtk.vtkGeneralTransform()
    parent.GetTransformToWorld(to_world)
    return list(to_world.TransformPoint(ras))


def test_view_orientations_equal_slicer_presets(hs):
    for axis in AXES:
        slice_node = hs.scene.AddNewNodeByClass("vtkMRMLSliceNode")
        assert slice_node.SetOrientation(axis.capitalize())
        slice_to_ras = slice_node.GetSliceToRAS()
        rotation = np.array([[slice_to_ras.GetElement(r, c) for c in range(3)] for r in range(3)])
        np.testing.assert_array_equal(rotation, VIEW_ORIENTATIONS[axis], err_msg=axis)


def test_volume_array_and_matrix_round_trip(hs):
    values = np.arange(np.prod(SHAPE_KJI), dtype=np.int16).reshape(SHAPE_KJI)
    volume = add_volume_from_array(hs, values, IJK_TO_RAS, "v")
    out = volume_array(volume)
    assert out.dtype == np.int16 and out.shape == SHAPE_KJI
    np.testing.assert_array_equal(out, values)
    out[0, 0, 0] = 99  # a copy: the node keeps its voxels
    assert volume_array(volume)[0, 0, 0] == 0
    np.testing.assert_allclose(volume_ijk_to_world(volume), IJK_TO_RAS, atol=1e-12)
    assert volume.GetSpacing() == pytest.approx((2.5, 0.7, 1.2))


def test_volume_ijk_to_world_includes_parent_transforms(hs):
    volume = add_volume_from_array(hs, np.zeros(SHAPE_KJI), IJK_TO_RAS, "v")
    inner = _linear_transform_node(hs, 30, (0, 0, 1), (1, 2, 3))
    outer = _linear_transform_node(hs, -20, (1, 1, 0), (-5, 0, 9))
    inner.SetAndObserveTransformNodeID(outer.GetID())
    volume.SetAndObserveTransformNodeID(inner.GetID())
    matrix = volume_ijk_to_world(volume)
    for ijk in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:
        np.testing.assert_allclose(matrix @ [*ijk, 1], [*_slicer_world_position(volume, ijk), 1], atol=1e-9)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("transformed", [False, True], ids=["no-transform", "rotated-parent"])
def test_control_point_at_voxel_prompts_that_voxel(hs, axis, transformed):
    """A control point placed at a voxel's world position prompts exactly that voxel: its slice index and
    its (x, y) pixel in `geometry.view` of that slice (every voxel holds a unique value)."""
    values = np.arange(np.prod(SHAPE_KJI), dtype=np.int32).reshape(SHAPE_KJI)
    volume = add_volume_from_array(hs, values, IJK_TO_RAS, "v")
    if transformed:
        volume.SetAndObserveTransformNodeID(_linear_transform_node(hs, 23, (1, 2, 3), (10, -20, 5)).GetID())
    points = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    # The point list sits under a transform of its own: only world positions may matter.
    points.SetAndObserveTransformNodeID(_linear_transform_node(hs, -40, (0, 1, 0), (3, 3, 3)).GetID())
    rng = np.random.default_rng(0)
    corners = list(itertools.product((0, 6), (0, 5), (0, 4)))
    voxels = corners + [tuple(int(v) for v in rng.integers(0, (7, 6, 5))) for _ in range(12)]
    for n, ijk in enumerate(voxels):
        points.AddControlPointWorld(*_slicer_world_position(volume, ijk), f"v{n}")

    geometry = SliceGeometry.create(SHAPE_KJI, volume_ijk_to_world(volume), axis)
    array = volume_array(volume)
    prompts = points_from_markups(points, 1)
    assert [p.name for p in prompts] == [f"v{n}" for n in range(len(voxels))]
    for (i, j, k), prompt in zip(voxels, prompts, strict=True):
        by_slice = prompts_by_slice(geometry, [prompt])
        assert len(by_slice) == 1
        ((index, slice_prompt),) = by_slice.items()
        x, y = slice_prompt.points[0]
        assert x == pytest.approx(round(x), abs=1e-6) and y == pytest.approx(round(y), abs=1e-6)
        shown = geometry.view(array, index)
        assert shown[round(y), round(x)] == array[k, j, i], f"voxel {(i, j, k)} on {axis}"
        assert (shown == array[k, j, i]).sum() == 1  # the voxel is on this slice, at exactly this pixel


@pytest.mark.parametrize("axis", AXES)
def test_voxel_storage_order_does_not_change_slices(hs, axis):
    """Flipping and permuting the stored voxel axes, with IJK→RAS changed to keep the physical geometry, gives
    the same slice images through Slicer's nodes (DESIGN §2.3)."""
    values = np.random.default_rng(1).integers(0, 1000, SHAPE_KJI).astype(np.int16)
    original = add_volume_from_array(hs, values, IJK_TO_RAS, "a")
    # New array axes (k', j', i') = (i flipped, k, j): voxel (i', j', k') = (j, k, 6 - i).
    reordered = np.transpose(values, (2, 0, 1))[::-1]
    new_to_old = np.zeros((4, 4))
    new_to_old[0, 2], new_to_old[0, 3] = -1, 6  # i = 6 - k'
    new_to_old[1, 0] = 1  # j = i'
    new_to_old[2, 1] = 1  # k = j'
    new_to_old[3, 3] = 1
    other = add_volume_from_array(hs, reordered, IJK_TO_RAS @ new_to_old, "b")
    a = SliceGeometry.create(SHAPE_KJI, volume_ijk_to_world(original), axis)
    b = SliceGeometry.create(reordered.shape, volume_ijk_to_world(other), axis)
    assert a.num_slices == b.num_slices and a.slice_shape == b.slice_shape
    for index in range(a.num_slices):
        # Slice indices follow the storage order; match slices (and pixel (0, 0)) by physical position.
        s, x, y = b.ras_to_continuous(a.continuous_to_ras([[index, 0, 0]]))[0]
        assert (x, y) == pytest.approx((0, 0), abs=1e-9) and s == pytest.approx(round(s), abs=1e-9)
        np.testing.assert_array_equal(
            a.extract(volume_array(original), index), b.extract(volume_array(other), round(s))
        )


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_load_volume_keeps_physical_positions(hs, tmp_path, suffix):
    """Slicer's reader may reorder voxels (it flips the last axis of left-handed files); every voxel value
    must still sit at the physical point the file gives it."""
    values = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.7, 1.2, 2.5))
    image.SetOrigin((10.0, 20.0, 30.0))
    image.SetDirection((0, -1, 0, 0, 0, 1, 1, 0, 0))  # left-handed, permuted
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(path))
    volume = load_volume(hs, path)
    assert volume.GetName() == "ct"
    array = volume_array(volume)
    world_to_ijk = np.linalg.inv(volume_ijk_to_world(volume))
    for k, j, i in np.ndindex(values.shape):
        lps = image.TransformIndexToPhysicalPoint((i, j, k))
        ijk = world_to_ijk @ [-lps[0], -lps[1], lps[2], 1.0]
        assert np.allclose(ijk[:3], np.round(ijk[:3]), atol=1e-4)
        ii, jj, kk = np.round(ijk[:3]).astype(int)
        assert array[kk, jj, ii] == values[k, j, i]


def test_non_linear_parent_transform_is_refused(hs):
    volume = add_volume_from_array(hs, np.zeros(SHAPE_KJI), IJK_TO_RAS, "v")
    spline = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p in [(0, 0, 0), (100, 0, 0), (0, 100, 0), (0, 0, 100), (50, 50, 50)]:
        source.InsertNextPoint(p)
        target.InsertNextPoint(np.add(p, (0, 0, 10 if p == (50, 50, 50) else 0)))
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    warp = hs.scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    warp.SetAndObserveTransformToParent(spline)
    volume.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(ValueError, match="harden or remove the transform"):
        volume_ijk_to_world(volume)


def test_bad_volumes_are_refused(hs, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.nrrd"):
        load_volume(hs, tmp_path / "missing.nrrd")
    (tmp_path / "garbage.nrrd").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="garbage.nrrd"):
        load_volume(hs, tmp_path / "garbage.nrrd")
    with pytest.raises(ValueError, match="is not a file"):
        load_volume(hs, tmp_path)

    rgb = sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    nodes_before = hs.scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="3 values per voxel"):
        load_volume(hs, tmp_path / "rgb.nrrd")
    assert hs.scene.GetNumberOfNodesByClass("vtkMRMLVectorVolumeNode") == 0  # not left behind
    assert hs.scene.GetNumberOfNodes() >= nodes_before

    series = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32))] * 2)
    sitk.WriteImage(series, str(tmp_path / "four_d.nrrd"))
    with pytest.raises(ValueError, match="four_d.nrrd.*4D"):
        load_volume(hs, tmp_path / "four_d.nrrd")

    vector = hs.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "vec")
    image = vtk.vtkImageData()
    image.SetDimensions(5, 4, 3)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    vector.SetAndObserveImageData(image)
    with pytest.raises(ValueError, match="RGB"):
        volume_array(vector)
    with pytest.raises(ValueError, match="3-D"):
        add_volume_from_array(hs, np.zeros((2, 3)), np.eye(4))
    with pytest.raises(ValueError, match="singular"):
        add_volume_from_array(hs, np.zeros((2, 3, 4)), np.diag([1.0, 0.0, 1.0, 1.0]))


def test_several_scenes_in_one_process():
    scenes = [create_headless_scene() for _ in range(3)]
    volumes = [
        add_volume_from_array(hs, np.full((2, 3, 4), n), np.eye(4), "v") for n, hs in enumerate(scenes)
    ]
    for n, (hs, volume) in enumerate(zip(scenes, volumes, strict=True)):
        assert hs.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
        assert (volume_array(volume) == n).all()
    rules = slicer.vtkSegmentationConverterFactory.GetInstance().GetConverterRules()
    names = [rule.GetClassName() for rule in rules]
    assert len(names) == len(set(names))

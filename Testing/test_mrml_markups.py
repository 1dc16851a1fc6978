"""Tier B: markups files and nodes → prompts in world RAS, checked against Slicer's reader and ROI math."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import vtk

from SAMMed2DSegmentLib.engine.prompts import PromptError
from SAMMed2DSegmentLib.mrml import create_headless_scene, load_markups, points_from_markups, roi_from_node

SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
#: Control points in RAS: two placed and visible, then unplaced, preview and hidden ones.
POINTS_RAS = [
    ("p1", [1.5, -2.0, 3.0], "defined", True),
    ("p2", [-10.0, 20.25, -30.0], "defined", True),
    ("unplaced", [4.0, 5.0, 6.0], "undefined", True),
    ("preview", [7.0, 8.0, 9.0], "preview", True),
    ("hidden", [10.0, 11.0, 12.0], "defined", False),
]


@pytest.fixture
def hs():
    return create_headless_scene()


def _markups_file(path, coordinate_system: str, markups: list[dict]) -> None:
    for markup in markups:
        markup.setdefault("coordinateSystem", coordinate_system)
    path.write_text(json.dumps({"@schema": SCHEMA, "markups": markups}))


def _points(coordinate_system: str) -> list[dict]:
    flip = np.array([-1, -1, 1]) if coordinate_system == "LPS" else np.ones(3)
    return [
        {"id": str(n), "label": label, "position": list(np.multiply(p, flip)), "positionStatus": status,
         "visibility": visible}
        for n, (label, p, status, visible) in enumerate(POINTS_RAS, start=1)
    ]  # fmt: skip


@pytest.mark.parametrize("coordinate_system", ["LPS", "RAS"])
def test_point_files_load_to_ras_and_skip_unplaced_and_hidden(hs, tmp_path, coordinate_system):
    path = tmp_path / f"points_{coordinate_system}.mrk.json"
    _markups_file(
        path, coordinate_system, [{"type": "Fiducial", "controlPoints": _points(coordinate_system)}]
    )
    (node,) = load_markups(hs, path)
    assert node.IsA("vtkMRMLMarkupsFiducialNode") and node.GetNumberOfControlPoints() == 5
    prompts = points_from_markups(node, 0)
    assert [p.name for p in prompts] == ["p1", "p2"]
    assert all(p.label == 0 for p in prompts)
    np.testing.assert_allclose([p.position for p in prompts], [POINTS_RAS[0][1], POINTS_RAS[1][1]])
    with_hidden = points_from_markups(node, 1, include_hidden=True)
    assert [p.name for p in with_hidden] == ["p1", "p2", "hidden"]


def test_points_are_in_world_coordinates(hs):
    node = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    node.AddControlPoint(1.0, 2.0, 3.0, "a")
    transform = vtk.vtkTransform()
    transform.Translate(10, 20, 30)
    transform.RotateZ(90)
    transform_node = hs.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform_node.SetMatrixTransformToParent(transform.GetMatrix())
    node.SetAndObserveTransformNodeID(transform_node.GetID())
    (prompt,) = points_from_markups(node, 1)
    np.testing.assert_allclose(prompt.position, [10 - 2.0, 20 + 1.0, 33.0], atol=1e-9)


def test_file_with_points_and_roi_gives_every_node(hs, tmp_path):
    path = tmp_path / "both.mrk.json"
    roi = {
        "type": "ROI", "roiType": "Box", "center": [1.0, 2.0, 3.0], "size": [4.0, 5.0, 6.0],
        "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
        "controlPoints": [{"id": "1", "label": "R-1", "position": [1.0, 2.0, 3.0],
                           "positionStatus": "defined",
                           "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0]}],
    }  # fmt: skip
    _markups_file(path, "LPS", [{"type": "Fiducial", "controlPoints": _points("LPS")[:1]}, roi])
    nodes = load_markups(hs, path)
    assert [n.GetClassName() for n in nodes] == ["vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsROINode"]
    prompt = roi_from_node(nodes[1])
    np.testing.assert_allclose(prompt.center, [-1.0, -2.0, 3.0], atol=1e-9)  # LPS → RAS
    np.testing.assert_allclose(prompt.size, [4.0, 5.0, 6.0], atol=1e-9)
    np.testing.assert_allclose(np.abs(prompt.axes), np.eye(3), atol=1e-9)


def test_bad_markups_files(hs, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.mrk.json"):
        load_markups(hs, tmp_path / "nothing.mrk.json")
    (tmp_path / "broken.mrk.json").write_text("{ not json")
    with pytest.raises(ValueError, match="broken.mrk.json"):
        load_markups(hs, tmp_path / "broken.mrk.json")


def _transformed_roi(hs, parent: vtk.vtkTransform):
    roi = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    object_to_node = vtk.vtkTransform()
    object_to_node.Translate(10, 20, 30)
    object_to_node.RotateZ(30)
    object_to_node.RotateX(20)
    roi.SetAndObserveObjectToNodeMatrix(object_to_node.GetMatrix())
    roi.SetSize(4, 6, 10)
    transform_node = hs.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform_node.SetMatrixTransformToParent(parent.GetMatrix())
    roi.SetAndObserveTransformNodeID(transform_node.GetID())
    return roi, transform_node


def _node_corners_in_world(roi, transform_node) -> np.ndarray:
    """The ROI's corners in node coordinates, moved to world by the transform node (Slicer's objects only)."""
    to_world = vtk.vtkGeneralTransform()
    transform_node.GetTransformToWorld(to_world)
    object_to_node = roi.GetObjectToNodeMatrix()
    half = np.array(roi.GetSize()) / 2
    corners = []
    for signs in itertools.product((-1, 1), repeat=3):
        node_point = object_to_node.MultiplyPoint([*(np.array(signs) * half), 1.0])[:3]
        corners.append(to_world.TransformPoint(node_point))
    return np.array(corners)


def _assert_same_points(a: np.ndarray, b: np.ndarray) -> None:
    for point in a:
        assert np.min(np.linalg.norm(b - point, axis=1)) < 1e-6, point


def _world_planes(roi) -> tuple[np.ndarray, np.ndarray]:
    planes = vtk.vtkPlanes()
    roi.GetPlanesWorld(planes)
    normals = np.array([planes.GetNormals().GetTuple3(i) for i in range(6)])
    origins = np.array([planes.GetPoints().GetPoint(i) for i in range(6)])
    return normals, origins


def test_rotated_roi_under_rigid_parent_transform(hs):
    parent = vtk.vtkTransform()
    parent.Translate(5, -7, 9)
    parent.RotateWXYZ(40, 1, 2, 0.5)
    roi, transform_node = _transformed_roi(hs, parent)
    prompt = roi_from_node(roi)
    np.testing.assert_allclose(prompt.axes.T @ prompt.axes, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(prompt.size, [4, 6, 10], atol=1e-9)
    _assert_same_points(prompt.corners(), _node_corners_in_world(roi, transform_node))
    normals, origins = _world_planes(roi)
    for corner in prompt.corners():
        distances = np.einsum("ij,ij->i", normals, corner - origins)
        # vtkPlanes stores float32 points, hence the tolerance.
        assert np.sum(np.abs(distances) < 1e-4) == 3, distances  # on three faces
        assert (distances < 1e-4).all()  # and not outside the other three
    center = np.array(prompt.center)
    assert roi.IsPointInROIWorld(list(center))
    for axis, length in zip(prompt.axes.T, prompt.size, strict=True):
        for sign in (-1, 1):
            assert roi.IsPointInROIWorld(list(center + sign * axis * (length / 2 - 1e-3)))
            assert not roi.IsPointInROIWorld(list(center + sign * axis * (length / 2 + 1e-3)))


def test_roi_under_uniformly_scaling_parent_is_the_transformed_box(hs):
    parent = vtk.vtkTransform()
    parent.Translate(5, -7, 9)
    parent.RotateWXYZ(40, 1, 2, 0.5)
    parent.Scale(1.5, 1.5, 1.5)
    roi, transform_node = _transformed_roi(hs, parent)
    prompt = roi_from_node(roi)
    np.testing.assert_allclose(prompt.axes.T @ prompt.axes, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(prompt.size, np.array([4, 6, 10]) * 1.5, atol=1e-9)
    _assert_same_points(prompt.corners(), _node_corners_in_world(roi, transform_node))
    assert roi.IsPointInROIWorld(list(prompt.center))


def test_roi_under_non_uniform_scale_is_the_box_slicer_draws(hs):
    """A rotated box under a non-uniform scale is no longer a box. Slicer draws the orthogonalised world box
    (`GetCenterWorld`, the world axes, `GetSizeWorld`), and the prompt is that box. (Slicer 5.13's
    `GetPlanesWorld`/`IsPointInROIWorld` use the unscaled `GetSize` there, so cannot serve as reference.)"""
    parent = vtk.vtkTransform()
    parent.Translate(5, -7, 9)
    parent.RotateY(40)
    parent.Scale(1.5, 0.8, 2.0)
    roi, _ = _transformed_roi(hs, parent)
    prompt = roi_from_node(roi)
    center, size = [0.0] * 3, [0.0] * 3
    roi.GetCenterWorld(center)
    roi.GetSizeWorld(size)
    np.testing.assert_allclose(prompt.center, center, atol=1e-9)
    np.testing.assert_allclose(prompt.size, size, atol=1e-9)
    assert not np.allclose(size, [4, 6, 10], atol=0.1)  # the scale did reach the sizes
    for column, getter in enumerate((roi.GetXAxisWorld, roi.GetYAxisWorld, roi.GetZAxisWorld)):
        axis = [0.0] * 3
        getter(axis)
        np.testing.assert_allclose(prompt.axes[:, column], np.array(axis) / np.linalg.norm(axis), atol=1e-9)
    np.testing.assert_allclose(prompt.axes.T @ prompt.axes, np.eye(3), atol=1e-9)


def test_unplaced_roi_is_refused(hs):
    roi = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "empty")
    with pytest.raises(PromptError, match="empty"):
        roi_from_node(roi)

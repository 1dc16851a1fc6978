"""Real Slicer slice views, offscreen, driven by real VTK mouse and key events
(`SAMMed2DSegmentLib/mrml/offscreen_views.py`):
clicks place markups control points where they land, with Slicer's own place-mode rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import slicer
import vtk

from SAMMed2DSegmentLib.engine.geometry import SliceGeometry
from SAMMed2DSegmentLib.formats.volumes import read_volume
from SAMMed2DSegmentLib.mrml import (
    add_volume_from_array,
    create_headless_scene,
    ensure_segment,
    ensure_segmentation,
    pictures,
    volume_ijk_to_world,
)
from SAMMed2DSegmentLib.mrml.editing import SliceWriter
from SAMMed2DSegmentLib.mrml.offscreen_views import SliceViews, can_render

CT = Path(__file__).parent / "Data" / "totalseg-example-ct" / "ct"
PLACE = slicer.vtkMRMLInteractionNode.Place
VIEW_TRANSFORM = slicer.vtkMRMLInteractionNode.ViewTransform
DEFINED = slicer.vtkMRMLMarkupsNode.PositionDefined


@pytest.fixture(scope="module")
def ct_volume():
    return read_volume(CT)


@pytest.fixture
def views(ct_volume):
    hs = create_headless_scene()
    ct = add_volume_from_array(hs, ct_volume.array_kji, ct_volume.ijk_to_ras, "CT")
    views = SliceViews(hs, size=(400, 400))
    views.show_volume(ct)
    views.ct = ct
    yield views
    views.close()


def ras_of(volume, ijk) -> np.ndarray:
    """World position of a (fractional) voxel index, off the display pixel grid."""
    return (volume.ijk_to_ras @ np.array([*ijk, 1.0]))[:3]


def assert_placed_at(view, placed, ras) -> None:
    """`placed` is `ras` up to the click's rounding to a display pixel, and lies on the view's slice plane."""
    placed = np.asarray(placed)
    assert abs(view.slice_distance(placed)) < 1e-6
    assert abs(view.slice_distance(ras)) < 1e-6  # we jumped there, so the clicked point is on the plane
    x, y = view.ras_to_display(ras)
    px, py = view.ras_to_display(placed)
    assert abs(px - x) <= 0.5 + 1e-6 and abs(py - y) <= 0.5 + 1e-6
    spacing_x, spacing_y = view.pixel_spacing()
    assert np.linalg.norm(placed - ras) <= 0.5 * np.hypot(spacing_x, spacing_y) + 1e-6


def positions(markups) -> list[np.ndarray]:
    count = markups.GetNumberOfControlPoints()
    return [np.array(markups.GetNthControlPointPositionWorld(i)) for i in range(count)]


# -- the views --------------------------------------------------------------------------------------------


def test_three_slice_views_in_the_application_logic(views):
    slice_logics = views.hs.app_logic.GetSliceLogics()
    assert slice_logics.GetNumberOfItems() == 3
    for name, orientation in (("Red", "Axial"), ("Green", "Coronal"), ("Yellow", "Sagittal")):
        view = views[name]
        assert view.slice_node.GetID() == f"vtkMRMLSliceNode{name}"
        assert view.slice_node.GetOrientation() == orientation
        assert slice_logics.IsItemPresent(view.logic)
        assert view.composite_node.GetBackgroundVolumeID() == views.ct.GetID()
        assert list(view.slice_node.GetDimensions())[:2] == [400, 400]
        for manager in ("vtkMRMLCrosshairDisplayableManager", "vtkMRMLSegmentationsDisplayableManager2D",
                        "vtkMRMLMarkupsDisplayableManager"):  # fmt: skip
            assert view.displayable_managers.GetDisplayableManagerByClassName(manager) is not None


def test_display_and_world_positions_round_trip(views, ct_volume):
    ras = ras_of(ct_volume, (301.3, 187.6, 9))
    for view in views:
        view.jump_to(ras)
        assert np.allclose(view.display_to_ras(*view.ras_to_display(ras)), ras)


# -- placing points ---------------------------------------------------------------------------------------


def test_click_in_red_places_one_point_and_leaves_place_mode(views, ct_volume):
    points = views.hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "prompts")
    views.start_placing(points, persistent=False)
    assert views.interaction_node.GetCurrentInteractionMode() == PLACE
    ras = ras_of(ct_volume, (301.3, 187.6, 9))
    views.jump_to("Red", ras)
    views.click("Red", ras)
    assert points.GetNumberOfControlPoints() == 1
    assert points.GetNumberOfDefinedControlPoints() == 1
    assert_placed_at(views["Red"], positions(points)[0], ras)
    # the point went into the active list, no new list was made, and one-time placement ended
    assert views.selection_node.GetActivePlaceNodeID() == points.GetID()
    assert views.hs.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 1
    assert views.interaction_node.GetCurrentInteractionMode() == VIEW_TRANSFORM


def test_a_click_at_a_pixel_places_the_point_that_pixel_shows(views, ct_volume):
    """Aiming at a pixel, not a world position: the point lands where the view maps that pixel, on the slice
    shown, and a pixel outside the view is refused before any event is sent."""
    points = views.hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "prompts")
    views.start_placing(points, persistent=False)
    red = views["Red"]
    views.jump_to("Red", ras_of(ct_volume, (256, 256, 9)))
    views.click_pixel("Red", 150, 230)
    assert points.GetNumberOfDefinedControlPoints() == 1
    assert np.allclose(positions(points)[0], red.display_to_ras(150, 230), atol=1e-4)
    with pytest.raises(ValueError, match="outside the Red view"):
        red.click_pixel(red.size[0], 10)
    assert points.GetNumberOfControlPoints() == 1


def test_persistent_place_mode_keeps_placing(views, ct_volume):
    points = views.hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "prompts")
    views.start_placing(points, persistent=True)
    first, second = ras_of(ct_volume, (301.3, 187.6, 9)), ras_of(ct_volume, (220.8, 260.2, 9))
    views.jump_to("Red", first)
    views.click("Red", first)
    assert points.GetNumberOfDefinedControlPoints() == 1
    assert views.interaction_node.GetCurrentInteractionMode() == PLACE
    views.click("Red", second)
    assert points.GetNumberOfDefinedControlPoints() == 2
    assert views.interaction_node.GetCurrentInteractionMode() == PLACE
    status = [points.GetNthControlPointPositionStatus(i) for i in range(points.GetNumberOfControlPoints())]
    defined = [p for p, s in zip(positions(points), status, strict=True) if s == DEFINED]
    assert len(defined) == 2
    assert_placed_at(views["Red"], defined[0], first)
    assert_placed_at(views["Red"], defined[1], second)


@pytest.mark.parametrize("name, fixed_axis", [("Green", 1), ("Yellow", 0)])
def test_clicks_in_green_and_yellow_place_on_their_planes(views, ct_volume, name, fixed_axis):
    points = views.hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "prompts")
    views.start_placing(points)
    ras = ras_of(ct_volume, (275.4, 240.7, 12.3))
    other = ras_of(ct_volume, (180.0, 300.0, 4.0))
    views.jump_to(name, ras)
    views.click(name, ras)
    assert points.GetNumberOfDefinedControlPoints() == 1
    placed = positions(points)[0]
    assert_placed_at(views[name], placed, ras)
    # coronal keeps A, sagittal keeps R: the point is on this view's plane, not on another view's
    assert placed[fixed_axis] == pytest.approx(ras[fixed_axis], abs=1e-6)
    assert abs(views[name].slice_distance(other)) > 1.0


def test_click_with_the_default_vtk_interactor_style_only_previews(views, ct_volume):
    """Why the views use vtkInteractorStyleUser: VTK's default camera style grabs the interactor's focus on
    the press, so Slicer's style never gets the release and the preview point is never defined."""
    red = views["Red"]
    red.interactor.SetInteractorStyle(vtk.vtkInteractorStyleSwitch())
    red.interactor.GetInteractorStyle().SetCurrentStyleToTrackballCamera()
    points = views.hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "prompts")
    views.start_placing(points)
    ras = ras_of(ct_volume, (301.3, 187.6, 9))
    views.jump_to("Red", ras)
    views.click("Red", ras)
    assert points.GetNumberOfControlPoints() == 1
    assert points.GetNumberOfDefinedControlPoints() == 0
    assert views.interaction_node.GetCurrentInteractionMode() == PLACE


# -- ROI, drag, keys --------------------------------------------------------------------------------------


def test_two_clicks_draw_a_box_roi(views, ct_volume):
    roi = views.hs.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    views.start_placing(roi)
    corner_a, corner_b = ras_of(ct_volume, (180.2, 150.6, 10)), ras_of(ct_volume, (320.7, 290.3, 10))
    views.jump_to("Red", corner_a)
    views.click("Red", corner_a)
    assert views.interaction_node.GetCurrentInteractionMode() == PLACE  # a box needs two corners
    views.click("Red", corner_b)
    assert views.interaction_node.GetCurrentInteractionMode() == VIEW_TRANSFORM
    pixel = max(views["Red"].pixel_spacing())
    size, center = np.array(roi.GetSize()), np.array(roi.GetCenter())
    assert np.allclose(size[:2], np.abs(corner_b - corner_a)[:2], atol=pixel + 1e-6)
    assert np.allclose(center, (corner_a + corner_b) / 2, atol=pixel / 2 + 1e-6)
    assert size[2] > 0  # Slicer gives the flat box the thickness of its shortest side


def test_a_drag_places_one_roi_corner_where_the_button_is_released(views, ct_volume):
    """Slicer has no press-drag-release ROI drawing: the ROI widget keeps the markups widget's placement on
    button release, so a drag defines the corner under the release and the box still waits for the other."""
    roi = views.hs.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    views.start_placing(roi)
    start, release, other = (ras_of(ct_volume, ijk) for ijk in ((180.2, 150.6, 10), (320.7, 290.3, 10),
                                                                (250.0, 350.0, 10)))  # fmt: skip
    views.jump_to("Red", start)
    views.drag("Red", start, release)
    assert roi.GetNumberOfDefinedControlPoints() == 1
    assert_placed_at(views["Red"], positions(roi)[0], release)
    assert views.interaction_node.GetCurrentInteractionMode() == PLACE
    views.click("Red", other)
    assert views.interaction_node.GetCurrentInteractionMode() == VIEW_TRANSFORM
    assert np.allclose(roi.GetCenter(), (release + other) / 2, atol=max(views["Red"].pixel_spacing()))


def test_dragging_a_placed_point_moves_it(views, ct_volume):
    points = views.hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "prompts")
    views.start_placing(points)
    ras, target = ras_of(ct_volume, (301.3, 187.6, 9)), ras_of(ct_volume, (260.1, 230.9, 9))
    views.jump_to("Red", ras)
    views.click("Red", ras)
    placed = positions(points)[0]
    views.drag("Red", placed, target)
    assert points.GetNumberOfControlPoints() == 1
    assert_placed_at(views["Red"], positions(points)[0], target)


def test_keys_reach_the_displayable_managers(views, ct_volume):
    red = views["Red"]
    offset = red.logic.GetSliceOffset()
    views.key("Red", "Up")  # the crosshair manager's slice intersection widget: next slice
    assert red.logic.GetSliceOffset() == pytest.approx(offset + 2.0)  # the CT's 2 mm slice spacing
    points = views.hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "prompts")
    views.start_placing(points)
    ras = ras_of(ct_volume, (301.3, 187.6, 9))
    views.jump_to("Red", ras)
    views.click("Red", ras)  # the mouse stays over the new point
    views.key("Red", "Delete")
    assert points.GetNumberOfControlPoints() == 0


# -- screenshots ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not can_render(), reason="no OpenGL context (EGL, OSMesa or X) for offscreen rendering")
def test_screenshot_of_red_shows_the_ct(views, tmp_path):
    with_ct = pictures.read_png(pictures.write_png(pictures.view_rgb(views["Red"]), tmp_path / "red.png"))
    assert with_ct.shape == (400, 400, 3)
    assert with_ct.astype(float).var() > 100.0
    views["Red"].show_volume(None, fit=False)
    empty = pictures.view_rgb(views["Red"])
    assert empty.astype(float).var() == 0.0


@pytest.mark.skipif(not can_render(), reason="no OpenGL context (EGL, OSMesa or X) for offscreen rendering")
def test_slice_writes_show_in_the_slice_view_at_once(views):
    """The module's slice writes change labelmap voxels in place with the segmentation's own event stopped
    (`labelmaps.InPlaceChange`); Slicer's 2-D segmentation display still shows each write at the next
    render: a disk, then a smaller one over it."""
    hs, ct = views.hs, views.ct
    seg = ensure_segmentation(hs, ct)
    organ = ensure_segment(seg, "organ")
    shape = slicer.util.arrayFromVolume(ct).shape
    geometry = SliceGeometry.create(shape, volume_ijk_to_world(ct), "axial")
    index = geometry.num_slices // 2
    views.jump_to("Red", (geometry.ijk_to_ras @ np.array([shape[2] / 2, shape[1] / 2, index, 1.0]))[:3])
    editor = hs.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    writer = SliceWriter(hs.scene, hs.app_logic, editor, seg, organ, ct, geometry)
    rows, cols = np.ogrid[: geometry.slice_shape[0], : geometry.slice_shape[1]]
    centre = np.array(geometry.slice_shape) / 2

    def changed_pixels(radius: float) -> int:
        writer.write(index, (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < radius**2)
        return int((pictures.view_rgb(views["Red"]) != plain).any(axis=-1).sum())

    plain = pictures.view_rgb(views["Red"])
    large, small = changed_pixels(120), changed_pixels(60)
    assert large > small > 0
    assert 2.5 < large / small < 6  # the areas' ratio is 4, up to the outline's pixels

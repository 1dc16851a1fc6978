"""Tier B: slice writes keep the 3-D surfaces as Slicer's segment editor keeps them (real MRML classes, and
Slicer's own 3-D displayable manager).

Slicer's editor re-makes the closed surface of the segments a stroke changed and leaves every other
segment's surface as it was. The module's direct writes change labelmap voxels in place; announced with a
plain `Modified()`, that dropped the surfaces of every segment at each written slice, and the 3-D view hid
the whole segmentation. Each write path is checked: the changed segments' surfaces equal a fresh conversion
of their voxels, the others' are the very same objects, and the segmentation names the changed segments in
its events, as the editor's writes do. The module's writer makes the changed surfaces once, at the end of
a job (`SliceWriter.finish`), not at every slice.
"""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk
from vtk.util import numpy_support
from vtkmodules.util.misc import calldata_type

from SAMMed2DSegmentLib.engine.geometry import SliceGeometry
from SAMMed2DSegmentLib.mrml import (
    add_volume_from_array,
    create_headless_scene,
    ensure_segment,
    ensure_segmentation,
    volume_ijk_to_world,
    write_segment_slices,
)
from SAMMed2DSegmentLib.mrml.editing import SliceWriter
from SAMMed2DSegmentLib.mrml.segment_planes import erase_on_slice
from SAMMed2DSegmentLib.mrml.segmentations import load_segmentation, save_segmentation

IJK_TO_RAS = np.diag([0.9, 0.8, 1.5, 1.0])

SHAPE = (10, 18, 20)
SURFACE = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
PATHS = ["direct", "editor", "write_segment_slices", "erase_on_slice"]
#: The segments each path changes (overwrite all; the target's write covers part of A).
CHANGED = {
    "direct": {"target", "A"},
    "editor": {"target", "A"},
    "write_segment_slices": {"target"},
    "erase_on_slice": {"A"},
}


class Scene:
    """Four ball-shaped segments (target, A, B, C) shown as closed surfaces; A lies under the written
    slice's mask, B and C do not."""

    def __init__(self, layers: bool) -> None:
        self.hs = create_headless_scene()
        self.volume = add_volume_from_array(self.hs, np.zeros(SHAPE, np.int16), IJK_TO_RAS, "ct")
        self.seg = ensure_segmentation(self.hs, self.volume)
        self.geometry = SliceGeometry.create(SHAPE, volume_ijk_to_world(self.volume), "axial")
        k, j, i = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
        centres = {"target": (5, 5, 5), "A": (5, 12, 6), "B": (4, 6, 14), "C": (6, 13, 15)}
        self.ids = {}
        for name, (ck, cj, ci) in centres.items():
            ball = (k - ck) ** 2 / 9 + (j - cj) ** 2 / 12 + (i - ci) ** 2 / 12 <= 1
            if layers and name == "A":
                ball |= (k == 5) & (abs(j - 5) <= 1) & (abs(i - 5) <= 1)  # over the target: a second layer
            self.ids[name] = ensure_segment(self.seg, name)
            masks = {s: self.geometry.extract(ball, s) for s in range(SHAPE[0]) if ball[s].any()}
            write_segment_slices(self.seg, self.ids[name], self.volume, self.geometry, masks)
        assert self.seg.GetSegmentation().GetNumberOfLayers() == (2 if layers else 1)
        self.seg.CreateClosedSurfaceRepresentation()
        self.editor = self.hs.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        self.editor.SetOverwriteMode(self.editor.OverwriteAllSegments)
        self.index = 5
        self.mask = _display_plane(self, lambda j, i: (j < 18) & (i < 11))

    def surface(self, name: str):
        return self.seg.GetSegmentation().GetSegment(self.ids[name]).GetRepresentation(SURFACE)


def _display_plane(scene: Scene, where) -> np.ndarray:
    """`where(j, i)` on the axial slice, in the geometry's display orientation."""
    k, j, i = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    volume = np.broadcast_to(where(j, i), SHAPE)
    return scene.geometry.extract(np.ascontiguousarray(volume), scene.index)


def _write(scene: Scene, path: str) -> None:
    target = scene.ids["target"]
    if path in ("direct", "editor"):
        if path == "editor":  # an intensity range admitting every voxel: Slicer's editor logic writes
            scene.editor.SetSourceVolumeIntensityMask(True)
            scene.editor.SetSourceVolumeIntensityMaskRange(-1.0, 1.0)
        writer = SliceWriter(scene.hs.scene, scene.hs.app_logic, scene.editor, scene.seg, target,
                             scene.volume, scene.geometry)  # fmt: skip
        assert writer.direct == (path == "direct")
        writer.write(scene.index, scene.mask)
        writer.finish()  # where the module's job ends
    elif path == "write_segment_slices":
        write_segment_slices(scene.seg, target, scene.volume, scene.geometry, {scene.index: scene.mask})
    else:
        others = [scene.ids[name] for name in ("A", "B", "C")]
        assert erase_on_slice(scene.seg, others, scene.volume, scene.geometry, scene.index, scene.mask)


def _points(polydata) -> np.ndarray:
    return numpy_support.vtk_to_numpy(polydata.GetPoints().GetData())


@pytest.mark.parametrize("layers", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_a_write_remakes_the_changed_surfaces_only(path, layers):
    """The segments whose voxels the write changed get a surface made from their new voxels; every other
    segment keeps its surface object untouched; no segment is left without one."""
    scene = Scene(layers)
    before = {name: scene.surface(name) for name in scene.ids}
    stamps = {name: surface.GetMTime() for name, surface in before.items()}
    points = {name: _points(surface).copy() for name, surface in before.items()}
    _write(scene, path)
    changed = CHANGED[path]
    fresh = slicer.vtkSegmentation()
    fresh.DeepCopy(scene.seg.GetSegmentation())
    assert fresh.CreateRepresentation(SURFACE, True)  # every surface made anew from the voxels
    for name, segment_id in scene.ids.items():
        surface = scene.surface(name)
        assert surface is not None, f"segment {name} lost its 3-D surface"
        expected = fresh.GetSegment(segment_id).GetRepresentation(SURFACE)
        np.testing.assert_array_equal(_points(surface), _points(expected), err_msg=name)
        if name not in changed:
            assert surface is before[name] and surface.GetMTime() == stamps[name], name
        else:
            assert not np.array_equal(_points(surface), points[name]), f"segment {name}: the same surface"


@pytest.mark.parametrize("path", ["direct", "write_segment_slices", "erase_on_slice"])
def test_the_segmentation_names_the_changed_segments(path):
    """Like the editor's writes, the in-place writes invoke SourceRepresentationModified with each changed
    segment's ID (observers such as Slicer's segment table read it)."""
    scene = Scene(False)
    named: list[str | None] = []

    @calldata_type(vtk.VTK_STRING)
    def heard(caller, event, segment_id=None) -> None:
        named.append(segment_id)

    scene.seg.GetSegmentation().AddObserver(slicer.vtkSegmentation.SourceRepresentationModified, heard)
    _write(scene, path)
    expected = CHANGED[path]
    # Slicer's own calls on the way (separating a layer) pass other call data, read here as None.
    assert {i for i in named if i is not None} == {scene.ids[name] for name in expected}


def test_without_surfaces_a_write_makes_none():
    """A segmentation shown in 2-D only stays so: the write makes no surface."""
    scene = Scene(False)
    scene.seg.RemoveClosedSurfaceRepresentation()
    _write(scene, "direct")
    assert not scene.seg.GetSegmentation().ContainsRepresentation(SURFACE)


def test_during_a_job_the_surfaces_wait_for_its_end():
    """The module's writer leaves the surfaces as they were while a job writes slices (remaking a large
    organ's surface took over a second per slice) and remakes the changed ones once at its end."""
    scene = Scene(False)
    before = {name: scene.surface(name) for name in scene.ids}
    points = {name: _points(surface).copy() for name, surface in before.items()}
    writer = SliceWriter(scene.hs.scene, scene.hs.app_logic, scene.editor, scene.seg, scene.ids["target"],
                         scene.volume, scene.geometry)  # fmt: skip
    for index in (scene.index, scene.index + 1):
        writer.write(index, scene.mask)
        for name in scene.ids:
            assert scene.surface(name) is before[name], name
            np.testing.assert_array_equal(_points(scene.surface(name)), points[name], err_msg=name)
    writer.finish()
    fresh = slicer.vtkSegmentation()
    fresh.DeepCopy(scene.seg.GetSegmentation())
    assert fresh.CreateRepresentation(SURFACE, True)
    for name, segment_id in scene.ids.items():
        expected = _points(fresh.GetSegment(segment_id).GetRepresentation(SURFACE))
        np.testing.assert_array_equal(_points(scene.surface(name)), expected, err_msg=name)
        assert (name in CHANGED["direct"]) != (scene.surface(name) is before[name]), name


class ThreeDView:
    """Slicer's 3-D view of segmentations without the application: the segmentations displayable manager
    from the 3-D view factory on an offscreen renderer, with the view node it draws for (an interactor is
    needed, as in a real view)."""

    def __init__(self, scene: Scene) -> None:
        self.renderer = vtk.vtkRenderer()
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkGenericRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        factory = slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(scene.hs.app_logic)
        manager = "vtkMRMLSegmentationsDisplayableManager3D"
        if not factory.IsDisplayableManagerRegistered(manager):
            factory.RegisterDisplayableManager(manager)
        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.Initialize(factory, self.renderer)
        self.managers.SetMRMLDisplayableNode(scene.hs.scene.AddNewNodeByClass("vtkMRMLViewNode"))

    def shown(self) -> list[int]:
        """The number of surface points of each segment actor the view shows (caps left out)."""
        actors = self.renderer.GetActors()
        actors.InitTraversal()
        shown = []
        for _ in range(actors.GetNumberOfItems()):
            actor = actors.GetNextActor()
            data = actor.GetMapper().GetInput() if actor.GetMapper() else None
            if actor.GetVisibility() and data is not None and data.GetNumberOfPoints():
                shown.append(data.GetNumberOfPoints())
        return sorted(shown)


def test_the_3d_view_keeps_showing_every_segment():
    """In Slicer's own 3-D view (its segmentations displayable manager): while a job writes, every segment
    stays shown as it was; at the job's end the changed ones show their new surfaces. Before, the first
    written slice hid every segment of the segmentation in 3-D."""
    scene = Scene(False)
    view = ThreeDView(scene)
    surfaces = sorted(scene.surface(name).GetNumberOfPoints() for name in scene.ids)
    assert view.shown() == surfaces
    writer = SliceWriter(scene.hs.scene, scene.hs.app_logic, scene.editor, scene.seg, scene.ids["target"],
                         scene.volume, scene.geometry)  # fmt: skip
    writer.write(scene.index, scene.mask)
    assert view.shown() == surfaces
    writer.finish()
    after = sorted(scene.surface(name).GetNumberOfPoints() for name in scene.ids)
    assert after != surfaces and view.shown() == after


@pytest.mark.parametrize("shown_in_3d", [True, False])
@pytest.mark.parametrize("path", ["direct", "erase_on_slice"])
def test_an_in_place_write_marks_the_segmentation_unsaved(path, shown_in_3d, tmp_path):
    """A segmentation read from a file and then written into by the module counts as modified since read,
    so Slicer offers to save it: the changed voxels are not lost on closing the scene."""
    scene = Scene(False)
    if not shown_in_3d:
        scene.seg.RemoveClosedSurfaceRepresentation()
    saved = tmp_path / "organs.seg.nrrd"
    save_segmentation(scene.seg, saved)
    loaded = load_segmentation(scene.hs, saved)
    scene.hs.scene.RemoveNode(scene.seg)
    scene.seg = loaded
    scene.ids = {name: loaded.GetSegmentation().GetSegmentIdBySegmentName(name) for name in scene.ids}
    assert not loaded.GetModifiedSinceRead()
    _write(scene, path)
    assert loaded.GetModifiedSinceRead()

"""Tier B: taking back a failed job's writes (`SliceChanges`) on real MRML classes: exactly what the writes
changed, in every segment they touched, and nothing the user did meanwhile."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk

from SAMMed2DSegmentLib.engine.geometry import SliceGeometry
from SAMMed2DSegmentLib.mrml import (
    add_volume_from_array,
    create_headless_scene,
    ensure_segment,
    ensure_segmentation,
    segment_array,
    volume_ijk_to_world,
    write_segment_slices,
)
from SAMMed2DSegmentLib.mrml.editing import SliceWriter
from SAMMed2DSegmentLib.mrml.job_changes import SliceChanges

SHAPE = (8, 20, 24)
EDITOR = slicer.vtkMRMLSegmentEditorNode


class Job:
    """A volume, a target with voxels on every slice, two other segments (A beside it, B away), and a writer
    with its change record, as the controller makes them for a job."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.hs = create_headless_scene()
        self.volume = add_volume_from_array(
            self.hs, np.zeros(SHAPE, np.int16), np.diag([0.9, 0.8, 2, 1]), "ct"
        )
        self.seg = ensure_segmentation(self.hs, self.volume)
        self.geometry = SliceGeometry.create(SHAPE, volume_ijk_to_world(self.volume), "axial")
        self.ids = {name: ensure_segment(self.seg, name) for name in ("target", "A", "B")}
        for name, where in (("target", slice(2, 9)), ("A", slice(9, 16)), ("B", slice(18, 22))):
            voxels = np.zeros(SHAPE, bool)
            voxels[:, 3:17, where] = rng.random((SHAPE[0], 14, where.stop - where.start)) < 0.7
            self.put(name, voxels)
        self.editor = self.hs.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        self.editor.SetOverwriteMode(EDITOR.OverwriteAllSegments)
        self.writer = SliceWriter(self.hs.scene, self.hs.app_logic, self.editor, self.seg, self.ids["target"],
                                  self.volume, self.geometry)  # fmt: skip
        self.changes = SliceChanges(self.seg, self.volume, self.geometry)
        self.rng = rng

    def put(self, name: str, voxels: np.ndarray) -> None:
        """Set a segment to `voxels` (what a user's paint or erase leaves)."""
        masks = {k: self.geometry.extract(voxels, k) for k in range(SHAPE[0])}
        write_segment_slices(self.seg, self.ids[name], self.volume, self.geometry, masks)

    def write(self, index: int) -> None:
        """One of the job's writes, as the controller records it: a mask over the target and part of A."""
        mask = np.zeros(SHAPE, bool)
        mask[index, 5:15, 4:13] = True
        before = self.changes.read(index)
        self.writer.write(index, self.geometry.extract(mask, index))
        self.changes.record(index, before)

    def contents(self) -> dict[str, np.ndarray]:
        return {name: segment_array(self.seg, i, self.volume) for name, i in self.ids.items()}


@pytest.mark.parametrize("seed", range(4))
def test_taking_back_restores_every_segment_the_writes_changed(seed):
    """The target's slices and A's erased voxels come back exactly; B, never touched, stays as it was."""
    job = Job(seed)
    before = job.contents()
    for index in (2, 3, 5, 3):  # slice 3 twice, as a refined slice is
        job.write(index)
    after = job.contents()
    assert not np.array_equal(after["target"], before["target"])
    assert not np.array_equal(after["A"], before["A"])  # overwritten where the mask covered it
    job.changes.take_back()
    for name, voxels in job.contents().items():
        np.testing.assert_array_equal(voxels, before[name], err_msg=name)


def test_what_the_user_did_during_the_job_stays():
    """After the job's writes the user paints on a written slice, erases part of A, adds and paints a new
    segment and removes B: taking back restores only the voxels that still hold what the job wrote."""
    job = Job(7)
    before = job.contents()
    for index in (2, 3):
        job.write(index)
    written = job.contents()
    target = written["target"].copy()
    target[3, 16:19, 2:9] = True  # painted beside the job's mask on a written slice
    job.put("target", target)
    a = written["A"].copy()
    a[6, 3:17, 9:16] = False  # erased on a slice the job never wrote
    job.put("A", a)
    job.ids["new"] = ensure_segment(job.seg, "new")
    new = np.zeros(SHAPE, bool)
    new[2, 0:3, 0:5] = True
    job.put("new", new)
    job.seg.GetSegmentation().RemoveSegment(job.ids.pop("B"))
    job.changes.take_back()
    expected_target = before["target"].copy()
    expected_target[3, 16:19, 2:9] = True
    expected_a = before["A"].copy()
    expected_a[6, 3:17, 9:16] = False
    result = job.contents()
    np.testing.assert_array_equal(result["target"], expected_target)
    np.testing.assert_array_equal(result["A"], expected_a)
    np.testing.assert_array_equal(result["new"], new)
    assert job.seg.GetSegmentation().GetNumberOfSegments() == 3


def test_slicers_editor_writes_are_taken_back_in_every_segment():
    """Writes through Slicer's editor logic (masking: inside A only) are taken back the same way."""
    job = Job(3)
    job.editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    job.editor.SetMaskSegmentID(job.ids["A"])
    assert not job.writer.direct
    before = job.contents()
    for index in (4, 5):
        job.write(index)
    assert any(not np.array_equal(v, before[n]) for n, v in job.contents().items())
    job.changes.take_back()
    for name, voxels in job.contents().items():
        np.testing.assert_array_equal(voxels, before[name], err_msg=name)


def test_a_voxel_another_segment_took_since_is_not_given_back():
    """The job's write took some of A's voxels; the user then painted a new segment C over part of them with
    "overwrite all" (the target lost them): A gets back the others only, so A and C never overlap."""
    job = Job(5)
    before = job.contents()
    job.write(4)
    written = job.contents()
    c = np.zeros(SHAPE, bool)
    c[4, 8:12, 9:12] = True  # on A's voxels that the job's mask took
    assert (before["A"] & c).any() and not (written["A"] & c).any()
    job.put("target", written["target"] & ~c)
    job.ids["C"] = ensure_segment(job.seg, "C")
    job.put("C", c)
    job.changes.take_back()
    result = job.contents()
    np.testing.assert_array_equal(result["A"], before["A"] & ~c)
    np.testing.assert_array_equal(result["C"], c)
    np.testing.assert_array_equal(result["target"], before["target"] & ~c)


def test_taking_back_keeps_the_labelmap_layers():
    """Segments sharing one labelmap layer, several of them overwritten by the write: after taking back, the
    voxels are as before and the segmentation has no more layers than before (giving voxels back while the
    target still held them split the layer)."""
    job = Job(2)
    segmentation = job.seg.GetSegmentation()
    layers = segmentation.GetNumberOfLayers()
    before = job.contents()
    for index in (1, 6):
        job.write(index)
    job.changes.take_back()
    for name, voxels in job.contents().items():
        np.testing.assert_array_equal(voxels, before[name], err_msg=name)
    assert segmentation.GetNumberOfLayers() == layers


def test_a_job_whose_volume_moved_meanwhile_is_taken_back_where_it_wrote():
    """The volume is moved by two voxels after the job's writes (its origin edited): the writes are taken
    back on the grid the job wrote on."""
    job = Job(4)
    before = job.contents()
    job.write(3)
    origin = np.array(job.volume.GetOrigin())
    job.volume.SetOrigin(*(origin + [1.8, 0, 0]))
    job.changes.take_back()
    job.volume.SetOrigin(*origin)
    for name, voxels in job.contents().items():
        np.testing.assert_array_equal(voxels, before[name], err_msg=name)


def test_a_segment_on_another_lattice_does_not_keep_the_users_work_from_staying():
    """With a segment stored on another voxel lattice (imported from another grid), the record reads that one
    whole, and a segment the user added during the job still stays after taking back (the controller used to
    restore a copy of the whole segmentation whenever such a segment was there)."""
    job = Job(6)
    finer = slicer.vtkOrientedImageData()
    finer.SetExtent(0, 15, 0, 15, 0, 3)
    finer.SetSpacing(0.45, 0.4, 1.0)  # half the volume's spacing
    finer.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    finer.GetPointData().GetScalars().Fill(1)
    imported = slicer.vtkSegment()
    imported.SetName("imported")
    imported.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), finer)
    job.seg.GetSegmentation().AddSegment(imported, "imported")
    before = job.contents()
    job.write(2)
    job.ids["C"] = ensure_segment(job.seg, "C")
    c = np.zeros(SHAPE, bool)
    c[7, 0:2, 0:2] = True
    job.put("C", c)
    job.changes.take_back()
    result = job.contents()
    for name in before:
        np.testing.assert_array_equal(result[name], before[name], err_msg=name)
    np.testing.assert_array_equal(result["C"], c)

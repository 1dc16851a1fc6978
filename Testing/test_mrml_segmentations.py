"""Tier B: masks → segments (only the given slices change, shared layers respected, one undo step per call)
and `.seg.nrrd` files (round trip, provenance metadata, atomic writes, damaged files refused)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import slicer
import vtk

from SAMMed2DSegmentLib.engine.geometry import AXES, SliceGeometry
from SAMMed2DSegmentLib.mrml import (
    add_volume_from_array,
    create_headless_scene,
    ensure_segment,
    ensure_segmentation,
    load_segmentation,
    read_segmentation_metadata,
    save_segmentation,
    segment_array,
    volume_ijk_to_world,
    write_segment_slices,
)

from .oblique_volume import IJK_TO_RAS, SHAPE_KJI, rigid_transform


class Setup:
    """A volume with odd geometry under a rotated parent, and segments A and B sharing one labelmap layer."""

    def __init__(self) -> None:
        self.hs = create_headless_scene()
        values = np.arange(np.prod(SHAPE_KJI), dtype=np.int16).reshape(SHAPE_KJI)
        self.volume = add_volume_from_array(self.hs, values, IJK_TO_RAS, "ct")
        self.volume.SetAndObserveTransformNodeID(rigid_transform(self.hs, 20, (5, -3, 2)).GetID())
        self.seg = ensure_segmentation(self.hs, self.volume)
        self.a = ensure_segment(self.seg, "A", (1.0, 0.0, 0.0))
        self.b = ensure_segment(self.seg, "B")
        full = SliceGeometry.create(SHAPE_KJI, volume_ijk_to_world(self.volume), "axial")
        a0, b0 = np.zeros(SHAPE_KJI, bool), np.zeros(SHAPE_KJI, bool)
        a0[:, :3, :4] = True  # A in one corner, B in the opposite one: no overlap, so they share a layer
        b0[:, 4:, 5:] = True
        b0[2, 0, 6] = True
        for segment_id, content in ((self.a, a0), (self.b, b0)):
            masks = {s: full.extract(content, s) for s in range(full.num_slices)}
            write_segment_slices(self.seg, segment_id, self.volume, full, masks)
        segmentation = self.seg.GetSegmentation()
        assert segmentation.GetNumberOfLayers() == 1
        assert segmentation.GetLayerIndex(self.a) == segmentation.GetLayerIndex(self.b)
        np.testing.assert_array_equal(self.array(self.a), a0)
        np.testing.assert_array_equal(self.array(self.b), b0)

    def geometry(self, axis: str) -> SliceGeometry:
        return SliceGeometry.create(SHAPE_KJI, volume_ijk_to_world(self.volume), axis)

    def array(self, segment_id: str) -> np.ndarray:
        return segment_array(self.seg, segment_id, self.volume)

    def history(self):
        history = slicer.vtkSegmentationHistory()
        history.SetSegmentation(self.seg.GetSegmentation())
        return history


@pytest.fixture
def setup() -> Setup:
    return Setup()


def test_ensure_segment_reuses_by_name(setup):
    assert ensure_segment(setup.seg, "A", (0.0, 1.0, 0.0)) == setup.a
    assert setup.seg.GetSegmentation().GetSegment(setup.a).GetColor() == (1.0, 0.0, 0.0)
    assert setup.seg.GetSegmentation().GetNumberOfSegments() == 2
    assert ensure_segmentation(setup.hs, setup.volume, setup.seg) is setup.seg


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("overlap", [False, True], ids=["beside-B", "over-B"])
def test_writing_slices_changes_only_those_slices_of_that_segment(setup, axis, overlap):
    geometry = setup.geometry(axis)
    before_a, before_b = setup.array(setup.a), setup.array(setup.b)
    rng = np.random.default_rng(7)
    masks = {}
    for index in (1, geometry.num_slices - 1):
        mask = rng.random(geometry.slice_shape) < 0.5
        if not overlap:
            mask &= ~geometry.extract(before_b, index)
        masks[index] = mask
    expected = before_a.copy()
    for index, mask in masks.items():
        geometry.view(expected, index)[...] = mask
    assert overlap == any((m & geometry.extract(before_b, s)).any() for s, m in masks.items())

    write_segment_slices(setup.seg, setup.a, setup.volume, geometry, masks)

    np.testing.assert_array_equal(setup.array(setup.a), expected)
    np.testing.assert_array_equal(setup.array(setup.b), before_b)
    for index in range(geometry.num_slices):
        if index not in masks:
            np.testing.assert_array_equal(
                geometry.extract(setup.array(setup.a), index), geometry.extract(before_a, index)
            )


def test_each_call_is_one_undo_step(setup):
    geometry = setup.geometry("coronal")
    history = setup.history()
    states = [setup.array(setup.a)]
    rng = np.random.default_rng(3)
    for slices in ((0, 2, 4), (1,)):
        masks = {s: rng.random(geometry.slice_shape) < 0.4 for s in slices}
        write_segment_slices(setup.seg, setup.a, setup.volume, geometry, masks, history=history)
        states.append(setup.array(setup.a))
    assert history.GetNumberOfStates() == 2
    assert not np.array_equal(states[1], states[2]) and not np.array_equal(states[0], states[1])
    b = setup.array(setup.b)
    assert history.RestorePreviousState()
    np.testing.assert_array_equal(setup.array(setup.a), states[1])
    assert history.RestorePreviousState()
    np.testing.assert_array_equal(setup.array(setup.a), states[0])
    np.testing.assert_array_equal(setup.array(setup.b), b)


@pytest.mark.parametrize("axis", AXES)
def test_slices_beside_other_segments_are_written_in_place(setup, axis, monkeypatch):
    """Writes that cannot touch another segment go straight into the segment's labelmap (cost: the slices
    written, not the volume), keep the shared layer shared, and tell the segmentation (displays follow)."""
    from SAMMed2DSegmentLib.mrml import segmentations

    geometry = setup.geometry(axis)
    before_b = setup.array(setup.b)
    segmentation = setup.seg.GetSegmentation()
    layer = segmentation.GetSegment(setup.a).GetRepresentation("Binary labelmap")
    events = []
    segmentation.AddObserver(slicer.vtkSegmentation.SourceRepresentationModified, lambda *_: events.append(1))

    def no_full_read(*_args):
        raise AssertionError("the whole segment was read: the in-place path was not taken")

    monkeypatch.setattr(segmentations, "_read_on_grid", no_full_read)
    index = geometry.num_slices - 1
    mask = np.ones(geometry.slice_shape, bool) & ~geometry.extract(before_b, index)  # grows A's extent
    write_segment_slices(setup.seg, setup.a, setup.volume, geometry, {index: mask})
    monkeypatch.undo()

    after = setup.array(setup.a)
    np.testing.assert_array_equal(geometry.extract(after, index), mask)
    np.testing.assert_array_equal(setup.array(setup.b), before_b)
    assert segmentation.GetNumberOfLayers() == 1
    assert segmentation.GetSegment(setup.b).GetRepresentation("Binary labelmap") is layer
    assert events


def test_a_write_over_another_segment_takes_the_general_path(setup, monkeypatch):
    """Covering another segment of the shared layer must not overwrite it: Slicer separates the layers."""
    from SAMMed2DSegmentLib.mrml import segmentations

    geometry = setup.geometry("axial")
    before_b = setup.array(setup.b)
    calls = []
    real = segmentations._read_on_grid
    monkeypatch.setattr(segmentations, "_read_on_grid", lambda *a: calls.append(1) or real(*a))
    index = next(i for i in range(geometry.num_slices) if geometry.extract(before_b, i).any())
    mask = np.ones(geometry.slice_shape, bool)
    write_segment_slices(setup.seg, setup.a, setup.volume, geometry, {index: mask})
    assert calls
    np.testing.assert_array_equal(geometry.extract(setup.array(setup.a), index), mask)
    np.testing.assert_array_equal(setup.array(setup.b), before_b)
    assert setup.seg.GetSegmentation().GetNumberOfLayers() == 2


def test_bad_writes_are_refused_without_an_undo_state(setup):
    geometry = setup.geometry("axial")
    history = setup.history()
    before = setup.array(setup.a)
    with pytest.raises(ValueError, match="expected"):
        write_segment_slices(setup.seg, setup.a, setup.volume, geometry, {0: np.ones((2, 2), bool)}, history)
    with pytest.raises(IndexError):
        write_segment_slices(
            setup.seg, setup.a, setup.volume, geometry, {99: np.ones(geometry.slice_shape, bool)}, history
        )
    with pytest.raises(KeyError):
        write_segment_slices(
            setup.seg, "nope", setup.volume, geometry, {0: np.ones(geometry.slice_shape)}, history
        )
    stale = SliceGeometry.create(SHAPE_KJI, IJK_TO_RAS, "axial")  # ignores the volume's parent transform
    with pytest.raises(ValueError, match="IJK→world"):
        write_segment_slices(
            setup.seg, setup.a, setup.volume, stale, {0: np.ones(stale.slice_shape)}, history
        )
    assert history.GetNumberOfStates() == 0
    np.testing.assert_array_equal(setup.array(setup.a), before)


def test_segment_on_another_voxel_grid_is_refused(setup):
    shifted = IJK_TO_RAS.copy()
    shifted[:3, 3] += IJK_TO_RAS[:3, 0] * 0.5  # half a voxel along I: another lattice
    other = add_volume_from_array(setup.hs, np.zeros(SHAPE_KJI), shifted, "other")
    other.SetAndObserveTransformNodeID(setup.volume.GetParentTransformNode().GetID())
    geometry = SliceGeometry.create(SHAPE_KJI, volume_ijk_to_world(other), "axial")
    with pytest.raises(ValueError, match="different voxel grid"):
        write_segment_slices(setup.seg, setup.a, other, geometry, {0: np.zeros(geometry.slice_shape, bool)})


def test_cropped_volume_keeps_the_segment_outside_it(setup):
    """A volume covering only part of the segmentation (same lattice, origin whole voxels away): slices are
    written through it, and what the segment holds outside the volume survives."""
    cropped_to_full = np.eye(4)
    cropped_to_full[:3, 3] = (2, 1, 1)  # cropped voxel (0, 0, 0) is full voxel (2, 1, 1)
    crop = add_volume_from_array(setup.hs, np.zeros((3, 4, 5)), IJK_TO_RAS @ cropped_to_full, "crop")
    crop.SetAndObserveTransformNodeID(setup.volume.GetParentTransformNode().GetID())
    before_a, before_b = setup.array(setup.a), setup.array(setup.b)
    geometry = SliceGeometry.create((3, 4, 5), volume_ijk_to_world(crop), "axial")
    mask = np.ones(geometry.slice_shape, bool)
    write_segment_slices(setup.seg, setup.a, crop, geometry, {1: mask})
    expected = before_a.copy()
    inner = expected[1:4, 1:5, 2:7]  # the cropped volume's voxels in the full array (a view)
    geometry.view(inner, 1)[...] = mask
    np.testing.assert_array_equal(setup.array(setup.a), expected)
    np.testing.assert_array_equal(setup.array(setup.b), before_b)


def test_segmentation_under_its_own_transform(setup):
    """The segmentation node has a parent transform of its own: voxels still land where the volume's are."""
    seg = ensure_segmentation(setup.hs, setup.volume, name="moved")
    seg.SetAndObserveTransformNodeID(rigid_transform(setup.hs, -35, (1, 2, 3)).GetID())
    segment_id = ensure_segment(seg, "S")
    geometry = setup.geometry("sagittal")
    mask = np.zeros(geometry.slice_shape, bool)
    mask[1, 2] = True
    write_segment_slices(seg, segment_id, setup.volume, geometry, {3: mask})
    written = np.zeros(SHAPE_KJI, bool)
    geometry.view(written, 3)[...] = mask
    np.testing.assert_array_equal(segment_array(seg, segment_id, setup.volume), written)
    # Independent check in world space with Slicer's transform handling.
    labelmap = slicer.vtkOrientedImageData()
    assert slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        seg, segment_id, labelmap
    )
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    x0, _, y0, _, z0, _ = labelmap.GetExtent()
    values = vtk.util.numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
    dims = labelmap.GetDimensions()
    ((z, y, x),) = np.argwhere(values.reshape(dims[2], dims[1], dims[0]) > 0)
    world = matrix.MultiplyPoint([x + x0, y + y0, z + z0, 1.0])
    ijk = np.linalg.inv(volume_ijk_to_world(setup.volume)) @ world
    np.testing.assert_allclose(ijk[:3], np.argwhere(written)[0][::-1], atol=1e-6)


def test_seg_nrrd_round_trip_with_metadata(setup, tmp_path):
    setup.seg.GetSegmentation().GetSegment(setup.a).SetTag("SAMMed2D.prompts", "p1:include|x")
    metadata = {
        "model_sha256": "ab" * 32,
        "prompts": 'include "p1" at (1.5, -2, 3)\nroi: none',
        "axis": "axial",
    }
    path = save_segmentation(setup.seg, tmp_path / "out.seg.nrrd", metadata)
    assert read_segmentation_metadata(path) == metadata
    loaded = load_segmentation(setup.hs, path)
    assert loaded is not setup.seg and loaded.GetName() == "out"
    segmentation = loaded.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    for segment_id in (setup.a, setup.b):
        np.testing.assert_array_equal(
            segment_array(loaded, segment_id, setup.volume), setup.array(segment_id), err_msg=segment_id
        )
    assert segmentation.GetSegment(setup.a).GetName() == "A"
    assert segmentation.GetSegment(setup.a).GetColor() == pytest.approx((1.0, 0.0, 0.0))
    found, tag = _tag(segmentation.GetSegment(setup.a), "SAMMed2D.prompts")
    assert found and tag == "p1:include"  # '|' separates tags in the file: segment tags must avoid it
    assert read_segmentation_metadata(save_segmentation(setup.seg, tmp_path / "plain.seg.nrrd")) == {}


def _tag(segment, name: str) -> tuple[bool, str]:
    value = vtk.reference("")
    found = segment.GetTag(name, value)
    return bool(found), str(value)


def _failing_storage(mode: str):
    class FailingStorage(slicer.vtkMRMLSegmentationStorageNode):
        """Slicer's storage node, failing after it has written (part of) the file."""

        def WriteData(self, node):  # noqa: N802 - VTK method name
            written = super().WriteData(node)
            assert written == 1
            if mode == "raise":
                raise OSError("disk full")
            with open(self.GetFileName(), "r+b") as f:
                f.truncate(100)
            return 0

    return FailingStorage


@pytest.mark.parametrize("failure", ["raise", "return-0", "rename"])
def test_failed_save_leaves_previous_file_untouched(setup, tmp_path, monkeypatch, failure):
    path = save_segmentation(setup.seg, tmp_path / "result.seg.nrrd", {"run": "1"})
    before = path.read_bytes()
    geometry = setup.geometry("axial")
    write_segment_slices(setup.seg, setup.a, setup.volume, geometry, {0: np.ones(geometry.slice_shape, bool)})
    if failure == "rename":

        def broken_replace(src, dst):
            raise OSError("rename failed")

        monkeypatch.setattr(os, "replace", broken_replace)
    else:
        monkeypatch.setattr(slicer, "vtkMRMLSegmentationStorageNode", _failing_storage(failure.split("-")[0]))
    with pytest.raises(OSError):
        save_segmentation(setup.seg, path, {"run": "2"})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.seg.nrrd"]


def test_save_refuses_bad_targets_and_metadata(setup, tmp_path):
    with pytest.raises(ValueError, match=r"\.seg\.nrrd"):
        save_segmentation(setup.seg, tmp_path / "out.nii.gz")
    with pytest.raises(FileNotFoundError):
        save_segmentation(setup.seg, tmp_path / "missing" / "out.seg.nrrd")
    with pytest.raises(ValueError, match="metadata key"):
        save_segmentation(setup.seg, tmp_path / "out.seg.nrrd", {"bad key:=": "x"})
    with pytest.raises(TypeError):
        save_segmentation(setup.seg, tmp_path / "out.seg.nrrd", {"n": 3})
    assert list(tmp_path.iterdir()) == []


def test_damaged_segmentation_files_are_refused_not_fatal(setup, tmp_path):
    """Slicer's reader aborts the process on these (an ITK exception escapes); they must become errors."""
    good = save_segmentation(setup.seg, tmp_path / "good.seg.nrrd").read_bytes()
    header_end = good.index(b"\n\n") + 2
    damaged = {
        "truncated.seg.nrrd": good[: header_end + (len(good) - header_end) // 2],
        "header_only.seg.nrrd": good[:header_end],
        "bad_header.seg.nrrd": b"NRRD0004\ngarbage\n\n\x00\x01",
        "empty.seg.nrrd": b"",
    }
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name):
            load_segmentation(setup.hs, tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_segmentation(setup.hs, tmp_path / "absent.seg.nrrd")
    assert setup.hs.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_named_segment_keeps_its_name(setup):
    segment_id = ensure_segment(setup.seg, "Liver")
    segment = setup.seg.GetSegmentation().GetSegment(segment_id)
    assert segment.GetName() == "Liver" and not segment.GetNameAutoGenerated()


def test_provenance_round_trips_through_the_seg_nrrd_header(setup, tmp_path):
    """What `build_provenance` records (prompts in RAS, every slice's confidence) comes back equal, with the
    earlier runs kept, through a file Slicer's own reader still loads."""
    from types import SimpleNamespace as Ns

    from SAMMed2DSegmentLib.formats.provenance import build_provenance
    from SAMMed2DSegmentLib.mrml.segmentations import read_segmentation_provenance

    def run(segment: str, n: int):
        points = [Ns(position=(0.1 * k, -1 / 3, 2e-7 * k), label=k % 2) for k in range(n)]
        rois = [Ns(center=(1.0, 2.0, 3.0), axes=np.eye(3)[[1, 0, 2]], size=(4.0, 5.0, 6.5))]
        outcomes = [
            Ns(index=k, status="propagated", confidence=1 / (k + 3), predicted_iou=0.5) for k in range(n)
        ]
        return build_provenance(
            points, rois, outcomes, model="SAM-Med2D small", model_sha256="cd" * 32, axis="coronal",
            propagate="up", segment=segment, window=(-3.25, 1 / 7),
            window_method="window W400/L40 (ct-soft-tissue)",
        )  # fmt: skip

    earlier, latest = run("A", 3), run("B", 400)
    path = save_segmentation(setup.seg, tmp_path / "p.seg.nrrd", latest.to_metadata([earlier]))
    assert read_segmentation_provenance(path) == [earlier, latest]
    assert read_segmentation_metadata(path)["Slices"].startswith("0:A:0.3333:0.5;1:A:0.25:0.5;")
    assert load_segmentation(setup.hs, path).GetSegmentation().GetNumberOfSegments() == 2
    plain = save_segmentation(setup.seg, tmp_path / "plain.seg.nrrd")
    assert read_segmentation_provenance(plain) == []


def test_metadata_larger_than_a_mebibyte_is_read_whole(setup, tmp_path):
    metadata = {"Big": "x" * (3 << 19), "After": "end"}  # 1.5 MiB, then one more field
    path = save_segmentation(setup.seg, tmp_path / "big.seg.nrrd", metadata)
    assert read_segmentation_metadata(path) == metadata

"""Tier B: the module's slice write (`SliceWriter`) on real MRML classes, against what the editor's overwrite
setting means and against Slicer's own editor logic (`write_slice_as_editor`: `ModifySegmentByLabelmap`).

Where the whole slice is editable the writer takes the direct path: the segments the overwrite setting names
lose the new voxels on that slice only, and the segment's slice is set in place. That is checked for every
overwrite setting, with the segments in one labelmap layer or in two, one of them hidden; and against the
editor logic where that does the same (it does not always: `EDITOR_AGREES`).
The direct path reads and changes the written slice only, so a click beside many segments does not read them
whole (`test_the_direct_write_reads_no_segment_whole`)."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk

from SAMMed2DSegmentLib.engine.geometry import AXES, SliceGeometry
from SAMMed2DSegmentLib.mrml import (
    add_volume_from_array,
    create_headless_scene,
    editing,
    ensure_segment,
    ensure_segmentation,
    segment_array,
    segmentations,
    volume_ijk_to_world,
    write_segment_slices,
)
from SAMMed2DSegmentLib.mrml.editing import SliceWriter, write_slice_as_editor
from SAMMed2DSegmentLib.mrml.segment_planes import erase_on_slice, segments_on_slice
from SAMMed2DSegmentLib.mrml.volumes import vtk_matrix_from_array

from .oblique_volume import IJK_TO_RAS

SHAPE = (6, 9, 11)  # flipped and permuted axes (IJK_TO_RAS), so every view transposes or flips
EDITOR = slicer.vtkMRMLSegmentEditorNode
MODES = {
    "all": EDITOR.OverwriteAllSegments,
    "visible": EDITOR.OverwriteVisibleSegments,
    "none": EDITOR.OverwriteNone,
}


class Scene:
    """A volume, a target segment and three others (B hidden), with blobs drawn from `seed`. `layout`
    "shared": no two segments overlap, so Slicer keeps them in one labelmap layer; "layers": A and C overlap
    on the first K plane, so the segmentation has two layers."""

    def __init__(self, seed: int, layout: str, mode: str) -> None:
        rng = np.random.default_rng(seed)
        self.hs = create_headless_scene()
        self.volume = add_volume_from_array(self.hs, np.zeros(SHAPE, np.int16), IJK_TO_RAS, "ct")
        self.seg = ensure_segmentation(self.hs, self.volume)
        self.ids = [ensure_segment(self.seg, name) for name in ("target", "A", "B", "C")]
        full = SliceGeometry.create(SHAPE, volume_ijk_to_world(self.volume), "axial")
        owner = rng.integers(0, 5, SHAPE)  # 0: none; 1–4: one segment per voxel
        contents = {segment_id: owner == n + 1 for n, segment_id in enumerate(self.ids)}
        if layout == "layers":
            contents[self.ids[3]] = contents[self.ids[3]] | (
                contents[self.ids[0]] & (np.arange(SHAPE[0]) == 0)[:, None, None]
            )
        for segment_id, content in contents.items():
            masks = {s: full.extract(content, s) for s in range(full.num_slices)}
            write_segment_slices(self.seg, segment_id, self.volume, full, masks)
        layers = self.seg.GetSegmentation().GetNumberOfLayers()
        assert layers == (1 if layout == "shared" else 2), layers
        self.seg.GetDisplayNode().SetSegmentVisibility(self.ids[2], False)
        self.editor = self.hs.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        self.editor.SetOverwriteMode(MODES[mode])

    def contents(self) -> list[np.ndarray]:
        return [segment_array(self.seg, segment_id, self.volume) for segment_id in self.ids]


def _geometry(scene: Scene, axis: str) -> SliceGeometry:
    return SliceGeometry.create(SHAPE, volume_ijk_to_world(scene.volume), axis)


#: Where Slicer's editor logic, called as `write_slice_as_editor` calls it, leaves exactly what the overwrite
#: setting says. Elsewhere it differs for C: with B hidden in C's layer ("visible", "shared") C keeps voxels
#: under the new slice; with A and C overlapping ("layers") C loses voxels on slices that were not written.
EDITOR_AGREES = {("all", "shared"), ("none", "shared"), ("none", "layers")}


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("layout", ["shared", "layers"])
@pytest.mark.parametrize("mode", list(MODES))
def test_the_direct_write_does_what_the_overwrite_setting_says(axis, layout, mode, monkeypatch):
    """The target's slice becomes the mask; the segments the setting names (all others, the visible ones,
    none) lose the mask's voxels on that slice; nothing else changes. Where the editor logic does the same
    (`EDITOR_AGREES`), both leave identical voxels."""
    overwritten = {"all": [1, 2, 3], "visible": [1, 3], "none": []}[mode]
    for seed in range(3):
        before = Scene(seed, layout, mode).contents()
        results = []
        for direct in (True, False):
            scene = Scene(seed, layout, mode)
            geometry = _geometry(scene, axis)
            index = seed % geometry.num_slices
            mask = np.random.default_rng(100 + seed).random(geometry.slice_shape) < 0.5
            if direct:
                writer = SliceWriter(scene.hs.scene, scene.hs.app_logic, scene.editor, scene.seg,
                                     scene.ids[0], scene.volume, geometry)  # fmt: skip
                assert writer.direct and writer.overwritten == [scene.ids[n] for n in overwritten]
                with monkeypatch.context() as patched:
                    patched.setattr(editing, "write_slice_as_editor", pytest.fail)  # the direct path only
                    writer.write(index, mask)
            else:
                write_slice_as_editor(scene.hs.scene, scene.hs.app_logic, scene.editor, scene.seg,
                                      scene.ids[0], scene.volume, geometry, index, mask)  # fmt: skip
            results.append(scene.contents())
        expected = [content.copy() for content in before]
        geometry.view(expected[0], index)[...] = mask
        for n in overwritten:
            geometry.view(expected[n], index)[mask] = False
        assert any((b & ~e).any() for b, e in zip(before[1:], expected[1:], strict=True)) == bool(overwritten)
        for name, wanted, ours, editors in zip(("target", "A", "B", "C"), expected, *results, strict=True):
            np.testing.assert_array_equal(ours, wanted, err_msg=f"segment {name}, seed {seed}")
            if (mode, layout) in EDITOR_AGREES:
                np.testing.assert_array_equal(editors, wanted, err_msg=f"editor: segment {name}, seed {seed}")


def test_the_direct_write_reads_no_segment_whole(monkeypatch):
    """With ten other segments on the target's layer and on another, the writer reads and writes slices
    only: Slicer's whole-segment read is never called (it costs ~0.4 s a segment on a 512×512×300 CT)."""
    scene = Scene(0, "layers", "all")
    for n in range(10):
        segment_id = ensure_segment(scene.seg, f"extra {n}")
        geometry = _geometry(scene, "axial")
        blob = np.zeros(geometry.slice_shape, bool)
        blob[n % geometry.slice_shape[0], :] = True
        write_segment_slices(scene.seg, segment_id, scene.volume, geometry, {n % geometry.num_slices: blob})
    geometry = _geometry(scene, "coronal")
    writer = SliceWriter(scene.hs.scene, scene.hs.app_logic, scene.editor, scene.seg, scene.ids[0],
                         scene.volume, geometry)  # fmt: skip
    assert len(writer.overwritten) == 13
    monkeypatch.setattr(segmentations, "_read_on_grid", pytest.fail)
    monkeypatch.setattr(editing, "write_slice_as_editor", pytest.fail)
    for index in range(geometry.num_slices):
        writer.write(index, np.ones(geometry.slice_shape, bool))
    monkeypatch.undo()
    everything = np.ones(SHAPE, bool)
    np.testing.assert_array_equal(segment_array(scene.seg, scene.ids[0], scene.volume), everything)
    for segment_id in scene.seg.GetSegmentation().GetSegmentIDs()[1:]:
        assert not segment_array(scene.seg, segment_id, scene.volume).any()


def test_slices_read_and_erased_match_the_whole_segments():
    """`segments_on_slice` is the slice of Slicer's whole-segment read, for every view and slice;
    `erase_on_slice` removes exactly the masked voxels of the named segments on that slice."""
    scene = Scene(1, "layers", "all")
    whole = dict(zip(scene.ids, scene.contents(), strict=True))
    for axis in AXES:
        geometry = _geometry(scene, axis)
        for index in range(geometry.num_slices):
            for ids in (scene.ids[:1], scene.ids[1:3], scene.ids):
                expected = np.any([geometry.extract(whole[i], index) for i in ids], axis=0)
                np.testing.assert_array_equal(
                    segments_on_slice(scene.seg, ids, scene.volume, geometry, index), expected
                )
    geometry = _geometry(scene, "sagittal")
    mask = np.random.default_rng(7).random(geometry.slice_shape) < 0.5
    assert erase_on_slice(scene.seg, scene.ids[2:], scene.volume, geometry, 3, mask)
    for segment_id, after in zip(scene.ids, scene.contents(), strict=True):
        expected = whole[segment_id].copy()
        if segment_id in scene.ids[2:]:
            geometry.view(expected, 3)[mask] = False
        np.testing.assert_array_equal(after, expected)


def test_a_segment_off_the_volumes_lattice_is_left_to_the_editor(monkeypatch):
    """A segment stored on another voxel lattice cannot be read or erased slice by slice: both say so, and
    nothing changes; the writer then takes the editor's path, which resamples."""
    scene = Scene(2, "shared", "all")
    image = slicer.vtkOrientedImageData()  # half the volume's spacing: another lattice
    image.SetExtent(0, 3, 0, 3, 0, 3)
    half = IJK_TO_RAS.copy()
    half[:3, :3] /= 2
    image.SetImageToWorldMatrix(vtk_matrix_from_array(half))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.GetPointData().GetScalars().Fill(1)
    segment = slicer.vtkSegment()
    segment.SetName("elsewhere")
    segment.AddRepresentation("Binary labelmap", image)
    shifted = "elsewhere"
    assert scene.seg.GetSegmentation().AddSegment(segment, shifted)
    geometry = _geometry(scene, "axial")
    before = scene.contents()
    assert segments_on_slice(scene.seg, [shifted], scene.volume, geometry, 2) is None
    assert not erase_on_slice(
        scene.seg, [scene.ids[1], shifted], scene.volume, geometry, 2, np.ones(geometry.slice_shape, bool)
    )
    for a, b in zip(before, scene.contents(), strict=True):
        np.testing.assert_array_equal(a, b)
    writer = SliceWriter(scene.hs.scene, scene.hs.app_logic, scene.editor, scene.seg, scene.ids[0],
                         scene.volume, geometry)  # fmt: skip
    calls = []
    monkeypatch.setattr(editing, "write_slice_as_editor", lambda *args: calls.append(args[-2]))
    writer.write(2, np.ones(geometry.slice_shape, bool))
    assert calls == [2]

"""Writing model slices into a segment the way a Segment Editor effect writes: through Slicer's own
`vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap`, so the editor node's masking settings apply exactly
as they do to a paint stroke: the editable area (everywhere, inside/outside all or visible segments, inside
one segment), the source-volume intensity range, and which other segments lose the voxels the slice now
covers (all, visible, or none: overlap allowed). Prompting on segment B then never erases segment A unless
the user asked the editor to overwrite it.

That logic reports its failures only when verbose (each is `if (IsVerbose) vtkErrorMacro(...); return;`),
so it runs verbose here with its messages captured, and the slice is read back and checked against what was
asked before it counts as written: a failed write raises instead of passing for done.

Also the record of what the model wrote, so that "propagate from here" can tell a slice the model made from
one the user edited by hand, and never replace the latter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator, Mapping

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..engine.geometry import SliceGeometry
from .labelmaps import (
    give_own_layer,
    image_array,
    layer_neighbours,
    remake_representations,
    require_segment,
    volume_grid,
)
from .scene import captured_vtk_messages
from .segment_planes import erase_on_slice, off_lattice, segment_slice, segments_on_slice
from .segmentations import segment_array, write_segment_slices

# Errors the editor logic reports after the voxels were written, about the data tree only: it moves the
# segmentation under the volume's subject hierarchy parent, and a scene without subject hierarchy items (the
# headless ones) has none to move. The read-back check still judges the voxels.
_NOT_WRITE_FAILURES = ("Subject hierarchy items not found",)


def write_slice_as_editor(
    scene: vtk.vtkObject,
    app_logic: vtk.vtkObject | None,
    editor_node: vtk.vtkObject,
    seg_node: vtk.vtkObject,
    segment_id: str,
    volume_node: vtk.vtkObject,
    geometry: SliceGeometry,
    index: int,
    mask: np.ndarray,
) -> None:
    """Set one display-orientation slice of a segment to `mask` within the editor node's editable area;
    nothing off that slice changes. The editor node is pointed at this segmentation, segment and volume (as
    the embedded editor's own node is while the module shows them). RuntimeError (one line) when the editor
    logic reports an error or the slice read back is not what was asked (see `_check_written_plane`); the
    segment may then be partly changed, and the caller restores it.

    Two edits limited to the slice, as the editor's Erase and Paint effects make: "Remove" where the segment
    is and the mask is not, then "Add" the mask. Not one "Set": the editor logic's "Set" first clears the
    segment over its whole extent (Slicer v5.12.3 `vtkSlicerSegmentEditorLogic.cxx:1906-1930`), so it needs a
    modifier carrying the whole segment (seconds on a large CT), and then also erases, in a segmentation of
    two labelmap layers, voxels of other segments on slices that were not written.

    The segments the overwrite setting names lose the added voxels here (`erase_on_slice`), and the editor
    logic then writes with masking bypassed (its modifier is already limited to the editable area): its own
    erasure, with "visible" and a hidden segment under the new voxels in the target's layer, moves the target
    to a layer of its own and then leaves a visible segment's voxels under it (the erase list is taken from
    the layers after the move, ibid. 1978-2010). Only where an overwritten segment is not on the volume's
    lattice does the editor logic erase, resampling it."""
    require_segment(seg_node, segment_id)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != geometry.slice_shape or not 0 <= index < geometry.num_slices:
        raise ValueError(f"slice {index} of shape {mask.shape} does not fit the {geometry.axis} slices")
    with _pointed_at(editor_node, seg_node, segment_id, volume_node):
        before = segment_slice(seg_node, segment_id, volume_node, geometry, index)
        grid, _ = volume_grid(volume_node, seg_node)
        logic = slicer.vtkSlicerSegmentEditorLogic()
        logic.SetMRMLScene(scene)
        if app_logic is not None:
            logic.SetMRMLApplicationLogic(app_logic)
        logic.SetSegmentEditorNode(editor_node)
        logic.SetVerbose(True)  # off by default, and then every failure branch returns silently
        with captured_vtk_messages() as messages:
            editable = _editable_plane(logic, editor_node, volume_node, grid, geometry, index)
            overwritten = overwritten_segments(editor_node, seg_node, segment_id)
            erased = erase_on_slice(seg_node, overwritten, volume_node, geometry, index, mask & editable)
            if _neighbour_under(seg_node, segment_id, volume_node, geometry, index, mask & editable):
                give_own_layer(seg_node, segment_id, volume_node)
            edits = ((logic.ModificationModeRemove, before & ~mask), (logic.ModificationModeAdd, mask))
            for mode, voxels in edits:
                voxels = voxels & editable  # Remove in "inside one segment" masking may erase outside it
                if voxels.any():
                    image, extent = _slice_image(grid, geometry, index, voxels)
                    # Already masked; where the others were erased here, bypass: the editor erases none.
                    logic.ModifySegmentByLabelmap(seg_node, segment_id, image, mode, extent, True, erased)
    errors = [e for e in messages.errors() if not any(known in e for known in _NOT_WRITE_FAILURES)]
    problem = errors[0] if errors else ""
    if not problem:
        after = segment_slice(seg_node, segment_id, volume_node, geometry, index)
        problem = _check_written_plane(before, after, mask, editable)
    if problem:
        raise RuntimeError(f"cannot write slice {index} of segment {segment_id!r}: {problem}")


@contextlib.contextmanager
def _pointed_at(
    editor_node: vtk.vtkObject, seg_node: vtk.vtkObject, segment_id: str, volume_node: vtk.vtkObject
) -> Iterator[None]:
    """The editor node pointed at the job's segmentation, segment and volume while the editor logic works
    (it reads them from the node), and back to the user's choice afterwards: the node is the embedded
    editor's, and a segment the user selected there to paint while a job runs must stay selected. Its
    Modified events wait until it is back, so the editor's panel sees no switch."""
    was_modifying = editor_node.StartModify()
    chosen = (
        editor_node.GetSegmentationNode(),
        editor_node.GetSelectedSegmentID(),
        editor_node.GetSourceVolumeNode(),
    )
    try:
        if chosen[0] is not seg_node:
            editor_node.SetAndObserveSegmentationNode(seg_node)
        editor_node.SetSelectedSegmentID(segment_id)
        if chosen[2] is not volume_node:
            editor_node.SetAndObserveSourceVolumeNode(volume_node)
        yield
    finally:
        if editor_node.GetSegmentationNode() is not chosen[0]:
            editor_node.SetAndObserveSegmentationNode(chosen[0])
        if editor_node.GetSourceVolumeNode() is not chosen[2]:
            editor_node.SetAndObserveSourceVolumeNode(chosen[2])
        editor_node.SetSelectedSegmentID(chosen[1])
        editor_node.EndModify(was_modifying)


def overwritten_segments(editor_node: vtk.vtkObject, seg_node: vtk.vtkObject, segment_id: str) -> list[str]:
    """The segments that lose the voxels a write into `segment_id` adds: all others, the visible ones (none
    without a display node, as in Slicer's editor logic) or none, as the editor node's overwrite setting says
    now (the editor reads it at every stroke)."""
    editor = slicer.vtkMRMLSegmentEditorNode
    mode = editor_node.GetOverwriteMode()
    display = seg_node.GetDisplayNode()
    if mode == editor.OverwriteNone or (mode == editor.OverwriteVisibleSegments and display is None):
        return []
    return [
        other
        for other in seg_node.GetSegmentation().GetSegmentIDs()
        if other != segment_id
        and (mode == editor.OverwriteAllSegments or display.GetSegmentVisibility(other))
    ]


def _neighbour_under(
    seg_node: vtk.vtkObject, segment_id: str, volume_node: vtk.vtkObject, geometry: SliceGeometry, index: int,
    voxels: np.ndarray,
) -> bool:  # fmt: skip
    """Whether another segment of the segment's labelmap layer lies under `voxels` on slice `index` (true
    when that cannot be read slice by slice)."""
    neighbours = layer_neighbours(seg_node, segment_id)
    if not neighbours or not voxels.any():
        return False
    under = segments_on_slice(seg_node, neighbours, volume_node, geometry, index)
    return under is None or bool((under & voxels).any())


def _slice_image(
    grid: vtk.vtkObject, geometry: SliceGeometry, index: int, plane: np.ndarray
) -> tuple[vtk.vtkObject, list[int]]:
    """A one-voxel-thick labelmap on `grid`'s lattice holding `plane` (display orientation) at slice
    `index`, and its extent."""
    extent = list(grid.GetExtent())
    extent[2 * geometry.slice_axis : 2 * geometry.slice_axis + 2] = [index, index]
    to_world = vtk.vtkMatrix4x4()
    grid.GetImageToWorldMatrix(to_world)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(extent)
    image.SetImageToWorldMatrix(to_world)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    thin = image_array(image)
    dataclasses.replace(geometry, shape_kji=thin.shape).view(thin, 0)[...] = plane
    return image, extent


def _editable_plane(
    logic: vtk.vtkObject,
    editor_node: vtk.vtkObject,
    volume_node: vtk.vtkObject,
    grid: vtk.vtkObject,
    geometry: SliceGeometry,
    index: int,
) -> np.ndarray:
    """Where on the slice the editor may change the segment, as the editor logic decides it before the write:
    its mask labelmap (the masking mode, from the other segments; 1 = locked) and the source volume's
    editable intensity range."""
    editable = np.ones(geometry.slice_shape, bool)
    if editor_node.GetMaskMode() != slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere:
        if not logic.UpdateMaskLabelmap():
            raise RuntimeError("the editable area (masking) could not be computed")
        locked = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            logic.GetMaskLabelmap(), grid, locked
        )
        editable &= geometry.view(image_array(locked), index) == 0
    if editor_node.GetSourceVolumeIntensityMask():
        values = geometry.extract(slicer.util.arrayFromVolume(volume_node), index)
        editable &= _in_range(values, *editor_node.GetSourceVolumeIntensityMaskRange())
    return editable


def _in_range(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Where `values` lie within [low, high] as the editor logic decides it, with its `vtkImageThreshold`,
    which casts the bounds to the values' type first (19.5 counts as 19 on an integer volume)."""
    image = vtk.vtkImageData()
    image.SetDimensions(values.shape[1], values.shape[0], 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(values.ravel(), deep=True))
    threshold = vtk.vtkImageThreshold()
    threshold.SetInputData(image)
    threshold.ThresholdBetween(low, high)
    threshold.SetInValue(1)
    threshold.SetOutValue(0)
    threshold.SetOutputScalarTypeToUnsignedChar()
    threshold.Update()
    return (
        numpy_support.vtk_to_numpy(threshold.GetOutput().GetPointData().GetScalars()).reshape(values.shape)
        == 1
    )


def _check_written_plane(
    before: np.ndarray, after: np.ndarray, mask: np.ndarray, editable: np.ndarray
) -> str:
    """What is wrong with a slice written with "Set" (empty when nothing is): every voxel that changed must
    now agree with the mask, and every voxel of the editable area must agree with it (set where the mask is,
    cleared elsewhere); outside the editable area the segment keeps what it had."""
    if ((after != before) & (after != mask)).any():
        return "voxels that were not asked for changed"
    wrong = editable & (after != mask)
    if wrong.any():
        return f"{int(wrong.sum())} voxels of the editable area were not written"
    return ""


class SliceWriter:
    """Writes one job's slices into one segment as the editor's settings say, directly where the whole
    slice is editable (no editable-area or intensity mask, the default): the segments the overwrite setting
    names lose the slice's new voxels (`erase_on_slice`), and the segment's slice is set in place
    (`write_segment_slices`). That reads and changes the slice only: milliseconds, however many segments
    there are. Otherwise Slicer's editor logic writes (`write_slice_as_editor`, ~0.5 s a slice on a
    512×512×300 CT: `benchmarks/bench_slice_writer.py`), and also where a segment stored on another voxel
    lattice lies under the new voxels (it is read whole once per job to know).

    The settings, the segments and their visibility are read at every write, as the editor reads them at
    every stroke: a segment removed or hidden while a job runs is simply no longer overwritten."""

    def __init__(
        self,
        scene: vtk.vtkObject,
        app_logic: vtk.vtkObject | None,
        editor_node: vtk.vtkObject,
        seg_node: vtk.vtkObject,
        segment_id: str,
        volume_node: vtk.vtkObject,
        geometry: SliceGeometry,
    ) -> None:
        self.args = (scene, app_logic, editor_node, seg_node, segment_id, volume_node, geometry)
        self._whole: dict[str, np.ndarray] = {}  # segments off the volume's lattice, read whole once
        self._stale: set[str] = set()  # segments whose 3-D surface waits for `finish`

    @property
    def direct(self) -> bool:
        """Whether the whole slice is editable (no editable-area or intensity mask)."""
        editor_node = self.args[2]
        return (
            editor_node.GetMaskMode() == slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere
            and not editor_node.GetSourceVolumeIntensityMask()
        )

    @property
    def overwritten(self) -> list[str]:
        _, _, editor_node, seg_node, segment_id, _, _ = self.args
        return overwritten_segments(editor_node, seg_node, segment_id)

    def write(self, index: int, mask: np.ndarray) -> None:
        _, _, _, seg_node, segment_id, volume_node, geometry = self.args
        mask = np.asarray(mask, dtype=bool)
        if self.direct:
            overwritten = self.overwritten
            elsewhere = off_lattice(seg_node, overwritten, volume_node)
            if elsewhere is not None and not self._under(elsewhere, index, mask):
                on_lattice = [i for i in overwritten if i not in elsewhere]
                stale = self._stale
                if erase_on_slice(seg_node, on_lattice, volume_node, geometry, index, mask, stale=stale):
                    write_segment_slices(
                        seg_node, segment_id, volume_node, geometry, {index: mask}, stale=stale
                    )
                    return
        write_slice_as_editor(*self.args, index, mask)

    def finish(self) -> None:
        """Make the 3-D surfaces of the segments the job's direct writes changed, once: per slice, that
        conversion took over a second for a large organ on a 512×512×300 CT, beside a write of milliseconds
        (`benchmarks/bench_slice_writer.py`). Until then the 3-D view shows the surfaces as they were."""
        stale, self._stale = self._stale, set()
        remake_representations(self.args[3].GetSegmentation(), sorted(stale))

    def _under(self, segment_ids: list[str], index: int, mask: np.ndarray) -> bool:
        """Whether one of `segment_ids` (off the volume's lattice, so never changed by a direct write) lies
        under `mask` on slice `index`."""
        _, _, _, seg_node, _, volume_node, geometry = self.args
        for other in segment_ids:
            if other not in self._whole:
                self._whole[other] = segment_array(seg_node, other, volume_node)
            if (geometry.view(self._whole[other], index) & mask).any():
                return True
        return False


def slice_digest(mask: np.ndarray) -> str:
    return hashlib.sha1(np.packbits(np.asarray(mask, dtype=bool))).hexdigest()


class WrittenSlices:
    """What the model last wrote into each slice of each segment (a digest per slice), per view axis."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str, str], dict[int, str]] = {}

    def record(
        self, seg_node: vtk.vtkObject, segment_id: str, axis: str, index: int, mask: np.ndarray
    ) -> None:
        self._records.setdefault((seg_node.GetID(), segment_id, axis), {})[int(index)] = slice_digest(mask)

    def clear(self) -> None:
        self._records.clear()

    def hand_edited(
        self, seg_node: vtk.vtkObject, segment_id: str, volume_node: vtk.vtkObject, geometry: SliceGeometry
    ) -> set[int]:
        """Slices holding voxels the model did not put there: non-empty, and not as the model last wrote
        them (painted, erased in part, or written by another tool)."""
        records: Mapping[int, str] = self._records.get((seg_node.GetID(), segment_id, geometry.axis), {})
        current = segment_array(seg_node, segment_id, volume_node)
        edited = set()
        for index in range(geometry.num_slices):
            plane = geometry.view(current, index)
            if plane.any() and records.get(index) != slice_digest(plane):
                edited.add(index)
        return edited


__all__ = ["SliceWriter", "WrittenSlices", "overwritten_segments", "slice_digest", "write_slice_as_editor"]

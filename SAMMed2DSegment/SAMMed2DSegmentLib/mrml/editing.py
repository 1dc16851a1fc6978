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

import hashlib
from collections.abc import Mapping

import numpy as np
import slicer
import vtk

from ..engine.geometry import SliceGeometry
from .labelmaps import image_array, require_segment, volume_grid
from .scene import captured_vtk_messages
from .segment_planes import erase_on_slice
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
    other slices never change. The editor node is pointed at this segmentation, segment and volume (as the
    embedded editor's own node is while the module shows them). RuntimeError (one line) when the editor
    logic reports an error or the slice read back is not what was asked (see `_check_written_plane`); the
    segment may then be partly changed, and the caller restores it."""
    require_segment(seg_node, segment_id)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != geometry.slice_shape or not 0 <= index < geometry.num_slices:
        raise ValueError(f"slice {index} of shape {mask.shape} does not fit the {geometry.axis} slices")
    if editor_node.GetSegmentationNode() is not seg_node:
        editor_node.SetAndObserveSegmentationNode(seg_node)
    editor_node.SetSelectedSegmentID(segment_id)
    if editor_node.GetSourceVolumeNode() is not volume_node:
        editor_node.SetAndObserveSourceVolumeNode(volume_node)
    # "Set" makes the segment equal to the modifier within the editable area, so the modifier carries the
    # segment's other slices as they are.
    current = segment_array(seg_node, segment_id, volume_node)
    before = geometry.view(current, index).copy()
    geometry.view(current, index)[...] = mask
    grid, _ = volume_grid(volume_node, seg_node)
    grid.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image_array(grid)[...] = current
    extent = list(grid.GetExtent())
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    if app_logic is not None:
        logic.SetMRMLApplicationLogic(app_logic)
    logic.SetSegmentEditorNode(editor_node)
    logic.SetVerbose(True)  # off by default, and then every failure branch returns silently
    with captured_vtk_messages() as messages:
        editable = _editable_plane(logic, editor_node, volume_node, grid, geometry, index)
        logic.ModifySegmentByLabelmap(seg_node, segment_id, grid, logic.ModificationModeSet, extent, True,
                                      False)  # fmt: skip
    errors = [e for e in messages.errors() if not any(known in e for known in _NOT_WRITE_FAILURES)]
    problem = errors[0] if errors else ""
    if not problem:
        after = geometry.view(segment_array(seg_node, segment_id, volume_node), index)
        problem = _check_written_plane(before, after, mask, editable)
    if problem:
        raise RuntimeError(f"cannot write slice {index} of segment {segment_id!r}: {problem}")


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
        low, high = editor_node.GetSourceVolumeIntensityMaskRange()
        voxels = geometry.view(slicer.util.arrayFromVolume(volume_node), index)
        editable &= (voxels >= low) & (voxels <= high)
    return editable


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
    """Writes one job's slices into one segment as the editor would (`write_slice_as_editor`), directly when
    that gives the same voxels: the whole slice is editable (no editable-area or intensity mask). Then the
    segments the overwrite setting names lose the slice's new voxels (`erase_on_slice`) and the segment's
    slice is set in place (`write_segment_slices`). The editor logic rewrites the whole labelmap for every
    call (~2 s per slice on a 512×512×300 CT); the direct write costs the slice (milliseconds), however many
    segments there are, as it reads and changes their slice only."""

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
        editor = slicer.vtkMRMLSegmentEditorNode
        self.direct = (
            editor_node.GetMaskMode() == slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere
            and not editor_node.GetSourceVolumeIntensityMask()
        )
        mode = editor_node.GetOverwriteMode()
        display = seg_node.GetDisplayNode()
        everyone = mode == editor.OverwriteAllSegments or display is None
        #: The segments that lose the voxels a slice write covers (the editor's overwrite setting).
        self.overwritten: list[str] = [
            other
            for other in seg_node.GetSegmentation().GetSegmentIDs()
            if mode != editor.OverwriteNone
            and other != segment_id
            and (everyone or display.GetSegmentVisibility(other))
        ]

    def write(self, index: int, mask: np.ndarray) -> None:
        _, _, _, seg_node, segment_id, volume_node, geometry = self.args
        mask = np.asarray(mask, dtype=bool)
        overwritten = self.overwritten
        if self.direct and (
            not overwritten or erase_on_slice(seg_node, overwritten, volume_node, geometry, index, mask)
        ):
            write_segment_slices(seg_node, segment_id, volume_node, geometry, {index: mask})
        else:
            write_slice_as_editor(*self.args, index, mask)


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


__all__ = ["SliceWriter", "WrittenSlices", "slice_digest", "write_slice_as_editor"]

"""Writing model slices into a segment the way a Segment Editor effect writes: through Slicer's own
`vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap`, so the editor node's masking settings apply exactly
as they do to a paint stroke: the editable area (everywhere, inside/outside all or visible segments, inside
one segment), the source-volume intensity range, and which other segments lose the voxels the slice now
covers (all, visible, or none: overlap allowed). Prompting on segment B then never erases segment A unless
the user asked the editor to overwrite it.

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
from .scene import captured_vtk_messages
from .segmentations import _image_array, _require_segment, _volume_grid, segment_array


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
    embedded editor's own node is while the module shows them)."""
    _require_segment(seg_node, segment_id)
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
    geometry.view(current, index)[...] = mask
    grid, _ = _volume_grid(volume_node, seg_node)
    grid.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    _image_array(grid)[...] = current
    extent = list(grid.GetExtent())
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    if app_logic is not None:
        logic.SetMRMLApplicationLogic(app_logic)
    logic.SetSegmentEditorNode(editor_node)
    with captured_vtk_messages() as messages:
        logic.ModifySegmentByLabelmap(seg_node, segment_id, grid, logic.ModificationModeSet, extent, True,
                                      False)  # fmt: skip
    if messages.errors():
        raise RuntimeError(f"cannot write slice {index} of segment {segment_id!r}: {messages.summary()}")


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


__all__ = ["WrittenSlices", "slice_digest", "write_slice_as_editor"]

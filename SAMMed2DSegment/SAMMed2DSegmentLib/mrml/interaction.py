"""MRML side of the module's interactive work: the main-thread half of each background job.

Before a job: copy what the worker needs out of the nodes (`snapshot_volume`, `prompts_from_nodes`), so the
worker never reads a node. After it: `write_result` on the main thread, which first checks that the nodes
still exist and the volume is still the one that was segmented (the user may have deleted nodes, closed the
scene or resampled the volume meanwhile) and then writes the slices as one undo step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import numpy as np
import vtk

from ..engine.geometry import SliceGeometry
from ..engine.prompts import EXCLUDE, INCLUDE, PointPrompt, RoiPrompt
from ..engine.session import VolumeSnapshot
from .markups import points_from_markups, roi_from_node
from .segmentations import write_segment_slices
from .volumes import volume_array, volume_ijk_to_world


class StaleResultError(RuntimeError):
    """A background result no longer fits the scene (node deleted, volume changed); nothing was written."""


def volume_state_key(volume_node: vtk.vtkObject) -> str:
    """Changes whenever the voxels or the world geometry of the volume change (embedding cache key)."""
    image = volume_node.GetImageData()
    matrix = np.round(volume_ijk_to_world(volume_node), 6).tobytes()
    digest = hashlib.sha1(matrix).hexdigest()[:12]
    return f"{volume_node.GetID()}:{image.GetMTime() if image is not None else 0}:{digest}"


def snapshot_volume(volume_node: vtk.vtkObject, modality: str | None = None) -> VolumeSnapshot:
    """A copy of the voxels and world geometry for the worker thread (main thread only)."""
    return VolumeSnapshot(
        volume_state_key(volume_node), volume_array(volume_node), volume_ijk_to_world(volume_node), modality
    )


def prompts_from_nodes(
    include_node: vtk.vtkObject | None,
    exclude_node: vtk.vtkObject | None,
    roi_node: vtk.vtkObject | None,
) -> tuple[list[PointPrompt], list[RoiPrompt]]:
    """Placed, visible points of the two lists and the ROI (if any), in world RAS."""
    points = []
    if include_node is not None:
        points += points_from_markups(include_node, INCLUDE)
    if exclude_node is not None:
        points += points_from_markups(exclude_node, EXCLUDE)
    rois = [roi_from_node(roi_node)] if roi_node is not None else []
    return points, rois


def nodes_present(scene: vtk.vtkObject, *nodes: vtk.vtkObject | None) -> bool:
    """Whether every given node is still in `scene` (a deleted node keeps its Python object)."""
    return all(node is not None and scene.IsNodePresent(node) for node in nodes)


class CallbackHistory:
    """Stands in for a `vtkSegmentationHistory` in `write_segment_slices`, calling `save_state` instead, so
    the module can route the undo state to the Segment Editor's own history (`saveStateForUndo`): its Undo
    button then undoes our writes and the user's paint strokes alike, one step per action."""

    def __init__(self, seg_node: vtk.vtkObject, save_state: Callable[[], None]) -> None:
        self._segmentation = seg_node.GetSegmentation()
        self._save_state = save_state

    def GetSegmentation(self) -> vtk.vtkObject:  # noqa: N802 (the VTK method name write_segment_slices calls)
        return self._segmentation

    def SaveState(self) -> None:  # noqa: N802
        self._save_state()


def write_result(
    scene: vtk.vtkObject,
    seg_node: vtk.vtkObject,
    segment_id: str,
    volume_node: vtk.vtkObject,
    snapshot_key: str,
    geometry: SliceGeometry,
    masks: Mapping[int, np.ndarray],
    history: object | None = None,
) -> int:
    """Write a background result (main thread): one undo step through `history` (a vtkSegmentationHistory
    or a CallbackHistory). Raises StaleResultError, writing nothing, when the nodes are gone, the segment was
    removed or the volume is no longer the one segmented. Returns the number of slices written."""
    if not nodes_present(scene, seg_node, volume_node):
        raise StaleResultError("the volume or the segmentation was removed while the model was running")
    if seg_node.GetSegmentation().GetSegment(segment_id) is None:
        raise StaleResultError("the segment was removed while the model was running")
    if volume_state_key(volume_node) != snapshot_key:
        raise StaleResultError("the volume changed while the model was running; run it again")
    write_segment_slices(seg_node, segment_id, volume_node, geometry, masks, history=history)
    return len(masks)


__all__ = [
    "CallbackHistory",
    "StaleResultError",
    "nodes_present",
    "prompts_from_nodes",
    "snapshot_volume",
    "volume_state_key",
    "write_result",
]

"""What a job copies out of the nodes before it starts (`snapshot_volume`, `prompts_from_nodes`), so the
engine never reads a node, and the checks its results pass before they are written (`nodes_present`,
`volume_state_key`): the user may delete nodes, close the scene or edit the volume while the model runs.
"""

from __future__ import annotations

import hashlib

import numpy as np
import vtk

from ..engine.prompts import EXCLUDE, INCLUDE, PointPrompt, RoiPrompt
from ..engine.session import VolumeSnapshot
from .markups import points_from_markups, roi_from_node
from .volumes import volume_array, volume_ijk_to_world


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


__all__ = [
    "nodes_present",
    "prompts_from_nodes",
    "snapshot_volume",
    "volume_state_key",
]

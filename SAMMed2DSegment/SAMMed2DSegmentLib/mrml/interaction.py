"""What a job takes out of the nodes before it starts (`volume_info`, `volume_voxels`, `prompts_from_nodes`),
so the engine never reads a node, and the checks its results pass before they are written (`nodes_present`,
`volume_state_key`): the user may delete nodes, close the scene or edit the volume while the model runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import vtk
from vtk.util import numpy_support

from ..engine.geometry import SliceGeometry
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


@dataclass(frozen=True)
class VolumeInfo:
    """What the Slicer side keeps of a volume: its state key and geometry, no voxels. The engine holds its
    own copy of the voxels, and the node has them: a third copy here would only cost memory (a large CT is
    hundreds of MB)."""

    key: str
    shape_kji: tuple[int, int, int]
    ijk_to_ras: np.ndarray
    modality: str | None = None

    def geometry(self, axis: str) -> SliceGeometry:
        return SliceGeometry.create(self.shape_kji, self.ijk_to_ras, axis)


def volume_info(volume_node: vtk.vtkObject, modality: str | None = None) -> VolumeInfo:
    """The key and geometry of a volume, read without touching its voxels."""
    image = volume_node.GetImageData()
    i, j, k = image.GetDimensions() if image is not None else (0, 0, 0)
    return VolumeInfo(volume_state_key(volume_node), (k, j, i), volume_ijk_to_world(volume_node), modality)


def volume_voxels(volume_node: vtk.vtkObject) -> np.ndarray:
    """The node's own voxels as a [k, j, i] array, not a copy: to be copied once, straight into the shared
    memory that takes them to the engine, and not kept (it is only valid until the volume changes)."""
    image = volume_node.GetImageData()
    if image is None or image.GetNumberOfScalarComponents() != 1:
        return volume_array(volume_node)  # raises the clear message for such a volume
    i, j, k = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i)


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
    "VolumeInfo",
    "nodes_present",
    "prompts_from_nodes",
    "snapshot_volume",
    "volume_info",
    "volume_state_key",
    "volume_voxels",
]

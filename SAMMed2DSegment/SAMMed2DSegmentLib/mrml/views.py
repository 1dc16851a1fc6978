"""What the slice views show, read from their MRML nodes: which volume is on screen, which axis a placed
point belongs to, which slice of the input volume a view shows. The panel takes the axis, the slice for
"Propagate from here" and the volume to preselect from here, so these decisions run headless too."""

from __future__ import annotations

import vtk

from ..engine.geometry import SliceGeometry
from ..engine.session import axis_from_views
from .volumes import array_from_vtk_matrix

#: The views Slicer's conventional layout shows, by slice node ID (vtkMRMLSliceLogic names them so).
VIEW_NAMES = ("Red", "Green", "Yellow")

#: Input volumes the model takes: plain scalar volumes. Label maps, vector/RGB and diffusion volumes derive
#: from vtkMRMLScalarVolumeNode too, so an IsA() check lets them through.
INPUT_VOLUME_CLASS = "vtkMRMLScalarVolumeNode"


def is_input_volume(node: vtk.vtkObject | None) -> bool:
    """Whether a node is a volume the model can segment (a plain scalar volume, not a label map)."""
    return node is not None and node.GetClassName() == INPUT_VOLUME_CLASS


def slice_nodes(scene: vtk.vtkObject) -> list[vtk.vtkObject]:
    """The Red, Green and Yellow slice nodes that exist in the scene."""
    found = (scene.GetNodeByID(f"vtkMRMLSliceNode{name}") for name in VIEW_NAMES)
    return [node for node in found if node is not None]


def displayed_volume(scene: vtk.vtkObject) -> vtk.vtkObject | None:
    """The input volume to preselect: the Red view's background if it is a plain scalar volume, else the
    first plain scalar volume of the scene, else None."""
    composite = scene.GetNodeByID("vtkMRMLSliceCompositeNodeRed")
    if composite is not None and composite.GetBackgroundVolumeID():
        node = scene.GetNodeByID(composite.GetBackgroundVolumeID())
        if is_input_volume(node):
            return node
    volumes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    for i in range(volumes.GetNumberOfItems()):
        node = volumes.GetItemAsObject(i)
        if is_input_volume(node):
            return node
    return None


def axis_for_point(scene: vtk.vtkObject, point_ras) -> str | None:
    """The axis of the view a point was placed in, or None when no view or several axes contain it."""
    views = [(n.GetOrientation(), array_from_vtk_matrix(n.GetSliceToRAS())) for n in slice_nodes(scene)]
    return axis_from_views(point_ras, views)


def viewed_slice_index(scene: vtk.vtkObject, geometry: SliceGeometry) -> int | None:
    """The slice of `geometry` (one axis of the input volume) that the view of that orientation shows, or
    None when no view has that orientation or its plane lies outside the volume."""
    views = {n.GetOrientation().lower(): n for n in slice_nodes(scene)}
    view = views.get(geometry.axis)
    if view is None:
        return None
    center = array_from_vtk_matrix(view.GetSliceToRAS())[:3, 3]
    return geometry.slice_of(float(geometry.ras_to_continuous(center)[0, 0]))


__all__ = [
    "INPUT_VOLUME_CLASS",
    "VIEW_NAMES",
    "axis_for_point",
    "displayed_volume",
    "is_input_volume",
    "slice_nodes",
    "viewed_slice_index",
]

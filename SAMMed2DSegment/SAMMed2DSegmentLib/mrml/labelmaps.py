"""How segments are stored: labelmaps on voxel lattices, and the volume's grid expressed in a segmentation's
coordinates. Shared by whole-segment reads and writes (`segmentations`) and single-slice ones
(`segment_planes`, `editing`)."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .volumes import node_to_world_matrix, volume_ijk_to_world, vtk_matrix_from_array


def require_segment(seg_node: vtk.vtkObject, segment_id: str) -> vtk.vtkObject:
    segment = seg_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise KeyError(f"segmentation {seg_node.GetName()!r} has no segment with ID {segment_id!r}")
    return segment


def volume_grid(volume_node: vtk.vtkObject, seg_node: vtk.vtkObject) -> tuple[vtk.vtkObject, tuple[int, ...]]:
    """An empty oriented image with the volume's voxel grid, expressed in the segmentation node's own
    coordinates (segments are stored there, before its parent transform)."""
    image = volume_node.GetImageData()
    if image is None:
        raise ValueError(f"volume {volume_node.GetName()!r} has no voxels")
    i, j, k = image.GetDimensions()
    ijk_to_segmentation = np.linalg.inv(node_to_world_matrix(seg_node)) @ volume_ijk_to_world(volume_node)
    grid = slicer.vtkOrientedImageData()
    grid.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
    grid.SetImageToWorldMatrix(vtk_matrix_from_array(ijk_to_segmentation))
    return grid, (k, j, i)


def image_array(image: vtk.vtkObject) -> np.ndarray:
    x0, x1, y0, y1, z0, z1 = image.GetExtent()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return scalars.reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)


def image_to_world(image: vtk.vtkObject) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def lattice_offset(image: vtk.vtkObject, grid: vtk.vtkObject) -> np.ndarray | None:
    """Integer (i, j, k) offset from `grid` indices to `image` indices when both sample the same points (same
    axes and spacing, origins a whole number of voxels apart), else None: then moving voxels between them
    would be a resampling, not a copy."""
    grid_to_image = np.linalg.inv(image_to_world(image)) @ image_to_world(grid)
    offset = grid_to_image[:3, 3]
    if np.allclose(grid_to_image[:3, :3], np.eye(3), atol=1e-5) and np.allclose(
        offset, np.round(offset), atol=1e-4
    ):
        return np.round(offset).astype(int)
    return None


def empty_extent(extent: tuple[int, ...]) -> bool:
    return extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]


def grow_labelmap(labelmap: vtk.vtkObject, low: np.ndarray, high: np.ndarray) -> None:
    """Enlarge a labelmap's extent in place (same object, so a shared layer stays shared), keeping voxels."""
    old_extent = np.array(labelmap.GetExtent())
    old = image_array(labelmap).copy()
    scalar_type = labelmap.GetScalarType()
    labelmap.SetExtent(int(low[0]), int(high[0]), int(low[1]), int(high[1]), int(low[2]), int(high[2]))
    labelmap.AllocateScalars(scalar_type, 1)
    array = image_array(labelmap)
    array[...] = 0
    a = old_extent[0::2] - low
    array[a[2] : a[2] + old.shape[0], a[1] : a[1] + old.shape[1], a[0] : a[0] + old.shape[2]] = old


def segment_is_empty(seg_node: vtk.vtkObject, segment_id: str) -> bool:
    """Whether the segment holds no voxel (False when that cannot be told from a labelmap), read from its
    labelmap layer without making a merged copy."""
    segmentation = seg_node.GetSegmentation()
    name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if segmentation.GetSourceRepresentationName() != name:
        return False
    segment = require_segment(seg_node, segment_id)
    labelmap = segment.GetRepresentation(name)
    if labelmap is None or empty_extent(labelmap.GetExtent()):
        return True
    return not bool((image_array(labelmap) == segment.GetLabelValue()).any())


def layer_neighbours(seg_node: vtk.vtkObject, segment_id: str) -> list[str]:
    """The other segments stored in the segment's labelmap layer."""
    segmentation = seg_node.GetSegmentation()
    layer = segmentation.GetLayerIndex(segment_id)
    return [
        other
        for other in segmentation.GetSegmentIDs()
        if other != segment_id and segmentation.GetLayerIndex(other) == layer
    ]


def give_own_layer(seg_node: vtk.vtkObject, segment_id: str, volume_node: vtk.vtkObject) -> None:
    """Move the segment to a labelmap layer of its own, before a write that may put it over a neighbour of
    its layer. Slicer's replace and the editor's "Add" separate the layers themselves in most cases, but not
    all: in a layer of partial, shifted extent a neighbour lost voxels. A segment with voxels is separated
    by Slicer (`SeparateSegmentLabelmap`); an empty one gets a new empty labelmap on the volume's grid, as
    separating it left it unreadable in some geometries."""
    segmentation = seg_node.GetSegmentation()
    segment = require_segment(seg_node, segment_id)
    name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    labelmap = segment.GetRepresentation(name)
    if not layer_neighbours(seg_node, segment_id) or labelmap is None:
        return
    if not empty_extent(labelmap.GetExtent()) and (image_array(labelmap) == segment.GetLabelValue()).any():
        segmentation.SeparateSegmentLabelmap(segment_id)
        return
    grid, _ = volume_grid(volume_node, seg_node)
    own = slicer.vtkOrientedImageData()
    own.ShallowCopy(grid)  # the grid's geometry; no voxels
    own.SetExtent(0, -1, 0, -1, 0, -1)
    segment.AddRepresentation(name, own)


class InPlaceChange:
    """Changes made straight in source labelmaps' voxels, announced as Slicer's editor announces its own
    writes (Slicer v5.12.3 `Libs/vtkSegmentationCore/vtkSegmentationModifier.cxx:94-113`,
    `Modules/Loadable/Segmentations/Logic/vtkSlicerSegmentationsModuleLogic.cxx:2092-2125`): the segmentation
    does not hear the labelmaps' Modified events while the change lasts; at its end the changed segments'
    other representations (the 3-D surface) are made again (`remake_representations`), or, with a `stale`
    set, left for the caller to remake once after many changes; and the segmentation says which segments
    changed.

    A labelmap's Modified event heard by the segmentation drops every segment's other representations
    (`vtkSegmentation::OnSourceRepresentationModified`, ibid. `vtkSegmentation.cxx:779-792`), and the 3-D
    view then makes all of them again. Slicer's switch for that observation
    (`SetSourceRepresentationModifiedEnabled`) is protected, so the events are stopped at the labelmap by an
    observer of higher priority that aborts them."""

    def __init__(self, seg_node: vtk.vtkObject, stale: set[str] | None = None) -> None:
        self.segmentation = seg_node.GetSegmentation()
        self.stale = stale
        self.segment_ids: list[str] = []
        self._muted: dict[vtk.vtkObject, int] = {}

    def __enter__(self) -> InPlaceChange:
        return self

    def mute(self, labelmap: vtk.vtkObject) -> None:
        """Stop `labelmap`'s Modified events from reaching the segmentation until the change ends (call before
        changing its extent or voxels)."""
        if labelmap in self._muted:
            return
        tag = 0

        def swallow(caller: vtk.vtkObject, event: str) -> None:
            caller.GetCommand(tag).SetAbortFlag(1)

        tag = labelmap.AddObserver(vtk.vtkCommand.ModifiedEvent, swallow, 1000.0)
        self._muted[labelmap] = tag

    def changed(self, labelmap: vtk.vtkObject, segment_ids: Iterable[str]) -> None:
        """`labelmap`'s voxels of `segment_ids` were changed."""
        self.mute(labelmap)
        labelmap.Modified()  # for the pipelines that show it (slice views)
        self.segment_ids += [i for i in segment_ids if i not in self.segment_ids]

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for labelmap, tag in self._muted.items():
            labelmap.RemoveObserver(tag)
        self._muted.clear()
        present = [i for i in self.segment_ids if self.segmentation.GetSegment(i) is not None]
        if self.stale is None:
            remake_representations(self.segmentation, present)
        else:
            self.stale.update(present)
        for segment_id in present:
            _announce(self.segmentation, slicer.vtkSegmentation.SourceRepresentationModified, segment_id)
            _announce(self.segmentation, slicer.vtkSegmentation.RepresentationModified, segment_id)


def remake_representations(segmentation: vtk.vtkObject, segment_ids: Iterable[str]) -> None:
    """Make the other representations (the 3-D surface) of `segment_ids` again from their labelmaps; every
    other segment keeps its own. A segment no longer there is skipped."""
    present = [i for i in segment_ids if segmentation.GetSegment(i) is not None]
    names: list[str] = []
    segmentation.GetContainedRepresentationNames(names)
    derived = [n for n in names if n != segmentation.GetSourceRepresentationName()]
    if not present or not derived:
        return
    for segment_id in present:
        for name in derived:
            segmentation.GetSegment(segment_id).RemoveRepresentation(name)
    for name in derived:
        segmentation.CreateRepresentation(name)  # only where missing: these segments
    for segment_id in present:
        _announce(segmentation, slicer.vtkSegmentation.RepresentationModified, segment_id)


def _announce(segmentation: vtk.vtkObject, event: int, segment_id: str) -> None:
    """Invoke a segmentation event whose call data is the segment ID as a C string, as Slicer's own are."""
    segmentation.InvokeEvent(event, segment_id.encode() + b"\0")

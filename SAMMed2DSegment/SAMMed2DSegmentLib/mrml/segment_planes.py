"""One slice of several segments, read or erased straight in their labelmaps.

Reading a whole segment through Slicer (`segment_array`) costs ~0.4 s on a 512×512×300 CT, and the model
writes one slice at a time: a click beside ten other segments spent seconds reading them whole. Here only the
slice is touched (milliseconds), where a segment is stored on the volume's voxel lattice, as segments made
on that volume are; anything else is refused (None / False) and the caller takes the whole-segment path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import slicer
import vtk

from ..engine.geometry import SliceGeometry
from .labelmaps import InPlaceChange, empty_extent, image_array, lattice_offset, require_segment, volume_grid
from .segmentations import segment_array


@dataclasses.dataclass
class _LayerSlice:
    """One labelmap's voxels on a volume slice: `values` (rows×cols, 0 outside the labelmap's extent) and
    where they came from, so that changed values can be put back."""

    labelmap: vtk.vtkObject
    thin: np.ndarray  # the volume's slice as a one-voxel-thick [k, j, i] block
    values: np.ndarray  # a view of `thin` in display orientation
    stored: tuple[slice, slice, slice]  # the part of the labelmap's array inside the slice
    inside: tuple[slice, slice, slice]  # the same voxels in `thin`

    def put_back(self, change: InPlaceChange, segment_ids: Iterable[str]) -> None:
        """Store the changed values; `segment_ids` are the segments whose voxels changed."""
        image_array(self.labelmap)[self.stored] = self.thin[self.inside]
        change.changed(self.labelmap, segment_ids)


def _layer_slices(
    seg_node: vtk.vtkObject, segment_ids: Iterable[str], volume_node: vtk.vtkObject, geometry: SliceGeometry,
    index: int,
) -> dict[vtk.vtkObject, tuple[_LayerSlice, dict[int, str]]] | None:  # fmt: skip
    """The slice of each labelmap holding one of `segment_ids`, with those segments by label value; None when
    one of them is not a labelmap on the volume's lattice."""
    segmentation = seg_node.GetSegmentation()
    name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if segmentation.GetSourceRepresentationName() != name:
        return None
    grid, shape = volume_grid(volume_node, seg_node)
    if tuple(geometry.shape_kji) != tuple(shape):
        raise ValueError(f"geometry is for shape {geometry.shape_kji}, volume has {shape}")
    if not 0 <= index < geometry.num_slices:
        raise IndexError(f"slice {index} outside 0..{geometry.num_slices - 1}")
    # The slice's voxels, (i, j, k) low and high corners in volume indices.
    low, high = np.zeros(3, int), np.array(shape[::-1]) - 1
    low[geometry.slice_axis] = high[geometry.slice_axis] = index
    thin_shape = tuple(int(n) for n in (high - low + 1)[::-1])
    thin_geometry = dataclasses.replace(geometry, shape_kji=thin_shape)
    layers: dict[vtk.vtkObject, tuple[_LayerSlice, dict[int, str]]] = {}  # by labelmap: one per layer
    for segment_id in segment_ids:
        segment = require_segment(seg_node, segment_id)
        labelmap = segment.GetRepresentation(name)
        if labelmap is not None and labelmap in layers:  # its layer is read already
            layers[labelmap][1][segment.GetLabelValue()] = segment_id
            continue
        if labelmap is None or labelmap.GetNumberOfScalarComponents() != 1:
            return None
        if empty_extent(labelmap.GetExtent()):
            continue
        offset = lattice_offset(labelmap, grid)  # as `_on_lattice`, once per layer
        if offset is None:
            return None
        extent = np.array(labelmap.GetExtent())
        a = np.maximum(low + offset, extent[0::2])  # the overlap, in labelmap indices
        b = np.minimum(high + offset, extent[1::2])
        thin = np.zeros(thin_shape, dtype=image_array(labelmap).dtype)
        stored = inside = (slice(0, 0),) * 3
        if (a <= b).all():
            s, t = a - extent[0::2], b - extent[0::2] + 1
            stored = (slice(s[2], t[2]), slice(s[1], t[1]), slice(s[0], t[0]))
            u, v = a - offset - low, b - offset - low + 1
            inside = (slice(u[2], v[2]), slice(u[1], v[1]), slice(u[0], v[0]))
            thin[inside] = image_array(labelmap)[stored]
        layer = _LayerSlice(labelmap, thin, thin_geometry.view(thin, 0), stored, inside)
        layers[labelmap] = (layer, {segment.GetLabelValue(): segment_id})
    return layers


def off_lattice(
    seg_node: vtk.vtkObject, segment_ids: Iterable[str], volume_node: vtk.vtkObject
) -> list[str] | None:
    """The segments of `segment_ids` that the slice functions refuse (not a labelmap on the volume's voxel
    lattice), or None when the segmentation's source representation is not a labelmap (all of them)."""
    segmentation = seg_node.GetSegmentation()
    name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if segmentation.GetSourceRepresentationName() != name:
        return None
    grid, _ = volume_grid(volume_node, seg_node)
    return [
        i for i in segment_ids if not _on_lattice(require_segment(seg_node, i).GetRepresentation(name), grid)
    ]


def _on_lattice(labelmap: vtk.vtkObject | None, grid: vtk.vtkObject) -> bool:
    """Whether the slice functions can read and change this labelmap: one component, and empty or on the
    lattice of `grid` (the volume's)."""
    if labelmap is None or labelmap.GetNumberOfScalarComponents() != 1:
        return False
    return empty_extent(labelmap.GetExtent()) or lattice_offset(labelmap, grid) is not None


def segments_on_slice(
    seg_node: vtk.vtkObject, segment_ids: Iterable[str], volume_node: vtk.vtkObject, geometry: SliceGeometry,
    index: int,
) -> np.ndarray | None:  # fmt: skip
    """Where any of `segment_ids` lies on display slice `index` (rows×cols bool), or None when one of them is
    not stored on the volume's lattice."""
    layers = _layer_slices(seg_node, segment_ids, volume_node, geometry, index)
    if layers is None:
        return None
    found = np.zeros(geometry.slice_shape, bool)
    for layer, labels in layers.values():
        found |= np.isin(layer.values, list(labels))
    return found


def each_segment_on_slice(
    seg_node: vtk.vtkObject, segment_ids: Iterable[str], volume_node: vtk.vtkObject, geometry: SliceGeometry,
    index: int,
) -> dict[str, np.ndarray] | None:  # fmt: skip
    """Those of `segment_ids` that hold voxels on display slice `index`, each as rows×cols bool (the others
    are empty there), every labelmap layer read once; None when one of them is not stored on the volume's
    lattice."""
    layers = _layer_slices(seg_node, segment_ids, volume_node, geometry, index)
    if layers is None:
        return None
    found = {}
    for layer, labels in layers.values():
        counts = np.bincount(layer.thin.ravel()) if layer.thin.dtype.kind == "u" else None
        for label, segment_id in labels.items():
            if counts is not None and (label >= len(counts) or counts[label] == 0):
                continue  # not on this slice: no mask to make
            plane = layer.values == label
            if counts is not None or plane.any():
                found[segment_id] = plane
    return found


def segment_slice(
    seg_node: vtk.vtkObject, segment_id: str, volume_node: vtk.vtkObject, geometry: SliceGeometry, index: int
) -> np.ndarray:
    """The segment on display slice `index`: read from that slice only where the segment is on the volume's
    lattice, else from the whole segment."""
    found = segments_on_slice(seg_node, [segment_id], volume_node, geometry, index)
    if found is None:
        found = geometry.extract(segment_array(seg_node, segment_id, volume_node), index)
    return found


def erase_on_slice(
    seg_node: vtk.vtkObject, segment_ids: Iterable[str], volume_node: vtk.vtkObject, geometry: SliceGeometry,
    index: int, mask: np.ndarray, stale: set[str] | None = None,
) -> bool:  # fmt: skip
    """Remove `segment_ids` from the voxels of display slice `index` where `mask` is set (what an editor
    write with "overwrite" does to the other segments); every other voxel stays. False, with nothing changed,
    when one of them is not stored on the volume's lattice. `stale`: see `InPlaceChange`."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != geometry.slice_shape:
        raise ValueError(f"mask of shape {mask.shape} does not fit the {geometry.axis} slices")
    layers = _layer_slices(seg_node, segment_ids, volume_node, geometry, index)
    if layers is None:
        return False
    with InPlaceChange(seg_node, stale) as change:
        for layer, labels in layers.values():
            erased = mask & np.isin(layer.values, list(labels))
            if erased.any():
                losing = [labels[label] for label in np.unique(layer.values[erased]).tolist()]
                layer.values[erased] = 0
                layer.put_back(change, losing)
    return True


__all__ = ["each_segment_on_slice", "erase_on_slice", "off_lattice", "segment_slice", "segments_on_slice"]

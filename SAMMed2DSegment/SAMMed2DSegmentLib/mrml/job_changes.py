"""What a job's slice writes changed, so that a failed job takes back exactly that and nothing else.

A job writes slice after slice while the user goes on working: painting another segment, adding, renaming or
removing segments in the embedded editor. Restoring a copy of the whole segmentation taken before the first
write (as the controller did) took all of that back too: a segment added during the job vanished, a removed
one came back. Here every segment is read on the written slice just before and just after each write (one
read per labelmap layer, milliseconds), and taking back restores, voxel by voxel, only what the write changed
and nobody changed since: a voxel the user painted or erased after the write keeps what the user made.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import vtk

from ..engine.geometry import SliceGeometry
from .segment_planes import each_segment_on_slice, off_lattice, segment_slice
from .segmentations import write_segment_slices


@dataclasses.dataclass
class _SliceChange:
    """One write: each changed segment's voxels on the slice before and after it, bit-packed."""

    index: int
    before: dict[str, bytes]
    after: dict[str, bytes]


class SliceChanges:
    """The writes of one job into one segmentation (any segment: the target, the ones it overwrote, a mask
    segment Slicer's editor gave erased voxels back to). `read` before a write, `record` after it (also after
    a write that failed half-way), `take_back` to undo them all, newest first."""

    def __init__(self, seg_node: vtk.vtkObject, volume_node: vtk.vtkObject, geometry: SliceGeometry) -> None:
        self.seg_node = seg_node
        self.volume_node = volume_node
        self.geometry = geometry
        self.changes: list[_SliceChange] = []

    @classmethod
    def possible(cls, seg_node: vtk.vtkObject, volume_node: vtk.vtkObject) -> bool:
        """Whether every segment can be read slice by slice (stored on the volume's lattice), as this record
        needs; the caller keeps a whole copy otherwise."""
        return off_lattice(seg_node, seg_node.GetSegmentation().GetSegmentIDs(), volume_node) == []

    def read(self, index: int) -> dict[str, np.ndarray]:
        """The segments holding voxels on slice `index` now (the others are empty there)."""
        ids = self.seg_node.GetSegmentation().GetSegmentIDs()
        found = each_segment_on_slice(self.seg_node, ids, self.volume_node, self.geometry, index)
        if found is None:  # one of them is no longer on the lattice (moved by the user): read one by one
            found = {i: segment_slice(self.seg_node, i, self.volume_node, self.geometry, index) for i in ids}
        return {segment_id: plane for segment_id, plane in found.items() if plane.any()}

    def record(self, index: int, before: dict[str, np.ndarray]) -> None:
        after = self.read(index)
        change = _SliceChange(index, {}, {})
        for segment_id in set(before) | set(after):
            old, new = before.get(segment_id), after.get(segment_id)
            if old is None or new is None or not np.array_equal(old, new):
                change.before[segment_id] = _packed(old)
                change.after[segment_id] = _packed(new)
        if change.before:
            self.changes.append(change)

    def take_back(self) -> None:
        """Undo the recorded writes, newest first: a voxel goes back to what it was before a write where the
        write changed it and it still holds what the write left. Segments removed since are left alone."""
        segmentation = self.seg_node.GetSegmentation()
        shape = self.geometry.slice_shape
        for change in reversed(self.changes):
            for segment_id in change.before:
                if segmentation.GetSegment(segment_id) is None:
                    continue
                before = _unpacked(change.before[segment_id], shape)
                after = _unpacked(change.after[segment_id], shape)
                now = segment_slice(self.seg_node, segment_id, self.volume_node, self.geometry, change.index)
                restored = np.where((before != after) & (now == after), before, now)
                if not np.array_equal(restored, now):
                    write_segment_slices(self.seg_node, segment_id, self.volume_node, self.geometry,
                                         {change.index: restored})  # fmt: skip
        self.changes.clear()


def _packed(mask: np.ndarray | None) -> bytes:
    """A slice's voxels, bit-packed (a 512×512 slice: 32 kB); no voxels when the segment was not there."""
    return b"" if mask is None else np.packbits(mask).tobytes()


def _unpacked(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    if not data:
        return np.zeros(shape, bool)
    bits = np.unpackbits(np.frombuffer(data, np.uint8), count=shape[0] * shape[1])
    return bits.reshape(shape).astype(bool)


__all__ = ["SliceChanges"]

"""What a job's slice writes changed, so that a failed job takes back exactly that and nothing else.

A job writes slice after slice while the user goes on working: painting another segment, adding, renaming or
removing segments in the embedded editor. Restoring a copy of the whole segmentation taken before the first
write (as the controller did) took all of that back too: a segment added during the job vanished, a removed
one came back. Here every segment is read on the written slice just before and just after each write (one
read per labelmap layer, milliseconds; a segment stored on another voxel lattice is read whole, ~0.4 s on a
large CT), and taking back restores, voxel by voxel, only what the write changed and nobody changed since: a
voxel the user painted or erased after the write keeps what the user made, and a voxel another segment took
since is not given back (that would make two segments overlap where the user did not let them).

The volume's grid is kept as it was when the job began (`_frozen_grid`): a job whose volume was moved or
resampled meanwhile is taken back where it wrote.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import slicer
import vtk

from ..engine.geometry import SliceGeometry
from .segment_planes import each_segment_on_slice, off_lattice, segment_slice
from .segmentations import write_segment_slices
from .volumes import vtk_matrix_from_array


@dataclasses.dataclass
class _SliceChange:
    """One write: each changed segment's voxels on the slice before and after it, and where any other
    segment lay just after it; bit-packed."""

    index: int
    before: dict[str, bytes]
    after: dict[str, bytes]
    others_after: bytes


class SliceChanges:
    """The writes of one job into one segmentation (any segment: the target, the ones it overwrote, a mask
    segment Slicer's editor gave erased voxels back to). `read` before a write, `record` after it (also after
    a write that failed half-way), `take_back` to undo them all, newest first."""

    def __init__(self, seg_node: vtk.vtkObject, volume_node: vtk.vtkObject, geometry: SliceGeometry) -> None:
        self.seg_node = seg_node
        self.grid_node = _frozen_grid(volume_node, geometry)
        self.geometry = geometry
        self.changes: list[_SliceChange] = []

    def read(self, index: int) -> dict[str, np.ndarray]:
        """The segments holding voxels on slice `index` now (the others are empty there)."""
        ids = list(self.seg_node.GetSegmentation().GetSegmentIDs())
        found = each_segment_on_slice(self.seg_node, ids, self.grid_node, self.geometry, index)
        if found is None:  # some are on another lattice (checked only then: it costs a check per segment)
            elsewhere = off_lattice(self.seg_node, ids, self.grid_node)
            elsewhere = ids if elsewhere is None else elsewhere
            on_lattice = [i for i in ids if i not in elsewhere]
            found = (
                each_segment_on_slice(self.seg_node, on_lattice, self.grid_node, self.geometry, index) or {}
            )
            for segment_id in elsewhere:  # read whole: seconds with many, but exact
                found[segment_id] = segment_slice(
                    self.seg_node, segment_id, self.grid_node, self.geometry, index
                )
        return {segment_id: plane for segment_id, plane in found.items() if plane.any()}

    def record(self, index: int, before: dict[str, np.ndarray]) -> None:
        after = self.read(index)
        changed = [
            segment_id
            for segment_id in set(before) | set(after)
            if not np.array_equal(before.get(segment_id, False), after.get(segment_id, False))
        ]
        if not changed:
            return
        others = np.zeros(self.geometry.slice_shape, bool)
        for segment_id, plane in after.items():
            if segment_id not in changed:
                others |= plane
        self.changes.append(_SliceChange(
            index,
            {segment_id: _packed(before.get(segment_id)) for segment_id in changed},
            {segment_id: _packed(after.get(segment_id)) for segment_id in changed},
            _packed(others),
        ))  # fmt: skip

    def take_back(self) -> None:
        """Undo the recorded writes, newest first: a voxel goes back to what it was before a write where the
        write changed it, it still holds what the write left, and (where it is given back) no segment took it
        since. Voxels are taken away before any is given back, so a segment given back its voxels finds them
        free and stays in its labelmap layer. Segments removed since are left alone."""
        segmentation = self.seg_node.GetSegmentation()
        shape = self.geometry.slice_shape
        for change in reversed(self.changes):
            present = [i for i in change.before if segmentation.GetSegment(i) is not None]
            before = {i: _unpacked(change.before[i], shape) for i in present}
            after = {i: _unpacked(change.after[i], shape) for i in present}
            for giving_back in (False, True):
                now = self.read(change.index)
                for segment_id in present:
                    current = now.get(segment_id, np.zeros(shape, bool))
                    undo = (before[segment_id] != after[segment_id]) & (current == after[segment_id])
                    undo &= before[segment_id] if giving_back else ~before[segment_id]
                    if giving_back:
                        undo &= _free_since(now, after, segment_id, change.others_after, shape)
                    if undo.any():
                        restored = {change.index: np.where(undo, before[segment_id], current)}
                        write_segment_slices(
                            self.seg_node, segment_id, self.grid_node, self.geometry, restored
                        )
        self.changes.clear()


def _free_since(
    now: dict[str, np.ndarray], after: dict[str, np.ndarray], segment_id: str, others_after: bytes,
    shape: tuple[int, int],
) -> np.ndarray:  # fmt: skip
    """Where no segment but `segment_id` has come to lie since the write: a recorded segment where it holds a
    voxel it did not hold just after the write, any other where it holds one no unrecorded segment held."""
    before_others = _unpacked(others_after, shape)
    taken = np.zeros(shape, bool)
    for other, plane in now.items():
        if other == segment_id:
            continue
        taken |= plane & ~after[other] if other in after else plane & ~before_others
    return ~taken


def _frozen_grid(volume_node: vtk.vtkObject, geometry: SliceGeometry) -> vtk.vtkObject:
    """A voxel-less volume node (in no scene) with the volume's grid as the job saw it: its size and its
    IJK→world matrix (parent transforms included)."""
    node = slicer.vtkMRMLScalarVolumeNode()
    image = vtk.vtkImageData()
    image.SetDimensions(*volume_node.GetImageData().GetDimensions())
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(vtk_matrix_from_array(geometry.ijk_to_ras))
    return node


def _packed(mask: np.ndarray | None) -> bytes:
    """A slice's voxels, bit-packed (a 512×512 slice: 32 kB); no voxels when the segment was not there."""
    return b"" if mask is None else np.packbits(mask).tobytes()


def _unpacked(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    if not data:
        return np.zeros(shape, bool)
    bits = np.unpackbits(np.frombuffer(data, np.uint8), count=shape[0] * shape[1])
    return bits.reshape(shape).astype(bool)


__all__ = ["SliceChanges"]

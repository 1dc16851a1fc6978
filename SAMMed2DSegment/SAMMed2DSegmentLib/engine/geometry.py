"""Slice geometry on plain 4×4 matrices: which voxel axis a view cuts, and how a slice is shown.

A volume is a KJI-ordered array (as Slicer's `arrayFromVolume` returns it) plus its IJK→RAS matrix in world
coordinates (any linear parent transform already applied). For a view (axial, coronal, sagittal) the slice
axis is the voxel axis closest to the view's normal, and the 2-D slice is presented the way the matching
Slicer view shows it (the orientation presets of `vtkMRMLSliceNode`), whatever the voxel storage order:
axial has patient right on screen left and anterior up. So flipping or permuting the voxel axes of a volume
without changing its physical geometry gives the same slice images and the same segmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: `vtkMRMLSliceNode` orientation presets (SliceToRAS rotation): columns are the RAS directions of
#: screen right, screen up and the slice normal. Checked against Slicer's own presets in the MRML tests.
VIEW_ORIENTATIONS: dict[str, np.ndarray] = {
    "axial": np.array([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
    "coronal": np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
    "sagittal": np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
}
AXES = tuple(VIEW_ORIENTATIONS)
#: DICOM/ITK patient coordinates (LPS) → Slicer's RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class GeometryError(ValueError):
    """The volume's geometry cannot be used (singular matrix, wrong shape, unknown axis)."""


def _as_matrix(ijk_to_ras: np.ndarray) -> np.ndarray:
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4):
        raise GeometryError(f"IJK→RAS must be a 4×4 matrix, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise GeometryError("IJK→RAS matrix contains NaN or infinite values")
    if not np.allclose(m[3], [0, 0, 0, 1]):
        raise GeometryError("IJK→RAS must be affine (last row 0 0 0 1)")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise GeometryError("IJK→RAS matrix is singular (zero spacing or degenerate directions)")
    return m


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class SliceGeometry:
    """How one view cuts one volume. Voxel axes are numbered 0 = I, 1 = J, 2 = K."""

    shape_kji: tuple[int, int, int]
    ijk_to_ras: np.ndarray
    axis: str
    slice_axis: int
    col_axis: int
    row_axis: int
    col_flip: bool
    row_flip: bool
    #: +1 when increasing slice index moves along the view normal ("up": superior, anterior, left).
    normal_sign: int

    @classmethod
    def create(cls, shape_kji: tuple[int, ...], ijk_to_ras: np.ndarray, axis: str = "axial") -> SliceGeometry:
        if axis not in VIEW_ORIENTATIONS:
            raise GeometryError(f"unknown axis {axis!r}; choose one of {', '.join(AXES)}")
        if len(shape_kji) != 3 or min(shape_kji) < 1:
            raise GeometryError(f"volume must be 3-D with non-empty axes, got shape {tuple(shape_kji)}")
        m = _as_matrix(ijk_to_ras)
        directions = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)  # unit RAS direction of I, J, K
        view = VIEW_ORIENTATIONS[axis]
        right, up, normal = view[:, 0], view[:, 1], view[:, 2]
        # Slice axis: the voxel axis closest to the normal; columns: the other one closest to screen right.
        slice_axis = int(np.argmax(np.abs(directions.T @ normal)))
        rest = [a for a in range(3) if a != slice_axis]
        right_fit = np.abs(directions[:, rest].T @ right)
        col_axis = rest[int(np.argmax(right_fit))]
        row_axis = rest[1 - int(np.argmax(right_fit))]
        return cls(
            shape_kji=tuple(int(s) for s in shape_kji),
            ijk_to_ras=m,
            axis=axis,
            slice_axis=slice_axis,
            col_axis=col_axis,
            row_axis=row_axis,
            col_flip=bool(directions[:, col_axis] @ right < 0),
            # Image rows grow downwards on screen: flip when the voxel axis points up.
            row_flip=bool(directions[:, row_axis] @ up > 0),
            normal_sign=1 if directions[:, slice_axis] @ normal >= 0 else -1,
        )

    # -- sizes -------------------------------------------------------------------------------------
    def _size(self, voxel_axis: int) -> int:
        return self.shape_kji[2 - voxel_axis]

    @property
    def num_slices(self) -> int:
        return self._size(self.slice_axis)

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(rows, cols) of a displayed slice."""
        return self._size(self.row_axis), self._size(self.col_axis)

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """Physical (row, col) pixel size in mm, for area and distance checks."""
        spacing = np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)
        return float(spacing[self.row_axis]), float(spacing[self.col_axis])

    @property
    def obliquity_degrees(self) -> float:
        """Angle between the slice axis and the view's normal: above ~1° the model sees voxel-aligned slices
        that are tilted against the Slicer view of the same name (Slicer would reslice instead)."""
        column = self.ijk_to_ras[:3, self.slice_axis]
        cosine = abs(float(column @ VIEW_ORIENTATIONS[self.axis][:, 2]) / np.linalg.norm(column))
        return float(np.degrees(np.arccos(min(1.0, cosine))))

    # -- pixels ------------------------------------------------------------------------------------
    def view(self, volume_kji: np.ndarray, index: int) -> np.ndarray:
        """Slice `index` of a KJI array in display orientation: a numpy *view*, so writing into it writes
        into the volume (used to put a mask back exactly where its pixels came from)."""
        if tuple(volume_kji.shape[:3]) != self.shape_kji:
            raise GeometryError(f"array shape {volume_kji.shape} does not match geometry {self.shape_kji}")
        if not 0 <= index < self.num_slices:
            raise IndexError(f"slice {index} outside 0..{self.num_slices - 1}")
        selector: list[object] = [slice(None)] * 3
        selector[2 - self.slice_axis] = index
        plane = volume_kji[tuple(selector)]
        # The two remaining array dimensions, in array order, are voxel axes (2 − dim).
        remaining = [2 - d for d in range(3) if d != 2 - self.slice_axis]
        if remaining.index(self.row_axis) != 0:
            plane = plane.T
        if self.row_flip:
            plane = plane[::-1, :]
        if self.col_flip:
            plane = plane[:, ::-1]
        return plane

    def extract(self, volume_kji: np.ndarray, index: int) -> np.ndarray:
        """A contiguous copy of slice `index` in display orientation."""
        return np.ascontiguousarray(self.view(volume_kji, index))

    # -- physical space ----------------------------------------------------------------------------
    def ras_to_continuous(self, points_ras: np.ndarray) -> np.ndarray:
        """N×3 world RAS → N×3 (slice coordinate, x, y): continuous, slice index and pixel centres integer."""
        p = np.atleast_2d(np.asarray(points_ras, dtype=np.float64))
        if p.shape[1] != 3:
            raise GeometryError(f"points must be N×3 RAS, got shape {p.shape}")
        ijk = (np.linalg.inv(self.ijk_to_ras) @ np.c_[p, np.ones(len(p))].T)[:3].T
        s = ijk[:, self.slice_axis]
        x = ijk[:, self.col_axis]
        y = ijk[:, self.row_axis]
        rows, cols = self.slice_shape
        if self.col_flip:
            x = cols - 1 - x
        if self.row_flip:
            y = rows - 1 - y
        return np.stack([s, x, y], axis=1)

    def continuous_to_ras(self, syx: np.ndarray) -> np.ndarray:
        """Inverse of `ras_to_continuous`: N×3 (slice, x, y) → N×3 world RAS."""
        q = np.atleast_2d(np.asarray(syx, dtype=np.float64))
        rows, cols = self.slice_shape
        s, x, y = q[:, 0], q[:, 1].copy(), q[:, 2].copy()
        if self.col_flip:
            x = cols - 1 - x
        if self.row_flip:
            y = rows - 1 - y
        ijk = np.zeros((len(q), 3))
        ijk[:, self.slice_axis] = s
        ijk[:, self.col_axis] = x
        ijk[:, self.row_axis] = y
        return (self.ijk_to_ras @ np.c_[ijk, np.ones(len(q))].T)[:3].T

    def slice_of(self, coordinate: float) -> int | None:
        """The slice whose thickness contains a continuous slice coordinate, or None off the volume."""
        index = int(np.floor(coordinate + 0.5))
        return index if 0 <= index < self.num_slices else None

    def in_plane(self, x: float, y: float) -> bool:
        """Whether a continuous pixel position lies on the slice (pixel edges at ±0.5)."""
        rows, cols = self.slice_shape
        return -0.5 <= x <= cols - 0.5 and -0.5 <= y <= rows - 0.5

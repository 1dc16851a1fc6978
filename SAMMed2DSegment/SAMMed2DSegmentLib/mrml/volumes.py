"""Volume nodes ↔ KJI numpy arrays and their IJK→world geometry (parent transforms included).

The pure layer works on a KJI array plus one 4×4 IJK→RAS matrix in *world* coordinates; this module is where
those two come from, read through Slicer's own volume logic and matrices so that the numbers agree with what
Slicer displays.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

from .scene import HeadlessScene, captured_vtk_messages

VOLUME_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


# -- matrices --------------------------------------------------------------------------------------------


def array_from_vtk_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def vtk_matrix_from_array(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def node_to_world_matrix(node: vtk.vtkObject) -> np.ndarray:
    """4×4 from a transformable node's own coordinates to world: identity without a parent transform.
    Non-linear parents are refused: one matrix cannot describe them, and guessing would misplace voxels."""
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise ValueError(
            f"{node.GetName()!r} is under the non-linear transform {transform_node.GetName()!r}; "
            "harden or remove the transform first"
        )
    matrix = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(matrix)
    return array_from_vtk_matrix(matrix)


# -- reading ---------------------------------------------------------------------------------------------


def _volume_name(path: Path) -> str:
    name = path.name
    for ext in sorted(VOLUME_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)] or name
    return path.stem


def _require_single_component(node: vtk.vtkObject) -> None:
    image = node.GetImageData()
    if image is None:
        raise ValueError(f"volume {node.GetName()!r} has no voxels (image data missing)")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise ValueError(
            f"volume {node.GetName()!r} has {components} values per voxel (RGB, vector or 4-D image); "
            "only single-component 3-D volumes can be segmented"
        )


def load_volume(hs: HeadlessScene, path: str | os.PathLike[str]) -> vtk.vtkObject:
    """Read a .nrrd/.nii(.gz)/.mha volume into the scene with Slicer's volumes logic (so the geometry is
    exactly what Slicer would show). Raises FileNotFoundError or ValueError naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"volume file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a file (DICOM folders are read elsewhere)")
    from ..formats.volumes import check_image_file_size

    check_image_file_size(path)  # header only: a small gzip file can declare gigabytes
    with captured_vtk_messages() as messages:
        node = hs.volumes_logic.AddArchetypeVolume(str(path), _volume_name(path))
    if node is None:
        raise ValueError(f"cannot read volume {path}: {messages.summary()}")
    try:
        _require_single_component(node)
    except ValueError as error:
        hs.scene.RemoveNode(node)
        raise ValueError(f"{path}: {error}") from None
    return node


def volume_array(volume_node: vtk.vtkObject) -> np.ndarray:
    """A copy of the voxels, indexed [k, j, i] like `slicer.util.arrayFromVolume`."""
    _require_single_component(volume_node)
    image = volume_node.GetImageData()
    i, j, k = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return scalars.reshape(k, j, i).copy()


def volume_ijk_to_world(volume_node: vtk.vtkObject) -> np.ndarray:
    """IJK → world RAS: the volume's IJK→RAS composed with its (linear) parent transforms."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return node_to_world_matrix(volume_node) @ array_from_vtk_matrix(ijk_to_ras)


# -- creating --------------------------------------------------------------------------------------------


def _checked_affine(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all() or not np.allclose(m[3], [0, 0, 0, 1]):
        raise ValueError("IJK→RAS must be a finite affine 4×4 matrix (last row 0 0 0 1)")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise ValueError("IJK→RAS matrix is singular")
    return m


def add_volume_from_array(
    hs: HeadlessScene, array_kji: np.ndarray, ijk_to_ras: np.ndarray, name: str = "Volume"
) -> vtk.vtkObject:
    """A scalar volume node holding a copy of `array_kji` with the given IJK→RAS (flips, permutations and
    rotations allowed), for tests and the command line."""
    array = np.asarray(array_kji)
    if array.ndim != 3 or min(array.shape) < 1:
        raise ValueError(f"volume array must be 3-D [k, j, i], got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    try:
        vtk_type = numpy_support.get_vtk_array_type(array.dtype)
    except TypeError:
        raise ValueError(f"unsupported voxel type {array.dtype}") from None
    matrix = _checked_affine(ijk_to_ras)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True, array_type=vtk_type)
    image.GetPointData().SetScalars(scalars)
    node = hs.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(vtk_matrix_from_array(matrix))
    node.CreateDefaultDisplayNodes()
    return node


__all__ = [
    "VOLUME_EXTENSIONS",
    "add_volume_from_array",
    "array_from_vtk_matrix",
    "load_volume",
    "node_to_world_matrix",
    "volume_array",
    "volume_ijk_to_world",
    "vtk_matrix_from_array",
]

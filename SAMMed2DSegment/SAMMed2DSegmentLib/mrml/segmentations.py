"""Masks → segments and `.seg.nrrd` files, through Slicer's own segmentation classes.

Writing changes exactly the slices it is given: the segment is read on the volume's voxel grid, the new
slices are put in through the same `SliceGeometry.view` the masks were predicted on, and the result goes back
with `vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment`, which keeps the other segments of a
shared labelmap layer intact. Files are written atomically, and damaged files are refused before Slicer's
reader sees them (it aborts the whole process on some of them).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..geometry import SliceGeometry
from .scene import HeadlessScene, captured_vtk_messages
from .volumes import node_to_world_matrix, volume_ijk_to_world, vtk_matrix_from_array

SEG_NRRD = ".seg.nrrd"
#: Prefix of our key/value fields in the NRRD header, so they can never collide with Slicer's own keys.
METADATA_PREFIX = "SAMMed2D_"
_ITK_IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".hdr", ".img")


# -- nodes and segments ----------------------------------------------------------------------------------


def ensure_segmentation(
    hs: HeadlessScene,
    volume_node: vtk.vtkObject,
    node: vtk.vtkObject | None = None,
    name: str = "Segmentation",
) -> vtk.vtkObject:
    """The segmentation node to write into: `node` if given, else a new one. Its reference geometry comes from
    the volume when it has none yet or holds no segments, so new segments live on the volume's voxel grid."""
    if node is None:
        node = hs.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
    segmentation = node.GetSegmentation()
    reference_key = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    if segmentation.GetNumberOfSegments() == 0 or not segmentation.GetConversionParameter(reference_key):
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return node


def ensure_segment(
    seg_node: vtk.vtkObject, name: str, color: tuple[float, float, float] | None = None
) -> str:
    """ID of the segment called `name`, added (empty) when missing. An existing segment keeps its color."""
    segmentation = seg_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(name)
    if segment_id:
        return segment_id
    if color is None:
        return segmentation.AddEmptySegment("", name)
    return segmentation.AddEmptySegment("", name, [float(c) for c in color])


def _require_segment(seg_node: vtk.vtkObject, segment_id: str) -> vtk.vtkObject:
    segment = seg_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise KeyError(f"segmentation {seg_node.GetName()!r} has no segment with ID {segment_id!r}")
    return segment


# -- voxel grids -----------------------------------------------------------------------------------------


def _volume_grid(
    volume_node: vtk.vtkObject, seg_node: vtk.vtkObject
) -> tuple[vtk.vtkObject, tuple[int, ...]]:
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


def _image_array(image: vtk.vtkObject) -> np.ndarray:
    x0, x1, y0, y1, z0, z1 = image.GetExtent()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return scalars.reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)


def _image_to_world(image: vtk.vtkObject) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _lattice_offset(image: vtk.vtkObject, grid: vtk.vtkObject) -> np.ndarray | None:
    """Integer (i, j, k) offset from `grid` indices to `image` indices when both sample the same points (same
    axes and spacing, origins a whole number of voxels apart), else None: then moving voxels between them
    would be a resampling, not a copy."""
    grid_to_image = np.linalg.inv(_image_to_world(image)) @ _image_to_world(grid)
    offset = grid_to_image[:3, 3]
    if np.allclose(grid_to_image[:3, :3], np.eye(3), atol=1e-5) and np.allclose(
        offset, np.round(offset), atol=1e-4
    ):
        return np.round(offset).astype(int)
    return None


def _empty_extent(extent: tuple[int, ...]) -> bool:
    return extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]


def _read_on_grid(seg_node: vtk.vtkObject, segment_id: str, grid: vtk.vtkObject) -> np.ndarray:
    """The segment (its own label only, also in a shared layer) sampled on `grid`, as a [k, j, i] array."""
    merged = slicer.vtkOrientedImageData()
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    with captured_vtk_messages() as messages:
        ok = seg_node.GenerateMergedLabelmapForAllSegments(
            merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, grid, ids
        )
    if not ok:
        raise RuntimeError(f"cannot read segment {segment_id!r}: {messages.summary()}")
    if tuple(merged.GetExtent()) != tuple(grid.GetExtent()):
        raise RuntimeError(f"segment {segment_id!r} came back with extent {merged.GetExtent()}")
    return _image_array(merged) > 0


def segment_array(seg_node: vtk.vtkObject, segment_id: str, volume_node: vtk.vtkObject) -> np.ndarray:
    """The segment on the volume's voxel grid as a bool [k, j, i] array (a copy). Works for segments in
    shared labelmap layers (only this segment's label counts) and under parent transforms."""
    _require_segment(seg_node, segment_id)
    grid, _ = _volume_grid(volume_node, seg_node)
    return _read_on_grid(seg_node, segment_id, grid)


def _checked_masks(geometry: SliceGeometry, masks: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    checked = {}
    for index, mask in masks.items():
        mask = np.asarray(mask)
        if mask.shape != geometry.slice_shape:
            raise ValueError(
                f"mask for slice {index} has shape {mask.shape}, expected {geometry.slice_shape}"
            )
        if not 0 <= int(index) < geometry.num_slices:
            raise IndexError(f"slice {index} outside 0..{geometry.num_slices - 1}")
        checked[int(index)] = mask.astype(bool)
    return checked


def _write_grid(
    seg_node: vtk.vtkObject, segment: vtk.vtkObject, volume_node: vtk.vtkObject
) -> tuple[vtk.vtkObject, tuple[slice, slice, slice]]:
    """The volume's grid, grown to also cover what the segment's labelmap already holds outside the volume
    (replacing the segment's labelmap must not drop it), and where the volume sits in it ([k, j, i] slices).
    Refuses a labelmap on another lattice: the rest of the segment would be resampled."""
    grid, (k, j, i) = _volume_grid(volume_node, seg_node)
    low, high = np.zeros(3, int), np.array([i, j, k]) - 1
    stored = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    if stored is not None and not _empty_extent(stored.GetExtent()):
        offset = _lattice_offset(stored, grid)
        if offset is None:
            raise ValueError(
                f"segment {segment.GetName()!r} is stored on a different voxel grid than volume "
                f"{volume_node.GetName()!r}; writing slices would resample the rest of it "
                "(use a segmentation made on this volume)"
            )
        extent = np.array(stored.GetExtent())
        low = np.minimum(low, extent[0::2] - offset)
        high = np.maximum(high, extent[1::2] - offset)
        grid.SetExtent(low[0], high[0], low[1], high[1], low[2], high[2])
    start = -low  # where voxel (0, 0, 0) of the volume is in the grown grid, as (i, j, k)
    inside = (slice(start[2], start[2] + k), slice(start[1], start[1] + j), slice(start[0], start[0] + i))
    return grid, inside


def write_segment_slices(
    seg_node: vtk.vtkObject,
    segment_id: str,
    volume_node: vtk.vtkObject,
    geometry: SliceGeometry,
    masks: Mapping[int, np.ndarray],
    history: vtk.vtkObject | None = None,
) -> None:
    """Set the given display-orientation slices of one segment to `masks` ({slice index: rows×cols bool});
    every other slice of it and every other segment stay exactly as they were. With a
    `vtkSegmentationHistory`, the previous state is saved once, so the whole call is one undo step."""
    segment = _require_segment(seg_node, segment_id)
    if not masks:
        return
    grid, inside = _write_grid(seg_node, segment, volume_node)
    shape = tuple(s.stop - s.start for s in inside)
    if tuple(geometry.shape_kji) != shape:
        raise ValueError(f"geometry is for shape {geometry.shape_kji}, volume has {shape}")
    if not np.allclose(geometry.ijk_to_ras, volume_ijk_to_world(volume_node), atol=1e-6):
        raise ValueError("geometry does not match the volume's current IJK→world matrix (recreate it)")
    checked = _checked_masks(geometry, masks)
    if history is not None and history.GetSegmentation() is not seg_node.GetSegmentation():
        raise ValueError("history belongs to another segmentation")

    voxels = _read_on_grid(seg_node, segment_id, grid).astype(np.uint8)
    on_volume = voxels[inside]  # a view: writing slices into it writes into `voxels`
    for index, mask in checked.items():
        geometry.view(on_volume, index)[...] = mask
    grid.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    _image_array(grid)[...] = voxels

    if history is not None:
        history.SaveState()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    with captured_vtk_messages() as messages:
        ok = logic.SetBinaryLabelmapToSegment(grid, seg_node, segment_id, logic.MODE_REPLACE)
    if not ok:
        raise RuntimeError(f"cannot write segment {segment_id!r}: {messages.summary()}")


# -- files -----------------------------------------------------------------------------------------------


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    checked = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata keys and values must be strings, got {key!r}: {value!r}")
        if not key or not all(c.isalnum() or c in "_.-" for c in key) or not key.isascii():
            raise ValueError(f"metadata key {key!r}: use letters, digits, '_', '.', '-' only")
        checked[key] = value
    return checked


def _escape(value: str) -> str:
    # NRRD key/value lines escape backslash and newline (teem's nrrd format, "key:=value").
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _unescape(value: str) -> str:
    out, chars = [], iter(value)
    for c in chars:
        if c == "\\":
            nxt = next(chars, "")
            out.append("\n" if nxt == "n" else nxt)
        else:
            out.append(c)
    return "".join(out)


def _split_header(data: bytes, path: Path) -> tuple[bytes, bytes]:
    end = data.find(b"\n\n")
    if not data.startswith(b"NRRD") or end < 0:
        raise ValueError(f"{path} is not an NRRD file with an attached header")
    return data[:end], data[end + 2 :]


def _add_header_fields(path: Path, metadata: Mapping[str, str]) -> None:
    """Insert our key/value fields at the end of the NRRD header (the segmentation storage node has no
    hook for custom fields; readers, Slicer's included, ignore keys they do not know)."""
    header, body = _split_header(path.read_bytes(), path)
    lines = [f"{METADATA_PREFIX}{key}:={_escape(value)}" for key, value in metadata.items()]
    path.write_bytes(header + b"\n" + "\n".join(lines).encode("utf-8") + b"\n\n" + body)


def read_segmentation_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata `save_segmentation` stored in a .seg.nrrd header (empty when there is none)."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(1 << 20)
    header, _ = _split_header(head, path)
    result = {}
    for line in header.decode("utf-8", errors="replace").splitlines():
        key, sep, value = line.partition(":=")
        if sep and key.startswith(METADATA_PREFIX):
            result[key[len(METADATA_PREFIX) :]] = _unescape(value)
    return result


def save_segmentation(
    seg_node: vtk.vtkObject, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a .seg.nrrd with Slicer's segmentation storage node, atomically: into a temporary file next to
    the target, then renamed over it, so a failure at any point leaves an existing file as it was.
    `metadata` (provenance: prompts, model hash, …) goes into the NRRD header as `SAMMed2D_<key>:=value`."""
    path = Path(path)
    if not path.name.lower().endswith(SEG_NRRD):
        raise ValueError(f"segmentation files are written as {SEG_NRRD}, got {path.name}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder does not exist: {path.parent}")
    fields = _check_metadata(metadata or {})
    stem = path.name[: -len(SEG_NRRD)]
    temporary = path.with_name(f".{stem}.{secrets.token_hex(6)}.tmp{SEG_NRRD}")
    # Created with O_EXCL and the usual permissions (umask applies), unlike mkstemp's 0600.
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(temporary))
        storage.UseCompressionOn()
        with captured_vtk_messages() as messages:
            ok = storage.WriteData(seg_node)
        if ok != 1:
            raise OSError(f"cannot write segmentation to {path}: {messages.summary()}")
        if fields:
            _add_header_fields(temporary, fields)
        if path.exists():
            shutil.copymode(path, temporary)
        with temporary.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def _probe_image_file(path: Path) -> None:
    """Refuse files that ITK cannot decode: Slicer's segmentation reader lets some ITK exceptions escape
    (truncated or malformed NRRD) and the process aborts. SimpleITK uses the same ITK readers."""
    import SimpleITK as sitk

    try:
        sitk.ReadImage(str(path))
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # The innermost reason comes last: "[nrrd] _nrrdEncodingGzip_read: expected 120 bytes but got 45".
        reason = re.sub(r"^(\[\w+\]\s*\w+:\s*|\w+::ERROR:\s*)", "", lines[-1]) if lines else "unknown error"
        raise ValueError(f"{path} is damaged or not a segmentation file: {reason}") from None


def load_segmentation(hs: HeadlessScene, path: str | os.PathLike[str]) -> vtk.vtkObject:
    """Read a segmentation file (.seg.nrrd, also .nrrd/.nii.gz labelmaps and .seg.vtm) into a new node.
    Raises FileNotFoundError, or ValueError naming the file when it is damaged or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmentation file not found: {path}")
    if path.name.lower().endswith(_ITK_IMAGE_SUFFIXES):
        _probe_image_file(path)
    name = path.name[: -len(SEG_NRRD)] if path.name.lower().endswith(SEG_NRRD) else None
    with captured_vtk_messages() as messages:
        node = hs.segmentations_logic.LoadSegmentationFromFile(str(path), False, name)
    if node is None:
        raise ValueError(f"cannot read segmentation {path}: {messages.summary()}")
    return node


__all__ = [
    "METADATA_PREFIX",
    "ensure_segment",
    "ensure_segmentation",
    "load_segmentation",
    "read_segmentation_metadata",
    "save_segmentation",
    "segment_array",
    "write_segment_slices",
]

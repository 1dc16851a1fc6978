"""Reading volumes for the command line: image files and DICOM series through SimpleITK (ITK's readers,
GDCM for DICOM), converted from ITK's LPS to Slicer's RAS convention."""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.geometry import LPS_TO_RAS
from ..memory import NotEnoughMemory, gigabytes, require_memory

FILE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
#: More voxel values than any CT or MR series holds (a 1024×1024×4096 volume); a header claiming more is
#: refused whatever the memory, since it is damaged or hostile.
MAX_VOXEL_VALUES = 1 << 32
#: Reading holds ITK's buffer and the numpy copy at once.
READ_PEAK_FACTOR = 2


class VolumeReadError(ValueError):
    """The volume cannot be read or is not a 3-D scalar volume."""


@dataclass
class Volume:
    array_kji: np.ndarray
    ijk_to_ras: np.ndarray
    source: str
    modality: str | None = None
    dicom_files: list[str] = field(default_factory=list)
    dicom_datasets: list = field(default_factory=list)  # the series' headers (pydicom), in slice order


def ijk_to_ras_from_itk(image) -> np.ndarray:
    """IJK→RAS of a SimpleITK image (ITK works in LPS)."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3) * np.asarray(
        image.GetSpacing()
    )
    m[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ m


def _check(image, source: str) -> None:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeReadError(
            f"{source}: {image.GetNumberOfComponentsPerPixel()}-component (e.g. RGB) volumes are not "
            "supported; convert to a scalar volume"
        )
    if image.GetDimension() != 3:
        raise VolumeReadError(f"{source}: expected a 3-D volume, got {image.GetDimension()}-D")
    if min(image.GetSize()) < 2:
        raise VolumeReadError(
            f"{source}: a single-slice volume ({'×'.join(map(str, image.GetSize()))}) cannot be propagated; "
            "segment 2-D images with the predictor API"
        )


def check_declared_size(source: str, size: tuple[int, ...], components: int, bytes_per_value: int) -> None:
    """Refuse a volume whose declared size is beyond MAX_VOXEL_VALUES or the memory available, before any
    voxel is read: a 100 kB gzip NRRD can declare 8 GB, and its reader allocates all of it first."""
    values = components
    for n in size:
        values *= int(n)
    shape = "×".join(map(str, size)) + (f"×{components}" if components > 1 else "")
    if values > MAX_VOXEL_VALUES:
        raise VolumeReadError(
            f"{source}: the header declares {shape} voxels, more than the {MAX_VOXEL_VALUES:,} a volume may "
            "have; the file is damaged or not a volume"
        )
    try:
        require_memory(
            values * bytes_per_value * READ_PEAK_FACTOR,
            f"{source}: the header declares {shape} voxels ({gigabytes(values * bytes_per_value)})",
            "free memory or crop the volume",
        )
    except NotEnoughMemory as exc:
        raise VolumeReadError(str(exc)) from None


def check_image_file_size(path: str | Path) -> None:
    """Read only the header of an ITK image file (NRRD, NIfTI, MHA) and check its declared size
    (`check_declared_size`). Raises VolumeReadError."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise VolumeReadError(f"{path}: cannot read volume ({_itk_reason(exc)})") from None
    components = max(reader.GetNumberOfComponents(), 1)
    value_bytes = sitk.Image([1, 1], reader.GetPixelID(), components).GetSizeOfPixelComponent()
    check_declared_size(str(path), reader.GetSize(), components, value_bytes)


def check_compressed_data(path: str | Path) -> None:
    """Raise VolumeReadError when a `.gz` volume file is truncated or damaged. ITK's NIfTI reader does not
    notice a gzip stream cut short: it returns a whole volume, most of its voxels garbage. So the stream is
    decompressed here to its end once (milliseconds a megabyte), which also checks its CRC. (ITK's NRRD
    reader refuses gzip data cut short by itself.)"""
    p = Path(path)
    if not p.name.lower().endswith(".gz"):
        return
    try:
        with gzip.open(p, "rb") as stream:
            while stream.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise VolumeReadError(f"{p}: damaged or truncated compressed data ({exc})") from None


def _itk_reason(exc: RuntimeError) -> str:
    """The last line of an ITK exception (its innermost reason); ITK's messages span many lines."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _read_dicom_folder(folder: Path):
    """The one series in `folder`, validated (gaps, spacing, positions, orientation, truncated files, one
    patient/study/series) before ITK reads exactly those files in slice order; other objects (a DICOM-SEG
    beside the series) are ignored with a warning."""
    import SimpleITK as sitk

    from .dicom.series import REQUIRED_FOR_GEOMETRY, read_series_datasets

    try:
        datasets = read_series_datasets(folder, required=REQUIRED_FOR_GEOMETRY)
    except ValueError as exc:
        raise VolumeReadError(f"{folder}: {exc}") from exc
    files = [str(ds.filename) for ds in datasets]
    first = datasets[0]
    value_bytes = max(int(getattr(first, "BitsAllocated", 16) or 16) // 8, 1)
    samples = int(getattr(first, "SamplesPerPixel", 1) or 1)
    check_declared_size(str(folder), (int(first.Columns), int(first.Rows), len(files)), samples, value_bytes)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    modality = reader.GetMetaData(0, "0008|0060").strip() if reader.HasMetaDataKey(0, "0008|0060") else None
    return image, modality, datasets


def read_volume(path: str | Path) -> Volume:
    """A volume file or a folder holding one DICOM series → KJI array + IJK→RAS (the file is not changed)."""
    import SimpleITK as sitk

    p = Path(path)
    if not p.exists():
        raise VolumeReadError(f"{p}: no such file or folder")
    modality, datasets = None, []
    try:
        if p.is_dir():
            image, modality, datasets = _read_dicom_folder(p)
        else:
            if not p.name.lower().endswith(FILE_SUFFIXES):
                raise VolumeReadError(
                    f"{p}: unsupported file type; use {', '.join(FILE_SUFFIXES)} or a DICOM folder"
                )
            check_image_file_size(p)
            check_compressed_data(p)
            image = sitk.ReadImage(str(p))
    except RuntimeError as exc:  # ITK's readers raise RuntimeError with a long trace
        raise VolumeReadError(f"{p}: cannot read volume ({_itk_reason(exc)})") from exc
    _check(image, str(p))
    files = [str(ds.filename) for ds in datasets]
    return Volume(
        sitk.GetArrayFromImage(image), ijk_to_ras_from_itk(image), str(p), modality, files, datasets
    )


def read_labels_on_grid(path: str | Path, shape: tuple[int, ...], ijk_to_ras: np.ndarray) -> np.ndarray:
    """An integer label map that lies on the image grid (`shape` KJI, `ijk_to_ras`), as a KJI array. A label
    map on another grid is refused: resampling labels silently would train on, or score against, shifted
    masks."""
    labels = read_volume(path)
    if labels.array_kji.dtype.kind not in "iub":
        raise VolumeReadError(f"{path}: label maps must hold integers, got {labels.array_kji.dtype}")
    if labels.array_kji.shape != tuple(shape):
        raise VolumeReadError(
            f"{path}: label map size {labels.array_kji.shape[::-1]} does not match the image "
            f"{tuple(shape)[::-1]} (IJK); resample it onto the image grid first"
        )
    scale = np.abs(ijk_to_ras[:3, :3]).max()
    if not np.allclose(labels.ijk_to_ras, ijk_to_ras, atol=1e-3 * max(scale, 1.0), rtol=0):
        raise VolumeReadError(
            f"{path}: label map geometry (origin, spacing or direction) does not match the image; "
            "resample it onto the image grid first"
        )
    if not labels.array_kji.any():
        raise VolumeReadError(f"{path}: the label map is empty (no labelled voxel)")
    return labels.array_kji

"""Reading and validating one DICOM series (pure layer: numpy + pydicom; no highdicom, so volumes can be read
where highdicom is missing, as in Slicer 5.10).

Every read of a DICOM folder goes through here, for segmentation as well as for DICOM-SEG export: a series
with a gap, uneven spacing, slices without position or orientation, duplicate positions, an unreadable or
truncated file, or images of several patients, studies or series is refused with a line naming a file, never
turned silently into a volume with the wrong geometry. Files that are not DICOM images (a DICOM-SEG saved
beside the series, a README) are ignored with a warning saying so.

Sorting convention: ascending position along the slice normal ``row_cosines x column_cosines``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ...engine.geometry import LPS_TO_RAS

log = logging.getLogger(__name__)

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
ORIENTATION_TOL = 1e-4  # direction cosines
SPACING_REL_TOL = 0.01  # slice steps may deviate from the median step by 1 %

#: What a volume's geometry needs from every image.
REQUIRED_FOR_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
#: What a DICOM-SEG referencing the series needs besides (FrameOfReferenceUID, often stripped by anonymisers,
#: is derived when missing: see headers.py).
REQUIRED_FOR_SEG = (
    "SOPInstanceUID",
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    *REQUIRED_FOR_GEOMETRY,
)
#: One series belongs to one patient, study, series and frame of reference.
_SINGLE_VALUED = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
_DUPLICATES = "the source images contain several slices at the same position (duplicates?)"


def _name(ds: Dataset, n: int) -> str:
    filename = getattr(ds, "filename", None)
    return Path(filename).name if isinstance(filename, str | os.PathLike) and filename else f"image {n + 1}"


def _truncation(ds: Dataset) -> str | None:
    """Why uncompressed pixel data is shorter than the header says, if it is (compressed data is checked by
    the reader's end-of-file warning)."""
    if "PixelData" not in ds or getattr(ds.file_meta, "TransferSyntaxUID", None) is None:
        return None
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return None
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames
        expected = expected * int(ds.BitsAllocated) // 8
    except (AttributeError, TypeError, ValueError):
        return None
    actual = len(ds.PixelData)
    return f"pixel data holds {actual} of {expected} bytes" if actual < expected else None


def _read_image(path: Path, load_pixels: bool) -> Dataset | str:
    """The dataset of `path`, or why it is not an image of a series (a string). Raises ValueError for a
    DICOM file that cannot be read completely."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            return "not DICOM"
        except Exception as exc:  # pydicom raises EOFError, struct.error, ValueError, ... on damaged files
            raise ValueError(f"{path.name}: unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
    ended = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    reason = ended[0] if ended else _truncation(ds)
    if reason:
        raise ValueError(f"{path.name}: truncated DICOM file ({reason}); replace or remove it")
    if ds.get("SOPClassUID") == SEG_SOP_CLASS_UID:
        return "a DICOM-SEG"
    if "Rows" not in ds:
        return f"not an image ({ds.get('Modality') or ds.get('SOPClassUID') or 'unknown object'})"
    if not load_pixels and "PixelData" in ds:
        del ds.PixelData
    return ds


def read_series_datasets(
    folder: str | os.PathLike,
    *,
    load_pixels: bool = False,
    required: Sequence[str] = REQUIRED_FOR_SEG,
) -> list[Dataset]:
    """Read and validate one single-frame DICOM series from ``folder`` (not recursive), sorted along the slice
    normal.

    Files that are not DICOM, DICOM-SEG objects (e.g. an earlier export saved next to the series) and other
    non-image objects are skipped with a warning. Every image is read to its end, so a truncated file is
    found here; its pixel data is dropped unless ``load_pixels``. ``required``: the attributes every image
    must have (``REQUIRED_FOR_GEOMETRY`` to make a volume, the default ``REQUIRED_FOR_SEG`` for a SEG).
    Raises FileNotFoundError when the folder does not exist and ValueError, naming a file, when it holds no
    images, an unreadable file, several series, or a series that is not a regular stack (see
    :func:`sort_series_datasets`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DICOM series folder not found: {folder}")
    datasets, ignored = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        read = _read_image(path, load_pixels)
        if isinstance(read, str):
            ignored.append(f"{path.name} ({read})")
        else:
            datasets.append(read)
    if ignored:
        shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        log.warning(
            "%s: ignored %d file(s) that are not images of the series: %s", folder, len(ignored), shown
        )
    if not datasets:
        raise ValueError(f"no DICOM images found in {folder}")
    return sort_series_datasets(datasets, required)


def sort_series_datasets(
    datasets: Iterable[Dataset], required: Sequence[str] = REQUIRED_FOR_SEG
) -> list[Dataset]:
    """Validate that ``datasets`` form one regular stack of slices and sort them along the slice normal."""
    datasets = list(datasets)
    if not datasets:
        raise ValueError("no source datasets given")
    positions = _validate_stack(datasets, required)
    order = np.argsort(positions, kind="stable")
    ordered = [datasets[n] for n in order]
    _check_regular_steps(ordered)
    return ordered


def series_affine(datasets: Sequence[Dataset]) -> np.ndarray:
    """4x4 matrix mapping ``(i, j, k, 1)`` of the KJI grid of the sorted ``datasets`` to LPS millimetres."""
    first = datasets[0]
    iop = np.asarray([float(v) for v in first.ImageOrientationPatient])
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    origin = _ipp(first)
    if len(datasets) > 1:
        step = (_ipp(datasets[-1]) - origin) / (len(datasets) - 1)
    else:
        normal = np.cross(iop[:3], iop[3:])
        thickness = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
        if not (np.isfinite(thickness) and thickness > 0):  # a negative one would mirror the slice normal
            raise ValueError(f"{_name(first, 0)}: slice spacing {thickness} must be positive and finite (mm)")
        step = normal * thickness
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * col_spacing  # i: along a row (next column)
    affine[:3, 1] = iop[3:] * row_spacing  # j: down a column (next row)
    affine[:3, 2] = step
    affine[:3, 3] = origin
    return affine


def check_series_grid(datasets: Sequence[Dataset], shape_kji: Sequence[int], ijk_to_ras: np.ndarray) -> None:
    """Raise ValueError unless a volume (KJI shape, IJK→RAS) lies on the sorted series' own voxel grid, as a
    DICOM-SEG referencing that series requires."""
    expected = LPS_TO_RAS @ series_affine(datasets)
    if int(shape_kji[0]) != len(datasets) or not np.allclose(expected, ijk_to_ras, atol=1e-3):
        raise ValueError(
            "the volume is not on the voxel grid of the DICOM series (a DICOM-SEG must reference the series "
            "the volume was loaded from)"
        )


def _ipp(ds: Dataset) -> np.ndarray:
    return np.asarray([float(v) for v in ds.ImagePositionPatient])


def _validate_stack(datasets: Sequence[Dataset], required: Sequence[str] = REQUIRED_FOR_SEG) -> np.ndarray:
    """Check the attributes in `required` and the stack's consistency; return each slice's normal position.
    Messages name the (first) offending file."""
    for attr in required:
        missing = [_name(ds, n) for n, ds in enumerate(datasets) if ds.get(attr) in (None, "", [])]
        if missing:
            raise ValueError(
                f"{missing[0]}: no {attr} (or it is empty; {len(missing)} of {len(datasets)} images); "
                "the series' geometry cannot be trusted"
            )
    for attr in _SINGLE_VALUED:
        values = [str(ds.get(attr, "")) for ds in datasets]
        counts = Counter(values)
        if len(counts) > 1:
            common = counts.most_common(1)[0][0]
            odd = next(n for n, v in enumerate(values) if v != common)
            raise ValueError(
                f"the source images belong to {len(counts)} different {attr}s ({_name(datasets[odd], odd)} "
                f"has {values[odd]!r}, most have {common!r}); pass one series of one patient"
            )
    uids = [str(ds.get("SOPInstanceUID", n)) for n, ds in enumerate(datasets)]
    if len(set(uids)) != len(uids):
        raise ValueError("the source images contain duplicate SOPInstanceUIDs")
    multiframe = [ds for ds in datasets if int(ds.get("NumberOfFrames") or 1) > 1]
    if multiframe:
        raise ValueError(
            f"{_name(multiframe[0], 0)}: multi-frame source images are not supported; the series must be "
            "single-frame images"
        )
    try:
        sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"malformed Rows or Columns ({exc})") from exc
    if len(sizes) > 1:
        raise ValueError("the source images have different sizes (Rows x Columns)")
    try:
        spacing = np.asarray([[float(v) for v in ds.PixelSpacing] for ds in datasets])
        iops = np.asarray([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
        positions = [_ipp(ds) for ds in datasets]
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"malformed PixelSpacing, ImageOrientationPatient or ImagePositionPatient ({exc})"
        ) from exc
    # ITK reads a zero spacing as a made-up 1 mm and a negative one mirrors the volume: both are refused.
    bad = [n for n, row in enumerate(spacing) if not (np.isfinite(row).all() and (row > 0).all())]
    if spacing.ndim == 2 and bad:
        n = bad[0]
        raise ValueError(
            f"{_name(datasets[n], n)}: PixelSpacing {spacing[n].tolist()} must be two positive finite numbers"
        )
    if (
        spacing.ndim != 2
        or spacing.shape[1] != 2
        or not np.allclose(spacing, spacing[0], rtol=1e-4, atol=1e-6)
    ):
        raise ValueError("the source images have different (or malformed) PixelSpacing")
    for what, values in (("ImageOrientationPatient", iops), ("ImagePositionPatient", positions)):
        bad = [n for n, row in enumerate(values) if not np.isfinite(row).all()]
        if bad:  # a NaN or infinite position would make the slice spacing itself non-finite
            raise ValueError(f"{_name(datasets[bad[0]], bad[0])}: {what} holds a value that is not finite")
    if iops.ndim != 2 or iops.shape[1] != 6:
        raise ValueError("malformed ImageOrientationPatient (needs 6 values)")
    if any(p.shape != (3,) for p in positions):
        raise ValueError("malformed ImagePositionPatient (needs 3 values)")
    if not np.allclose(iops, iops[0], atol=ORIENTATION_TOL):
        odd = int(np.argmax(np.abs(iops - iops[0]).max(axis=1)))
        raise ValueError(
            "the source images have mixed orientations (ImageOrientationPatient of "
            f"{_name(datasets[odd], odd)} differs)"
        )
    normal = np.cross(iops[0, :3], iops[0, 3:])
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise ValueError("malformed ImageOrientationPatient: direction cosines are not orthonormal")
    return np.asarray([p @ normal for p in positions])


def _check_regular_steps(ordered: Sequence[Dataset]) -> None:
    """Refuse duplicate positions and uneven steps (a missing slice, a moved one), naming the two files."""
    if len(ordered) < 2:
        return
    ipps = np.asarray([_ipp(ds) for ds in ordered])
    steps = np.diff(ipps, axis=0)
    lengths = np.linalg.norm(steps, axis=1)
    median = float(np.median(lengths))
    if median <= 1e-6 or lengths.min() <= 1e-6 * max(median, 1.0):
        n = int(np.argmin(lengths))
        raise ValueError(f"{_DUPLICATES}: {_name(ordered[n], n)} and {_name(ordered[n + 1], n + 1)}")
    iop = np.asarray([float(v) for v in ordered[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    typical = np.median(steps, axis=0)
    along = float(typical @ normal)
    sideways = float(np.linalg.norm(typical - along * normal))
    if sideways > SPACING_REL_TOL * np.linalg.norm(typical):
        # ITK and most viewers would stack such slices straight: refused rather than read with wrong geometry.
        angle = np.degrees(np.arctan2(sideways, abs(along)))
        raise ValueError(
            f"the slices are sheared by {angle:.1f}° against their ImageOrientationPatient (gantry tilt?); "
            "resample the series to an orthogonal grid first"
        )
    deviation = np.linalg.norm(steps - np.median(steps, axis=0), axis=1)
    worst = int(np.argmax(deviation))
    if deviation[worst] > SPACING_REL_TOL * median:
        raise ValueError(
            f"uneven slice spacing: {_name(ordered[worst], worst)} to {_name(ordered[worst + 1], worst + 1)} "
            f"is {lengths[worst]:.4g} mm while the median step is {median:.4g} mm (missing slices or a gap?)"
        )

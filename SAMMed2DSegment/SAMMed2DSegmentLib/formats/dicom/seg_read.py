"""Reading a DICOM-SEG from any tool (ours, dcmqi, QuantitativeReporting, highdicom, OHIF) onto its source
grid (pure layer: numpy + pydicom + highdicom).

Frames are placed by their own ImagePositionPatient on the target grid (``ijk_to_lps`` and its KJI shape), so
a SEG whose frames cover only some slices, or list them in another order than the source, lands exactly where
it was drawn; frames without a position are placed by the source instance they are derived from. BINARY and
FRACTIONAL are read (FRACTIONAL as probabilities in 0..1; :func:`read_dicom_seg` thresholds them). With the
source datasets given, a SEG of another series or frame of reference is refused, naming both.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ..provenance import Provenance, parse_algorithm_parameters
from .seg_write import Code3
from .series import SEG_SOP_CLASS_UID, series_affine

POSITION_TOL_VOXELS = 0.05  # a frame may sit this far (in voxels) off the grid and still be placed
ORIENTATION_TOL = 1e-3


@dataclass
class ReadSegment:
    """One segment of a SEG on the target grid. ``mask_kji``: bool for BINARY, float32 probabilities (0..1)
    for FRACTIONAL. ``terminology``: Slicer's TerminologyEntry tag for its category, type and region."""

    number: int
    label: str
    mask_kji: np.ndarray
    color_rgb: tuple[float, float, float] | None
    category: Code3 | None
    type: Code3 | None
    terminology: str


def _open(path: Path) -> Dataset:
    if not path.is_file():
        raise FileNotFoundError(f"DICOM-SEG file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seg = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise ValueError(f"{path} is not a readable DICOM-SEG: {exc}") from exc
    except Exception as exc:  # damaged files raise EOFError, struct.error, ...
        raise ValueError(f"{path} is not a readable DICOM-SEG ({type(exc).__name__}: {exc})") from exc
    if seg.get("SOPClassUID") != SEG_SOP_CLASS_UID:
        raise ValueError(f"{path.name} is not a DICOM-SEG (SOPClassUID {seg.get('SOPClassUID')})")
    return seg


def _referenced(seg: Dataset) -> tuple[set[str], set[str]]:
    """The series and instance UIDs the SEG says it was derived from."""
    series, instances = set(), set()
    for item in seg.get("ReferencedSeriesSequence", []):
        series.add(str(item.get("SeriesInstanceUID", "")))
        for instance in item.get("ReferencedInstanceSequence", []):
            instances.add(str(instance.get("ReferencedSOPInstanceUID", "")))
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        instances.update(_frame_sources(frame))
    return series - {""}, instances - {""}


def _frame_sources(frame: Dataset) -> list[str]:
    return [
        str(source.get("ReferencedSOPInstanceUID", ""))
        for derivation in frame.get("DerivationImageSequence", [])
        for source in derivation.get("SourceImageSequence", [])
    ]


def check_seg_matches_series(seg: Dataset, datasets: Sequence[Dataset], name: str = "the DICOM-SEG") -> None:
    """Refuse a SEG that is not a segmentation of the series `datasets` (naming both series UIDs)."""
    source_series = str(datasets[0].get("SeriesInstanceUID", ""))
    series, instances = _referenced(seg)
    if series and source_series not in series:
        raise ValueError(
            f"{name} references series {', '.join(sorted(series))}, not the source series {source_series}"
        )
    source_for = str(datasets[0].get("FrameOfReferenceUID", "") or "")
    seg_for = str(seg.get("FrameOfReferenceUID", "") or "")
    if source_for and seg_for and seg_for != source_for:
        raise ValueError(
            f"{name} has a different FrameOfReferenceUID ({seg_for}) than the source series ({source_for})"
        )
    if instances and not instances.intersection(str(ds.SOPInstanceUID) for ds in datasets):
        raise ValueError(f"{name} does not reference any instance of the source series {source_series}")


def _functional(frame: Dataset, shared: Dataset, sequence: str) -> Dataset | None:
    for groups in (frame, shared):
        items = groups.get(sequence) if groups is not None else None
        if items:
            return items[0]
    return None


def _frames(seg: Dataset) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pixels = np.asarray(seg.pixel_array)
        except Exception as exc:  # pydicom's decoders raise many kinds of error on damaged data
            reason = f"{type(exc).__name__}: {exc}"
            raise ValueError(f"the DICOM-SEG's pixel data cannot be decoded ({reason})") from exc
    return pixels.reshape(int(seg.get("NumberOfFrames") or 1), int(seg.Rows), int(seg.Columns))


def _terminology(item: Dataset) -> tuple[Code3 | None, Code3 | None, str]:
    """Category, type and Slicer's TerminologyEntry tag
    (``context~SCHEME^value^meaning~type~modifier~region context~region~region modifier``)."""

    def code(seq_name: str, holder: Dataset = item) -> Code3 | None:
        seq = holder.get(seq_name)
        if not seq:
            return None
        c = seq[0]
        value = str(c.get("CodeValue") or c.get("LongCodeValue") or c.get("URNCodeValue") or "")
        return (value, str(c.get("CodingSchemeDesignator", "")), str(c.get("CodeMeaning", "")))

    def tag(c: Code3 | None) -> str:
        return f"{c[1]}^{c[0]}^{c[2]}" if c else "^^"

    category = code("SegmentedPropertyCategoryCodeSequence")
    kind = code("SegmentedPropertyTypeCodeSequence")
    type_items = item.get("SegmentedPropertyTypeCodeSequence") or [Dataset()]
    modifier = code("SegmentedPropertyTypeModifierCodeSequence", type_items[0])
    region = code("AnatomicRegionSequence")
    region_items = item.get("AnatomicRegionSequence") or [Dataset()]
    region_modifier = code("AnatomicRegionModifierSequence", region_items[0])
    entry = "~".join([
        "Segmentation category and type - DICOM master list", tag(category), tag(kind), tag(modifier),
        "Anatomic codes - DICOM master list", tag(region), tag(region_modifier),
    ])  # fmt: skip
    return category, kind, entry


def _color(item: Dataset) -> tuple[float, float, float] | None:
    value = item.get("RecommendedDisplayCIELabValue")
    if value is None or len(value) != 3:
        return None
    try:
        rgb = hd.color.CIELabColor.from_dicom_value([int(v) for v in value]).to_rgb(clip=True)
    except (ValueError, TypeError):
        return None
    return tuple(round(c / 255.0, 4) for c in rgb)


def read_seg_segments(
    path: str | os.PathLike,
    shape_kji: Sequence[int],
    ijk_to_lps: np.ndarray,
    source_datasets: Sequence[Dataset] | None = None,
) -> list[ReadSegment]:
    """Every segment of the SEG at `path` on the grid (KJI `shape_kji`, `ijk_to_lps`). With
    `source_datasets` (sorted), the SEG must belong to that series, and frames without a position are
    placed by their source instance. Raises ValueError for a SEG of another series or grid."""
    path = Path(path)
    seg = _open(path)
    if source_datasets is not None:
        check_seg_matches_series(seg, source_datasets, path.name)
    shape = tuple(int(v) for v in shape_kji)
    if (int(seg.Rows), int(seg.Columns)) != shape[1:]:
        raise ValueError(
            f"{path.name}: frames are {seg.Rows}x{seg.Columns}, the volume's slices {shape[1]}x{shape[2]}"
        )
    fractional = seg.get("SegmentationType") == "FRACTIONAL"
    scale = float(seg.get("MaximumFractionalValue") or 255) if fractional else 1.0
    segments = {int(item.SegmentNumber): item for item in seg.get("SegmentSequence", [])}
    masks = {n: np.zeros(shape, dtype=np.float32 if fractional else np.bool_) for n in segments}
    shared = (seg.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    inverse = np.linalg.inv(np.asarray(ijk_to_lps, dtype=np.float64))
    axes = np.asarray(ijk_to_lps, dtype=np.float64)[:3, :2]
    expected_iop = np.concatenate([axes[:, n] / np.linalg.norm(axes[:, n]) for n in (0, 1)])
    by_uid = {str(ds.SOPInstanceUID): k for k, ds in enumerate(source_datasets or [])}
    pixels = _frames(seg)
    frames = seg.get("PerFrameFunctionalGroupsSequence") or []
    if len(frames) != len(pixels):
        raise ValueError(f"{path.name}: {len(pixels)} frames but {len(frames)} per-frame descriptions")
    for n, frame in enumerate(frames):
        ident = _functional(frame, shared, "SegmentIdentificationSequence")
        number = int(ident.ReferencedSegmentNumber) if ident is not None else 1
        if number not in masks:
            raise ValueError(f"{path.name}: frame {n + 1} belongs to segment {number}, not described")
        orientation = _functional(frame, shared, "PlaneOrientationSequence")
        if orientation is not None and not np.allclose(
            [float(v) for v in orientation.ImageOrientationPatient], expected_iop, atol=ORIENTATION_TOL
        ):
            raise ValueError(f"{path.name}: frame {n + 1} is not oriented like the volume's slices")
        k = _slice_index(frame, shared, inverse, shape, by_uid, path.name, n)
        plane = pixels[n].astype(np.float32) / scale if fractional else pixels[n] != 0
        masks[number][k] = np.maximum(masks[number][k], plane) if fractional else masks[number][k] | plane
    labels = _segment_labels(seg)
    result = []
    for number, item in segments.items():
        category, kind, entry = _terminology(item)
        result.append(ReadSegment(number, labels[number], masks[number], _color(item), category, kind, entry))
    return result


def _slice_index(frame, shared, inverse, shape, by_uid, name: str, n: int) -> int:
    """The slice a frame lies on: by its position (exact to POSITION_TOL_VOXELS), else by its source image."""
    position = _functional(frame, shared, "PlanePositionSequence")
    if position is not None and "ImagePositionPatient" in position:
        ijk = inverse @ np.asarray([*(float(v) for v in position.ImagePositionPatient), 1.0])
        k = int(round(ijk[2]))
        if np.max(np.abs(ijk[:2])) > POSITION_TOL_VOXELS or abs(ijk[2] - k) > POSITION_TOL_VOXELS:
            raise ValueError(f"{name}: frame {n + 1} does not lie on a slice of the volume's grid")
        if not 0 <= k < shape[0]:
            raise ValueError(f"{name}: frame {n + 1} lies outside the volume (slice {k} of {shape[0]})")
        return k
    for uid in _frame_sources(frame):
        if uid in by_uid:
            return by_uid[uid]
    raise ValueError(f"{name}: frame {n + 1} has neither a position nor a source image of the series")


def read_dicom_seg(
    path: str | os.PathLike, source_datasets: Sequence[Dataset], *, threshold: float = 0.5
) -> dict[str, np.ndarray]:
    """Read a DICOM-SEG back onto the KJI grid of ``source_datasets`` (sorted as for writing).

    Returns ``{segment label: bool mask}``; FRACTIONAL segments are thresholded at ``threshold``. A repeated
    label gets its segment number appended. Raises ValueError when the SEG is not a segmentation of this
    series (other series or frame of reference, or none of the series' instances referenced).
    """
    datasets = list(source_datasets)
    shape = (len(datasets), int(datasets[0].Rows), int(datasets[0].Columns))
    segments = read_seg_segments(path, shape, series_affine(datasets), datasets)
    return {
        s.label: (s.mask_kji >= threshold if s.mask_kji.dtype.kind == "f" else s.mask_kji) for s in segments
    }


def read_dicom_seg_provenance(path: str | os.PathLike) -> dict[str, Provenance]:
    """The provenance of each segment of a DICOM-SEG written by our writer, keyed by segment label as
    :func:`read_dicom_seg` keys the masks; prompts are converted back to RAS. Segments without SAM-Med2D
    provenance are left out; ``Provenance.truncated`` says when the file had to shorten a list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DICOM-SEG file not found: {path}")
    try:
        seg = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as exc:
        raise ValueError(f"{path} is not a readable DICOM-SEG: {exc}") from exc
    if seg.get("SOPClassUID") != SEG_SOP_CLASS_UID:
        raise ValueError(f"{path} is not a DICOM-SEG")
    labels = _segment_labels(seg)
    result = {}
    for item in seg.get("SegmentSequence", []):
        algorithms = item.get("SegmentationAlgorithmIdentificationSequence") or [Dataset()]
        params = parse_algorithm_parameters(algorithms[0].get("AlgorithmParameters", ""))
        provenance = Provenance.from_algorithm_parameters(params)
        if provenance is not None:
            result[labels[int(item.SegmentNumber)]] = provenance
    return result


def read_seg_labels(path: str | os.PathLike) -> list[str]:
    """The segment names a DICOM-SEG's import gives (as `read_seg_segments` labels them), from its header
    only: what `convert` replaces when it updates an existing .seg.nrrd."""
    seg = pydicom.dcmread(Path(path), stop_before_pixels=True)
    return list(_segment_labels(seg).values())


def _segment_labels(seg: Dataset) -> dict[int, str]:
    """Segment number → label: the full label kept in AlgorithmParameters when SegmentLabel had to be cut,
    else SegmentLabel; a repeated label gets its segment number appended."""
    labels: dict[int, str] = {}
    for item in seg.get("SegmentSequence", []):
        number = int(item.SegmentNumber)
        algorithms = item.get("SegmentationAlgorithmIdentificationSequence") or [Dataset()]
        params = parse_algorithm_parameters(algorithms[0].get("AlgorithmParameters", ""))
        label = params.get("label") or str(item.get("SegmentLabel", "")) or f"Segment {number}"
        labels[number] = f"{label} [{number}]" if label in labels.values() else label
    return labels

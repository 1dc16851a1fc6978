"""DICOM-SEG writing (pure layer: numpy + pydicom + highdicom; no Slicer, no VTK). Reading is seg_read.py.

Mask convention ("KJI"): a mask is a numpy array indexed ``[k, j, i]`` on the source series' own voxel grid:

* ``k`` follows the source datasets as sorted by series.py's :func:`read_series_datasets` /
  :func:`sort_series_datasets`: ascending position along the slice normal ``row_cosines x column_cosines``
  (for an axial LPS series with ImageOrientationPatient ``[1,0,0, 0,1,0]`` this is ascending z, inferior to
  superior);
* ``j`` is the row and ``i`` the column of the DICOM pixel array.

So ``mask_kji[k]`` lies exactly on ``source_datasets[k].pixel_array``. :func:`series_affine` gives the
matching 4x4 matrix from ``(i, j, k, 1)`` to LPS millimetres; callers that resample from another grid
(Slicer's RAS labelmaps) can pass it as ``mask_affine`` so a geometry mismatch is refused, not written.

What the SEG takes from the source headers is checked by rule in headers.py (repaired, left out, written
empty, or refused naming the attribute; a missing FrameOfReferenceUID is derived). Geometry is validated by
series.py. Any error highdicom or pydicom still raises becomes one ValueError line.

Writes are atomic: the file is written to a temporary name in the destination folder and moved into place
with :func:`os.replace`; on any failure nothing is left behind.

Provenance (:class:`Provenance`, built by :func:`build_provenance`): model, checkpoint SHA-256, axis,
propagation, prompts, window and per-slice confidence of a segment. The .seg.nrrd header keeps it complete
in RAS (:meth:`Provenance.to_metadata`); the SEG keeps what its value representations allow:
SeriesDescription (LO, 64) names the model and the hash's first 12 hex digits, ContentDescription (LO, 64)
summarises the run, and each segment's AlgorithmParameters (LT, 10240) holds the full hash and the prompts
in LPS (the DICOM patient frame) with the per-slice list; what does not fit is cut from the end (slices
first) and a ``truncated`` entry says how much was kept. :func:`read_dicom_seg_provenance` reads it back.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ... import __version__
from ...choices import SEGMENT_COLORS
from ...engine.masks import extent
from ...files import atomic_path
from ..provenance import (
    MAX_LT_LENGTH,
    TRUNCATED,
    Provenance,
    format_algorithm_parameters,
    parameters_length,
)
from .headers import DERIVED_FOR_NOTE, source_headers
from .series import (
    _DUPLICATES,
    _check_regular_steps,
    _validate_stack,
    series_affine,
)

log = logging.getLogger(__name__)

Code3 = tuple[str, str, str]
"""A coded concept as ``(code value, coding scheme designator, code meaning)``, e.g. ``("10200004", "SCT",
"Liver")``."""

DEFAULT_CATEGORY: Code3 = ("91723000", "SCT", "Anatomical Structure")
DEFAULT_TYPE: Code3 = ("85756007", "SCT", "Tissue")
MAX_LABEL_LENGTH = 64  # SegmentLabel is LO
AFFINE_TOL_MM = 1e-3

# Used when a segment has no colour (RGB 0..1).
DEFAULT_COLORS = SEGMENT_COLORS


@dataclass(frozen=True)
class MaskBlock:
    """A segment's voxels cropped to their extent: ``array`` lies at ``offset_kji`` of the series grid."""

    offset_kji: tuple[int, int, int]
    array: np.ndarray


MaskSource = np.ndarray | MaskBlock | Callable[[], "np.ndarray | MaskBlock"]
"""A mask, or a callable that makes it when the writer reaches its segment: with callables, a writer of many
segments holds one of them at a time (a TotalSegmentator-sized export held 117 whole-volume masks, 10 GB)."""


@dataclass
class SegmentSpec:
    """One segment to export.

    ``mask_kji``: bool (or 0/1 integer) array for BINARY, float probabilities in [0, 1] for FRACTIONAL; shape
    ``(slices, rows, columns)`` of the source series in the KJI convention of this module. It may also be a
    :class:`MaskBlock` (the mask cropped, placed at an offset) or a callable returning either, called when the
    segment is written (and, for overlapping or fractional segments, once more).
    ``color_rgb``: display colour, components in 0..1; None picks a default.
    ``category`` / ``type``: ``(code value, scheme, meaning)`` from Slicer's terminology; None gives SCT
    91723000 "Anatomical Structure" / SCT 85756007 "Tissue".
    ``provenance``: how the segment was made (prompts, per-slice confidence); written, in LPS, into its
    AlgorithmParameters. None writes only the checkpoint hash given to :func:`write_dicom_seg`.
    """

    label: str
    mask_kji: MaskSource
    color_rgb: tuple[float, float, float] | None = None
    category: Code3 | None = None
    type: Code3 | None = None
    provenance: Provenance | None = None


# ------------------------------------------------------------------------------------------- provenance
#
# One segment's provenance (model, checkpoint hash, prompts, per-slice confidence, window) is kept in two
# places: complete in the .seg.nrrd header (RAS, the frame Slicer works in) and, as far as the DICOM value
# representations allow, in the DICOM-SEG (LPS, the patient frame DICOM uses). The record below is the one
# shape both are written from and read back into, so a case can be reviewed and re-run from either file.


def write_dicom_seg(
    source_datasets: Sequence[Dataset],
    segments: Sequence[SegmentSpec],
    out_path: str | os.PathLike,
    *,
    model_hash: str | None,
    algorithm_name: str = "SAM-Med2D",
    algorithm_version: str = __version__,
    fractional: bool = False,
    series_description: str | None = None,
    content_label: str = "SAMMED2D",
    content_description: str | None = None,
    series_number: int | None = None,
    mask_affine: np.ndarray | None = None,
) -> Path:
    """Write ``segments`` as one DICOM-SEG instance referencing ``source_datasets``; return the written path.

    ``source_datasets`` must be sorted as :func:`sort_series_datasets` does (the masks' k order). BINARY by
    default, FRACTIONAL (probability, 8 bit) with ``fractional=True``. Frames empty for a segment are omitted.
    Algorithm type is SEMIAUTOMATIC with ``algorithm_name``/``algorithm_version``; ``model_hash`` (the
    checkpoint's SHA-256) goes into AlgorithmParameters, and a segment's ``provenance`` (prompts in LPS,
    per-slice confidence, window) goes there too (LT, up to 10240 characters; what does not fit is cut
    with a ``truncated`` entry saying what was kept). By default SeriesDescription names the algorithm and the
    hash's first 12 hex digits, and ContentDescription summarises the provenance (both LO, 64 characters;
    longer text ends in "..."). Study, patient and frame of reference come from the source; series and SOP
    instance UIDs are new. ``mask_affine`` (optional, ijk -> LPS of the masks) is compared with
    :func:`series_affine` of the source.
    """
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {out_path.parent}")
    if out_path.is_dir():
        raise IsADirectoryError(f"output path is a folder, expected a file name: {out_path}")

    datasets = list(source_datasets)
    if not datasets:
        raise ValueError("no source datasets given")
    positions = _validate_stack(datasets)
    steps = np.diff(positions)
    if np.any(np.abs(steps) <= 1e-6):
        raise ValueError(_DUPLICATES)
    if np.any(steps < 0):
        raise ValueError("source datasets are not sorted along the slice normal; use sort_series_datasets()")
    _check_regular_steps(datasets)
    if mask_affine is not None:
        expected = series_affine(datasets)
        if np.shape(mask_affine) != (4, 4) or not np.allclose(mask_affine, expected, atol=AFFINE_TOL_MM):
            raise ValueError(
                "the segmentation's geometry does not match the source series "
                f"(mask ijk->LPS\n{np.asarray(mask_affine)}\nseries ijk->LPS\n{expected})"
            )

    shape = (len(datasets), int(datasets[0].Rows), int(datasets[0].Columns))
    pixel_array = _stack_masks(segments, shape, fractional)

    measures = _pixel_measures(datasets)
    headers, derived_frame = source_headers(datasets, float(measures[0].SliceThickness))
    descriptions = [_description(spec, number, model_hash, algorithm_name, algorithm_version)
                    for number, spec in enumerate(segments, start=1)]  # fmt: skip
    if series_description is None:
        series_description = (
            f"{algorithm_name} segmentation, checkpoint {str(model_hash)[:12]}" if model_hash
            else f"Segmentation by {algorithm_name}"
        )  # fmt: skip
    if content_description is None:
        content_description = _default_content_description(segments)
    if derived_frame:  # the note matters more than the summary, which AlgorithmParameters keeps anyway
        content_description = DERIVED_FOR_NOTE
    try:
        seg = _segmentation(
            headers,
            pixel_array,
            fractional,
            descriptions,
            measures,
            series_number,
            content_label,
            content_description,
            series_description,
        )
        _atomic_save(seg, out_path)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        # highdicom and pydicom check what they write; whatever slipped past the rules is one line here.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"cannot write the DICOM-SEG ({type(exc).__name__}: {first})") from exc
    return out_path


def _description(
    spec: SegmentSpec, number: int, model_hash: str | None, algorithm_name: str, algorithm_version: str
) -> hd.seg.SegmentDescription:
    """A segment made by SAM-Med2D (it has provenance, or a checkpoint hash is given) is SEMIAUTOMATIC with
    its parameters; one from elsewhere (``convert`` of a .seg.nrrd without provenance) is MANUAL: we cannot
    say what made it."""
    made = spec.provenance is not None or bool(model_hash)
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=_clean_label(spec.label, number),
        segmented_property_category=_coded(spec.category or DEFAULT_CATEGORY),
        segmented_property_type=_coded(spec.type or DEFAULT_TYPE),
        algorithm_type=_ALGORITHM_TYPES[made],
        algorithm_identification=(
            _algorithm(spec, model_hash or "", algorithm_name, algorithm_version) if made else None
        ),
        display_color=_color(spec.color_rgb, number),
    )


_ALGORITHM_TYPES = {
    True: hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
    False: hd.seg.SegmentAlgorithmTypeValues.MANUAL,
}


def _segmentation(
    headers: list[Dataset], pixel_array: np.ndarray, fractional: bool, descriptions: list,
    measures: hd.PixelMeasuresSequence, series_number: int | None, content_label: str,
    content_description: str | None, series_description: str,
) -> hd.seg.Segmentation:  # fmt: skip
    """highdicom's Segmentation from the rule-checked headers (nothing else of the source)."""
    return hd.seg.Segmentation(
        source_images=headers,
        pixel_array=pixel_array,
        segmentation_type=(
            hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY
        ),
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number if series_number is not None else _default_series_number(headers[0]),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="SAMMed2D",
        manufacturer_model_name="SAMMed2D 3D Slicer extension",
        software_versions=f"sammed2d-slicer {__version__}",
        device_serial_number="0",
        content_label=_content_label(content_label),
        content_description=_lo_marked(content_description) if content_description else None,
        series_description=_lo_marked(series_description),
        pixel_measures=measures,
        omit_empty_frames=True,
    )


def _stack_masks(
    segments: Sequence[SegmentSpec], shape: tuple[int, int, int], fractional: bool
) -> np.ndarray:
    """The pixel array for highdicom, built one segment at a time.

    Non-overlapping binary segments become one label map (``uint8``/``uint16``, 0 = background): each mask is
    made (when it is a callable), cropped to its extent, pasted and dropped, so memory is the label map plus
    one mask, whatever the number of segments; highdicom then checks the map with a single ``max``. Only
    overlapping or fractional segments need the ``(slices, rows, columns, segments)`` stack, which grows with
    their number (a SEG cannot hold overlaps in a label map).
    """
    if not segments:
        raise ValueError("the segmentation has no segments; nothing to export")
    labelmap = None if fractional else np.zeros(shape, dtype=np.uint8 if len(segments) < 256 else np.uint16)
    filled = False
    for number, spec in enumerate(segments, start=1):
        block = _cropped_block(spec, shape, fractional)
        if block is None:
            log.warning("segment %r is empty; it is described but has no frames", spec.label)
            continue
        filled = True
        if labelmap is None:
            continue
        box, mask = block
        region = labelmap[box]
        if np.any(region[mask]):
            labelmap = None  # overlap: fall back to the 4D stack (the masks are made again below)
            continue
        region[mask] = number
    if not filled:
        raise ValueError("the segmentation is empty (all segments are empty); nothing to export")
    if labelmap is not None:
        return labelmap
    stacked = np.zeros((*shape, len(segments)), dtype=np.float32 if fractional else np.bool_)
    for n, spec in enumerate(segments):
        block = _cropped_block(spec, shape, fractional)
        if block is not None:
            box, mask = block
            stacked[(*box, n)] = mask
    return stacked


def _cropped_block(
    spec: SegmentSpec, shape: tuple[int, int, int], fractional: bool
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """One segment's checked mask cropped to its extent, as (box on the series grid, values), or None when
    it is empty."""
    source = spec.mask_kji() if callable(spec.mask_kji) else spec.mask_kji
    cropped = isinstance(source, MaskBlock)
    where = tuple(int(o) for o in source.offset_kji) if cropped else (0, 0, 0)
    mask = _checked_mask(spec, np.asarray(source.array if cropped else source), fractional)
    fits = mask.ndim == 3 and len(where) == 3 and all(
        o >= 0 and o + n <= s for o, n, s in zip(where, mask.shape, shape, strict=True)
    )  # fmt: skip
    if not (fits if cropped else mask.shape == shape):
        at = f" at {where}" if cropped else ""
        raise ValueError(
            f"segment {spec.label!r}: mask shape {mask.shape}{at} does not match the source series "
            f"(slices, rows, columns) = {shape}; the segmentation's geometry does not match the series"
        )
    inner = extent(mask)
    if inner is None:
        return None
    box = tuple(slice(o + part.start, o + part.stop) for o, part in zip(where, inner, strict=True))
    return box, mask[inner].copy()  # a copy: a view would keep the whole mask alive until the next one


def _checked_mask(spec: SegmentSpec, mask: np.ndarray, fractional: bool) -> np.ndarray:
    if mask.dtype.kind not in "biuf":
        raise ValueError(f"segment {spec.label!r}: unsupported mask dtype {mask.dtype}")
    if fractional:
        values = mask.astype(np.float32, copy=False)
        if not np.all(np.isfinite(values)) or (values.size and (values.min() < 0 or values.max() > 1)):
            raise ValueError(f"segment {spec.label!r}: probabilities must be finite and in [0, 1]")
        return values
    if mask.dtype.kind == "f":
        raise ValueError(
            f"segment {spec.label!r}: a BINARY export needs a boolean mask "
            "(pass fractional=True to export probabilities)"
        )
    return mask if mask.dtype == np.bool_ else mask != 0


def _pixel_measures(datasets: Sequence[Dataset]) -> hd.PixelMeasuresSequence:
    """Pixel measures from the series, with SliceThickness falling back to the slice spacing when the source
    lacks it (it is Type 1 in a SEG's Pixel Measures)."""
    first = datasets[0]
    spacing = float(np.linalg.norm(series_affine(datasets)[:3, 2]))
    try:
        thickness = float(first.get("SliceThickness"))
    except (TypeError, ValueError):
        thickness = 0.0
    if not np.isfinite(thickness) or thickness <= 0:
        thickness = spacing
    return hd.PixelMeasuresSequence(
        pixel_spacing=[float(v) for v in first.PixelSpacing],
        slice_thickness=thickness,
        spacing_between_slices=spacing if len(datasets) > 1 else None,
    )


def _default_series_number(ds: Dataset) -> int:
    try:
        return int(ds.get("SeriesNumber")) + 1000
    except (TypeError, ValueError):
        return 1000


def _lo(text: str) -> str:
    """A valid LO value: no backslash or control characters, at most 64 characters."""
    return _lo_characters(text)[:MAX_LABEL_LENGTH]


def _lo_characters(text: str) -> str:
    return re.sub(r"[\\\x00-\x1f\x7f]", " ", str(text)).strip()


def _lo_marked(text: str) -> str:
    """Like :func:`_lo`, but a value longer than 64 characters ends in "..." so the cut shows."""
    cleaned = _lo_characters(text)
    if len(cleaned) <= MAX_LABEL_LENGTH:
        return cleaned
    log.warning("%r is longer than %d characters; written shortened", cleaned, MAX_LABEL_LENGTH)
    return cleaned[: MAX_LABEL_LENGTH - len(TRUNCATED)].rstrip() + TRUNCATED


def _clean_label(label: str, number: int) -> str:
    """SegmentLabel (LO): sanitised; a longer label is cut and marked, its full text kept in the segment's
    AlgorithmParameters (``label``)."""
    cleaned = _lo_marked(label)
    return cleaned.rstrip() or f"Segment {number}"


def _algorithm(
    spec: SegmentSpec, model_hash: str, algorithm_name: str, algorithm_version: str
) -> hd.AlgorithmIdentificationSequence:
    """Algorithm identification of one segment: its own provenance when it has one, else the hash."""
    params = _parameters(spec, model_hash)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(algorithm_name),
        family=codes.cid7162.ArtificialIntelligence,
        version=_lo(algorithm_version),
        source="SAMMed2D 3D Slicer extension",
    )
    algorithm[0].AlgorithmParameters = format_algorithm_parameters(params)
    return algorithm


def _parameters(spec: SegmentSpec, model_hash: str) -> dict[str, str]:
    """AlgorithmParameters of one segment; a label that SegmentLabel had to cut or clean is kept whole."""
    label = {"label": str(spec.label)} if _lo(spec.label) != str(spec.label) else {}
    reserve = parameters_length(label) + 1 if label else 0
    if reserve > MAX_LT_LENGTH // 2:
        raise ValueError(f"segment label of {len(str(spec.label))} characters is too long to keep")
    if spec.provenance is not None:
        params = spec.provenance.to_algorithm_parameters(MAX_LT_LENGTH - reserve)
    elif not model_hash:
        params = {}
    else:
        params = {"checkpoint_sha256": str(model_hash)}
    return {**params, **label}


def _default_content_description(segments: Sequence[SegmentSpec]) -> str | None:
    made = [spec for spec in segments if spec.provenance is not None]
    if not made:
        return None
    if len(made) == 1:
        summary = made[0].provenance.summary()
        if "truncated" not in _parameters(made[0], ""):
            return summary
        suffix = "; parameters truncated"  # must survive the 64-character limit: shorten the summary instead
        room = MAX_LABEL_LENGTH - len(suffix)
        return (summary if len(summary) <= room else summary[: room - len(TRUNCATED)] + TRUNCATED) + suffix
    return f"{len(made)} segments by SAM-Med2D; prompts (LPS) in AlgorithmParameters"


def _content_label(label: str) -> str:
    """ContentLabel is CS: upper case, digits, space and underscore, at most 16 characters."""
    cleaned = re.sub(r"[^A-Z0-9_ ]", "_", str(label).upper()).strip()[:16]
    return cleaned or "SAMMED2D"


def _coded(code: Code3) -> hd.sr.CodedConcept:
    value, scheme, meaning = (str(part).strip() for part in code)
    if not value or not scheme or not meaning:
        raise ValueError(f"incomplete code {code!r}: need (value, scheme, meaning)")
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning[:MAX_LABEL_LENGTH])


def _color(rgb: tuple[float, float, float] | None, number: int) -> hd.color.CIELabColor:
    if rgb is None:
        rgb = DEFAULT_COLORS[(number - 1) % len(DEFAULT_COLORS)]
    components = np.clip(np.asarray(rgb, dtype=float), 0.0, 1.0) * 255.0
    if components.shape != (3,):
        raise ValueError(f"color_rgb must have 3 components, got {rgb!r}")
    return hd.color.CIELabColor.from_rgb(*(float(c) for c in components))


def _atomic_save(dataset: Dataset, out_path: Path) -> None:
    _declare_character_set(dataset)
    with atomic_path(out_path) as temporary:
        dataset.save_as(temporary, enforce_file_format=True)


def _declare_character_set(dataset: Dataset) -> None:
    """UTF-8 (ISO_IR 192) when any text value needs more than ASCII: a source's ISO_IR 100, or none at all,
    cannot encode every segment label (a Cyrillic, CJK or emoji name would be written as '?')."""

    def texts(ds: Dataset):
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    yield from texts(item)
            elif elem.VR in ("LO", "LT", "SH", "ST", "UT", "UC", "PN") and elem.value is not None:
                values = elem.value if elem.VM > 1 else [elem.value]
                yield from (str(v) for v in values)

    if not all(text.isascii() for text in texts(dataset)):
        dataset.SpecificCharacterSet = "ISO_IR 192"
    elif "SpecificCharacterSet" in dataset:
        del dataset.SpecificCharacterSet  # plain ASCII: the default repertoire


def parse_slicer_terminology(entry: str) -> tuple[Code3 | None, Code3 | None]:
    """Category and type from a Slicer ``TerminologyEntry`` tag.

    Slicer stores ``context~SCHEME^value^meaning~SCHEME^value^meaning~modifier~...``; returns
    ``(category, type)`` as ``(value, scheme, meaning)`` tuples, None where a part is missing.
    """
    parts = (entry or "").split("~")

    def code(index: int) -> Code3 | None:
        if len(parts) <= index:
            return None
        fields = parts[index].split("^")
        if len(fields) < 3 or not all(f.strip() for f in fields[:3]):
            return None
        scheme, value, meaning = (f.strip() for f in fields[:3])
        return (value, scheme, meaning)

    return code(1), code(2)

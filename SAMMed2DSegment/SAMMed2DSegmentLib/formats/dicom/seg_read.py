"""Reading a DICOM-SEG back onto its source series (pure layer: numpy + pydicom + highdicom)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ..provenance import Provenance, parse_algorithm_parameters
from .series import SEG_SOP_CLASS_UID


def read_dicom_seg(
    path: str | os.PathLike, source_datasets: Sequence[Dataset], *, threshold: float = 0.5
) -> dict[str, np.ndarray]:
    """Read a DICOM-SEG back onto the KJI grid of ``source_datasets`` (sorted as for writing).

    Returns ``{segment label: bool mask}``; FRACTIONAL segments are thresholded at ``threshold``. A repeated
    label gets its segment number appended. Raises ValueError when the SEG is not a segmentation of this
    series (other frame of reference, or none of the series' instances referenced).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DICOM-SEG file not found: {path}")
    datasets = list(source_datasets)
    try:
        seg = hd.seg.segread(path)
    except (InvalidDicomError, AttributeError, KeyError) as exc:
        raise ValueError(f"{path} is not a readable DICOM-SEG: {exc}") from exc
    if str(seg.get("FrameOfReferenceUID")) != str(datasets[0].get("FrameOfReferenceUID")):
        raise ValueError("the DICOM-SEG has a different FrameOfReferenceUID than the source series")
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    referenced = {uid for _study, _series, uid in seg.get_source_image_uids()}
    if not referenced.intersection(uids):
        raise ValueError("the DICOM-SEG does not reference any instance of the source series")
    numbers = list(seg.get_segment_numbers())
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=numbers,
        assert_missing_frames_are_empty=True,
        rescale_fractional=True,
        dtype=np.float32 if seg.SegmentationType == "FRACTIONAL" else np.uint8,
    )
    labels = _segment_labels(seg)
    result: dict[str, np.ndarray] = {}
    for index, number in enumerate(numbers):
        plane = pixels[..., index]
        result[labels[number]] = plane >= threshold if plane.dtype.kind == "f" else plane != 0
    return result


def read_dicom_seg_provenance(path: str | os.PathLike) -> dict[str, Provenance]:
    """The provenance of each segment of a DICOM-SEG written by :func:`write_dicom_seg`, keyed by segment
    label as :func:`read_dicom_seg` keys the masks; prompts are converted back to RAS. Segments without
    SAM-Med2D provenance are left out; ``Provenance.truncated`` says when the file had to shorten a list."""
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


def _segment_labels(seg: Dataset) -> dict[int, str]:
    """Segment number → label: the full label kept in AlgorithmParameters when SegmentLabel had to be cut,
    else SegmentLabel; a repeated label gets its segment number appended."""
    labels: dict[int, str] = {}
    for item in seg.get("SegmentSequence", []):
        number = int(item.SegmentNumber)
        algorithms = item.get("SegmentationAlgorithmIdentificationSequence") or [Dataset()]
        params = parse_algorithm_parameters(algorithms[0].get("AlgorithmParameters", ""))
        label = params.get("label") or str(item.get("SegmentLabel", ""))
        labels[number] = f"{label} [{number}]" if label in labels.values() else label
    return labels

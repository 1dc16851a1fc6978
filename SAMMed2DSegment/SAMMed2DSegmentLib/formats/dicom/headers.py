"""The attributes a DICOM-SEG takes from its source series, checked before highdicom sees them."""

from __future__ import annotations

import copy
import logging

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, TM

log = logging.getLogger(__name__)


def sanitized_header(ds: Dataset, measures: hd.PixelMeasuresSequence) -> Dataset:
    """A copy of ``ds`` whose optional patient/study attributes highdicom copies are present and valid, and
    whose SliceThickness (which highdicom copies into the SEG, where it is Type 1) is set."""
    header = Dataset()
    for elem in ds:
        if elem.keyword != "PixelData":
            header.add(copy.deepcopy(elem))
    if hasattr(ds, "file_meta"):
        header.file_meta = copy.deepcopy(ds.file_meta)
    for keyword in (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
    ):
        value = header.get(keyword)
        if value is None or value == "":
            _set(header, keyword, None)
            continue
        try:
            if keyword in ("PatientBirthDate", "StudyDate"):
                DA(str(value))
            elif keyword == "StudyTime":
                TM(str(value))
            elif keyword == "PatientSex":
                sex = str(value).strip().upper()[:1]
                if sex not in ("M", "F", "O"):
                    raise ValueError(value)
                _set(header, keyword, sex)
            elif keyword in ("AccessionNumber", "StudyID") and len(str(value)) > 16:
                raise ValueError(value)
        except (ValueError, TypeError):
            log.warning("source %s %r is malformed; written empty", keyword, value)
            _set(header, keyword, None)
    _set(header, "SliceThickness", measures[0].SliceThickness)
    if not header.get("Modality"):
        _set(header, "Modality", "OT")
    return header


def _set(ds: Dataset, keyword: str, value) -> None:
    if keyword in ds:
        del ds[keyword]
    setattr(ds, keyword, value)

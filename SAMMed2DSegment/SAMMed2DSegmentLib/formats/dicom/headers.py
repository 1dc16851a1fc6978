"""The attributes a DICOM-SEG takes from its source series, checked by rule before highdicom sees them.

Real headers come from scanners, PACS exports and anonymisers with empty character sets, one-component
names, dates in ACR-NEMA form, values of the wrong VR or over-long. Rather than guarding case by case, every
attribute the SEG takes from the source is listed in :data:`RULES` with its type (1, 2 or 3 as in the SEG's
modules), its VR and a check. :func:`source_headers` builds fresh, minimal datasets from those rules only
(nothing else of the source reaches highdicom):

* a value that passes its check is copied (re-encoded as text, so a wrong VR in the source does not matter);
* a value the standard lets us repair is repaired (``Male`` -> ``M``, ``2022-12-08`` -> ``20221208``,
  ``12:30:00`` -> ``123000``, SliceThickness from the slice spacing);
* otherwise type 3 is omitted, type 2 written empty (with a warning), and type 1 raises ValueError naming the
  attribute - except FrameOfReferenceUID, which anonymisers often strip: it is derived from the series' own
  UIDs (:func:`derived_frame_of_reference`), the same series always giving the same UID.

Text is kept as Unicode; the writer declares ``ISO_IR 192`` (UTF-8) when any text needs it.
"""

from __future__ import annotations

import datetime
import logging
import re
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID

log = logging.getLogger(__name__)

#: ContentDescription of a SEG whose source had no FrameOfReferenceUID (LO, at most 64 characters).
DERIVED_FOR_NOTE = "source had no FrameOfReferenceUID; derived from its UIDs"
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


@dataclass(frozen=True)
class Rule:
    """One attribute the SEG takes from the source: its type in the SEG, VR, and a check returning the value
    to write (possibly repaired) or raising ValueError."""

    keyword: str
    type: str
    vr: str
    check: Callable[[str], str]


def _text(max_length: int) -> Callable[[str], str]:
    def check(value: str) -> str:
        if _CONTROL.search(value):
            raise ValueError("control characters or backslash")
        if len(value) > max_length:
            raise ValueError(f"longer than {max_length} characters")
        return value

    return check


def _uid(value: str) -> str:
    if not UID(value).is_valid:
        raise ValueError("not a valid UID")
    return value


def _sop_class(value: str) -> str:
    if _uid(value) and UID(value).type != "SOP Class":
        raise ValueError("not a known SOP class")
    return value


def _date(value: str) -> str:
    digits = re.sub(r"[.\-/]", "", value) if re.fullmatch(r"\d{4}[.\-/]\d{2}[.\-/]\d{2}", value) else value
    datetime.datetime.strptime(digits, "%Y%m%d")  # raises ValueError for 19700231 and the like
    if not re.fullmatch(r"\d{8}", digits):
        raise ValueError("not YYYYMMDD")
    return digits


def _time(value: str) -> str:
    compact = value.replace(":", "") if re.fullmatch(r"\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?", value) else value
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?", compact)
    if not match or int(match[1]) > 23 or int(match[2] or 0) > 59 or int(match[3] or 0) > 60:
        raise ValueError("not HHMMSS.FFFFFF")
    return compact


def _sex(value: str) -> str:
    sex = {"MALE": "M", "FEMALE": "F", "OTHER": "O"}.get(value.strip().upper(), value.strip().upper())
    if sex not in ("M", "F", "O"):
        raise ValueError("not M, F or O")
    return sex


def _person_name(value: str) -> str:
    groups = value.split("=")
    if len(groups) > 3 or any(g.count("^") > 4 or len(g) > 64 for g in groups):
        raise ValueError("more than 3 groups, 5 components or 64 characters")
    return _text(64 * 3 + 2)(value)


def _integer_string(value: str) -> str:
    number = int(value.strip())
    if not -(2**31) <= number < 2**31:
        raise ValueError("out of range")
    return str(number)


def _decimal_string(value: str) -> str:
    number = float(value.strip())
    if not number == number or abs(number) == float("inf"):  # NaN or infinite
        raise ValueError("not finite")
    text = value.strip()
    return text if len(text) <= 16 else f"{number:.10g}"


def _lossy(value: str) -> str:
    if value.strip() not in ("00", "01"):
        raise ValueError("not 00 or 01")
    return value.strip()


RULES: tuple[Rule, ...] = (
    # Patient module
    Rule("PatientName", "2", "PN", _person_name),
    Rule("PatientID", "2", "LO", _text(64)),
    Rule("IssuerOfPatientID", "3", "LO", _text(64)),
    Rule("PatientBirthDate", "2", "DA", _date),
    Rule("PatientSex", "2", "CS", _sex),
    # General Study module
    Rule("StudyDate", "2", "DA", _date),
    Rule("StudyTime", "2", "TM", _time),
    Rule("ReferringPhysicianName", "2", "PN", _person_name),
    Rule("StudyID", "2", "SH", _text(16)),
    Rule("AccessionNumber", "2", "SH", _text(16)),
    Rule("StudyDescription", "3", "LO", _text(64)),
    # Frame of Reference module (the UID is derived when missing; see source_headers)
    Rule("FrameOfReferenceUID", "1", "UI", _uid),
    Rule("PositionReferenceIndicator", "2", "LO", _text(64)),
    # General Image (lossy compression history is carried over, as the standard asks for derived images)
    Rule("LossyImageCompression", "3", "CS", _lossy),
    # Series number: only used to number the SEG's series (source + 1000)
    Rule("SeriesNumber", "3", "IS", _integer_string),
    Rule("Modality", "3", "CS", _text(16)),
)

#: Per image, for the references and the frame positions (validated in series.py besides).
INSTANCE_RULES: tuple[Rule, ...] = (
    Rule("SOPClassUID", "1", "UI", _sop_class),
    Rule("SOPInstanceUID", "1", "UI", _uid),
    Rule("SeriesInstanceUID", "1", "UI", _uid),
    Rule("StudyInstanceUID", "1", "UI", _uid),
)
_GEOMETRY = ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
#: Every source attribute that can change the SEG (besides these rules, the slice spacing and thickness, and
#: the character set the source's text is decoded with); nothing else of the source is read.
TAKEN = frozenset(
    [r.keyword for r in (*RULES, *INSTANCE_RULES)]
    + [*_GEOMETRY, "SliceThickness", "SpacingBetweenSlices", "SpecificCharacterSet", "NumberOfFrames"]
)


def _raw_text(ds: Dataset, keyword: str) -> str | None:
    """The value of `keyword` as text, whatever VR the source gave it; None when absent or empty. Raises
    ValueError when it cannot be read as one text value (bytes in an unknown charset, a list, binary data)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            elem = ds.get(keyword)
            value = None if elem is None else ds[keyword].value
        except Exception as exc:  # pydicom converts raw values lazily and raises many kinds of error
            raise ValueError(f"unreadable ({type(exc).__name__})") from exc
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("undecodable bytes") from None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        if len(value) != 1:
            raise ValueError(f"{len(value)} values where one is expected")
        value = value[0]
    text = str(value).strip(" \x00")
    if "\ufffd" in text:
        raise ValueError("characters not valid in the source's character set")
    return text or None


def checked_value(ds: Dataset, rule: Rule) -> str | None:
    """The value to write for `rule` (None: omit for type 3, empty for type 2). Raises ValueError naming the
    attribute for a type 1 value that is missing or malformed."""
    try:
        text = _raw_text(ds, rule.keyword)
        value = None if text is None else rule.check(text)
        problem = None if value is not None else "missing or empty"
    except (ValueError, TypeError, OverflowError) as exc:
        value, problem = None, f"malformed ({exc})"
    if value is None and rule.type == "1":
        raise ValueError(f"the source's {rule.keyword} is {problem}; a DICOM-SEG cannot be made without it")
    if problem and problem != "missing or empty":
        action = "written empty" if rule.type == "2" else "left out"
        log.warning("source %s is %s; %s", rule.keyword, problem, action)
    return value


def derived_frame_of_reference(datasets: Sequence[Dataset]) -> str:
    """A FrameOfReferenceUID for a series that lacks one, derived from the series' own UIDs, so exporting the
    same series twice gives the same UID (and a SEG of it lands in the same frame)."""
    series = str(datasets[0].get("SeriesInstanceUID", ""))
    instances = sorted(str(ds.get("SOPInstanceUID", "")) for ds in datasets)
    # A name-based UUID as a "2.25." UID (PS3.5 B.2); pydicom's generate_uid(prefix=None) ignores its
    # entropy sources and would give a random one.
    name = "\\".join(["SAMMed2D frame of reference", series, *instances])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def frame_of_reference(datasets: Sequence[Dataset]) -> tuple[str, bool]:
    """The series' FrameOfReferenceUID and whether it was derived (missing, empty or malformed in the source;
    a one-line warning says so)."""
    rule = next(r for r in RULES if r.keyword == "FrameOfReferenceUID")
    try:
        return checked_value(datasets[0], rule), False
    except ValueError:
        uid = derived_frame_of_reference(datasets)
        log.warning(
            "the source series has no valid FrameOfReferenceUID (de-identified?); the DICOM-SEG uses %s, "
            "derived from the series' UIDs, and says so in its ContentDescription",
            uid,
        )
        return uid, True


def source_headers(datasets: Sequence[Dataset], slice_thickness: float) -> tuple[list[Dataset], bool]:
    """Minimal datasets standing for the sorted source images: the first carries every attribute of
    :data:`RULES` that passed (patient, study, frame of reference), each carries its UIDs (StudyInstanceUID
    among them) and geometry. Returns them and whether the frame of reference was derived. Raises
    ValueError naming a missing type 1 attribute."""
    for_uid, derived = frame_of_reference(datasets)
    headers = []
    for n, ds in enumerate(datasets):
        header = Dataset()
        header.SpecificCharacterSet = "ISO_IR 192"  # values are Unicode here; the writer re-declares
        for rule in INSTANCE_RULES:
            setattr(header, rule.keyword, checked_value(ds, rule))
        header.Rows, header.Columns = int(ds.Rows), int(ds.Columns)
        for keyword in _GEOMETRY[2:]:  # validated as numbers by series.py; re-encoded as valid DS
            setattr(header, keyword, [f"{float(v):.10g}" for v in ds[keyword].value])
        header.FrameOfReferenceUID = for_uid
        header.SliceThickness = f"{slice_thickness:.10g}"
        if n == 0:
            for rule in RULES:
                if rule.keyword == "FrameOfReferenceUID":
                    continue
                value = checked_value(ds, rule)
                if value is not None:
                    setattr(header, rule.keyword, value)
                elif rule.type == "2":
                    setattr(header, rule.keyword, None)
            if "Modality" not in header:
                header.Modality = "OT"
        headers.append(header)
    return headers, derived

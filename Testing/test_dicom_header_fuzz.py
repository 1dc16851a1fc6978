"""Header fuzz: every attribute of the bundled CT's headers absent, empty, of the wrong VR, over-long and in a
bad character set. Each variant either exports a DICOM-SEG that dciodvfy passes without error, or is refused
with one line naming the attribute; no other exception escapes.

Fast by construction: three slices, their headers only (no pixel data: the SEG does not need it), and a
32 x 32 grid (Rows and Columns rewritten; the geometry stays consistent). A variant whose SEG equals the
baseline's (which dciodvfy passes) apart from its new UIDs and creation time cannot fail dciodvfy, so the
validator only runs on variants that change the SEG."""

from __future__ import annotations

import copy
import io
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.tag import Tag

from SAMMed2DSegmentLib.formats.dicom import headers, seg_write
from SAMMed2DSegmentLib.formats.dicom import series as dseries
from SAMMed2DSegmentLib.formats.dicom.seg_write import SegmentSpec

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every defect we plant

CT = Path(__file__).parent / "Data" / "totalseg-example-ct" / "ct"
BIN = Path(sys.executable).parent
HASH = "0123456789abcdef" * 4
SIZE = 32
KINDS = ("absent", "empty", "wrong-vr", "over-long", "bad-charset")
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR",
            "UT"}  # fmt: skip
# Bytes no declared character set makes sense of: an undeclared ISO 2022 escape, a stray C1 control, 0xFF.
BAD_BYTES = b"Gr\xfc\xdfe \x1b$B\x30\x21\x1b(B \x85\xff "
#: What changes from one export to the next by design.
VOLATILE = ("ContentDate", "ContentTime", "SeriesDate", "SeriesTime", "InstanceCreationDate",
            "InstanceCreationTime")  # fmt: skip


def _base() -> list[pydicom.Dataset]:
    datasets = []
    for path in sorted(CT.iterdir())[:3]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ds.Rows = ds.Columns = SIZE
        datasets.append(ds)
    return datasets


BASE = _base()
TAKEN = [elem.tag for elem in BASE[0] if elem.keyword in headers.TAKEN]
#: Attributes the SEG does not take: fuzzed ten at a time (they cannot change the SEG, which the content
#: comparison checks; one export per group keeps the test fast).
OTHERS = [elem.tag for elem in BASE[0] if elem.keyword not in headers.TAKEN]
GROUPS = [tuple(TAKEN[n : n + 1]) for n in range(len(TAKEN))] + [
    tuple(OTHERS[n : n + 10]) for n in range(0, len(OTHERS), 10)
]


def _name(tag) -> str:
    return pydicom.datadict.keyword_for_tag(tag) or str(Tag(tag))


def _mutate(ds: pydicom.Dataset, tag, kind: str) -> bool:
    """Apply one defect; False when it does not apply to this attribute (e.g. a bad charset for a number)."""
    elem = ds[tag]
    vr = elem.VR
    if kind == "absent":
        del ds[tag]
    elif kind == "empty":
        ds[tag] = DataElement(tag, vr, [] if vr == "SQ" else None)
    elif kind == "wrong-vr":
        ds[tag] = DataElement(tag, "US", 7) if vr in TEXT_VRS else DataElement(tag, "LO", "seven")
    elif kind == "over-long":
        if vr == "SQ":
            ds[tag] = DataElement(tag, "SQ", [copy.deepcopy(item) for item in elem.value] * 40)
        elif vr in TEXT_VRS:
            long = {"DS": "1" * 40, "IS": "9" * 40, "UI": "1." * 40 + "1"}.get(vr, "X" * 300)
            values = list(elem.value) if elem.VM > 1 else [elem.value]
            ds[tag] = DataElement(tag, vr, [long, *values[1:]] if len(values) > 1 else long)
        elif vr in ("US", "SS", "UL", "SL", "FL", "FD"):
            ds[tag] = DataElement(tag, vr, [1] * 9)
        else:
            return False
    elif kind == "bad-charset":
        if vr not in TEXT_VRS:
            return False
        # As a file holds it: raw bytes, decoded (or not) only when read.
        ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(BAD_BYTES), BAD_BYTES, 0, False, True)
    return True


def _as_read_from_disk(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset] | None:
    """Write and re-read, so values come back as raw bytes as from a real file (None: pydicom cannot write
    this defect at all, so no file can carry it)."""
    read = []
    for ds in datasets:
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.save_as(buffer, enforce_file_format=False)
        except Exception:
            return None
        buffer.seek(0)
        read.append(pydicom.dcmread(buffer, force=True))
    return read


def _mask() -> np.ndarray:
    mask = np.zeros((3, SIZE, SIZE), dtype=bool)
    mask[1, 8:20, 10:24] = True
    return mask


def _content(path: Path) -> str:
    """The SEG as JSON without what changes from one export to the next by design: its new UIDs (highdicom's
    root) and its creation dates and times."""
    ds = pydicom.dcmread(path)
    for keyword in VOLATILE:
        if keyword in ds:
            del ds[keyword]
    text = json.dumps(ds.to_json_dict(), sort_keys=True)
    text = re.sub(r"1\.2\.826\.0\.1\.3680043\.10\.511\.3\.\d+", "UID", text)
    return re.sub(r'"0018A002": \{"Value": \["[0-9.]+"\], "vr": "DT"\}', "", text)


def _export(datasets: list[pydicom.Dataset], out: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ordered = dseries.sort_series_datasets(datasets)
        return seg_write.write_dicom_seg(ordered, [SegmentSpec("organ", _mask())], out, model_hash=HASH)


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(
        [str(BIN / "dciodvfy"), str(path)], capture_output=True, text=True, errors="replace", timeout=60
    )
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> str:
    out = _export([copy.deepcopy(ds) for ds in BASE], tmp_path_factory.mktemp("fuzz") / "baseline.dcm")
    assert dciodvfy_errors(out) == []
    return _content(out)


def _group_id(group: tuple) -> str:
    return _name(group[0]) if len(group) == 1 else f"{_name(group[0])}..{_name(group[-1])}"


def test_the_fuzz_covers_every_attribute_of_the_ct():
    assert sorted(t for group in GROUPS for t in group) == sorted(elem.tag for elem in BASE[0])
    assert len(TAKEN) >= 20  # the patient, study, frame of reference and geometry attributes one by one


@pytest.mark.parametrize("group", GROUPS, ids=[_group_id(g) for g in GROUPS])
def test_every_defect_of_an_attribute_exports_cleanly_or_is_refused_naming_it(group, tmp_path, baseline):
    names = [_name(tag) for tag in group]
    outcomes = {}
    for kind in KINDS:
        datasets = [copy.deepcopy(ds) for ds in BASE]
        applied = [tag for tag in group if all(_mutate(ds, tag, kind) for ds in datasets)]
        if not applied:
            continue
        read = _as_read_from_disk(datasets)
        if read is None:
            outcomes[kind] = "not writable"
            continue
        out = tmp_path / f"{kind}.dcm"
        try:
            _export(read, out)
        except ValueError as exc:
            message = str(exc)
            assert "\n" not in message, f"{names} {kind}: a multi-line refusal: {message}"
            assert any(name in message for name in names), f"{names} {kind}: attribute not named: {message}"
            assert not out.exists()
            outcomes[kind] = "refused"
            continue
        if _content(out) != baseline:
            assert len(group) == 1, f"{names} {kind}: attributes the SEG does not take changed it"
            errors = dciodvfy_errors(out)
            assert errors == [], f"{names} {kind}: {errors}"
        outcomes[kind] = "exported"
    assert outcomes, f"no defect applied to {names}"


# ------------------------------------------------------------------------------------------- the rules


@pytest.mark.parametrize(
    ("keyword", "source", "written"),
    [
        ("PatientSex", "Male", "M"),
        ("PatientSex", "unknown", None),
        ("StudyDate", "2022-12-08", "20221208"),
        ("StudyDate", "19700231", None),
        ("StudyTime", "12:30:00", "123000"),
        ("StudyTime", "25:99", None),
        ("PatientName", "ANONYMOUS", "ANONYMOUS"),  # one component is a valid name
        ("PatientName", "a^b^c^d^e^f", None),
        ("AccessionNumber", "A" * 17, None),
        ("SeriesNumber", "12", "12"),
    ],
)
def test_rules_repair_what_the_standard_allows_and_drop_the_rest(keyword, source, written):
    rule = next(r for r in headers.RULES if r.keyword == keyword)
    ds = pydicom.Dataset()
    setattr(ds, keyword, source)
    assert headers.checked_value(ds, rule) == written


def test_a_latin_1_source_name_is_written_as_utf_8(tmp_path):
    datasets = [copy.deepcopy(ds) for ds in BASE]
    for ds in datasets:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jürgen"
    out = _export(_as_read_from_disk(datasets), tmp_path / "seg.dcm")
    seg = pydicom.dcmread(out)
    assert seg.SpecificCharacterSet == "ISO_IR 192" and str(seg.PatientName) == "Müller^Jürgen"
    assert dciodvfy_errors(out) == []


def test_a_missing_required_uid_is_refused_naming_it(tmp_path):
    datasets = [copy.deepcopy(ds) for ds in BASE]
    for ds in datasets:
        ds.StudyInstanceUID = "1.2.3.abc"
    with pytest.raises(ValueError, match=r"^the source's StudyInstanceUID is malformed \(not a valid UID\)"):
        _export(_as_read_from_disk(datasets), tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()

"""Markups files (`.mrk.json`, `.fcsv`) checked in Python before Slicer's reader sees them.

Why: Slicer's native markups reader trusts the file's structure. A `markups` item that is a number crashes the
process (SIGSEGV), a missing `type` aborts it (SIGABRT), and a coordinate system it does not know (`"lps"`) is
read as RAS, which mirrors every point through the patient's axis (an unknown name becomes -1 in
`vtkMRMLStorageNode.cxx:1460-1477`, and only LPS is flipped, `vtkMRMLMarkupsJsonStorageNode.cxx:752`).
So the file is checked here against the markups schema (Slicer v5.12.3,
`Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json`) for the properties the reader reads:
their JSON types, finite numbers, array lengths, bounded size and depth. The coordinate system must be exactly
`LPS` or `RAS`; a missing one means LPS, as the schema (`"default": "LPS"`, lines 47-53) and the reader
(`vtkMRMLMarkupsJsonStorageNode.cxx:388-398`) say. Stdlib only.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

#: A markups file is a few kilobytes; this bound keeps a hostile one from taking memory or time.
MAX_BYTES = 16 << 20
#: The schema nests five levels (document → markups → measurement → units → string); room for extensions.
MAX_DEPTH = 16
#: The two coordinate systems Slicer writes; anything else is refused, since the reader takes it as RAS.
COORDINATE_SYSTEMS = ("LPS", "RAS")
#: Older `.fcsv` headers store the system as a number (`vtkMRMLMarkupsStorageNode.cxx:131-138`).
FCSV_COORDINATE_SYSTEMS = {"LPS": "LPS", "RAS": "RAS", "0": "RAS", "1": "LPS"}
MARKUP_TYPES = ("Fiducial", "Line", "Angle", "Curve", "ClosedCurve", "Plane", "ROI")
POSITION_STATUSES = ("undefined", "preview", "defined")


class MarkupsFileError(ValueError):
    """A markups file that is not what its schema says; the message names the file and the property."""


# A property's expected value: a JSON type name, ("enum", choices), ("numbers", length or None),
# ("strings", length), ("object", fields) or ("objects", fields), the last a list of such objects.
_Spec = str | tuple

_UNITS: _Spec = ("string-or-strings", 3)
_CONTROL_POINT: dict[str, _Spec] = {
    "id": "string",
    "label": "string",
    "description": "string",
    "associatedNodeID": "string",
    "position": ("numbers", 3),
    "orientation": ("numbers", 9),
    "selected": "boolean",
    "locked": "boolean",
    "visibility": "boolean",
    "positionStatus": ("enum", POSITION_STATUSES),
}
_DISPLAY: dict[str, _Spec] = {
    **dict.fromkeys(
        (
            "visibility",
            "propertiesLabelVisibility",
            "pointLabelsVisibility",
            "useGlyphScale",
            "sliceProjection",
            "sliceProjectionUseFiducialColor",
            "sliceProjectionOutlinedBehindSlicePlane",
            "handlesInteractive",
            "translationHandleVisibility",
            "rotationHandleVisibility",
            "scaleHandleVisibility",
        ),
        "boolean",
    ),
    **dict.fromkeys(
        (
            "opacity",
            "textScale",
            "glyphScale",
            "glyphSize",
            "sliceProjectionOpacity",
            "lineThickness",
            "lineColorFadingStart",
            "lineColorFadingEnd",
            "lineColorFadingSaturation",
            "lineColorFadingHueOffset",
            "interactionHandleScale",
        ),
        "number",
    ),
    **dict.fromkeys(("color", "selectedColor", "activeColor", "sliceProjectionColor"), ("numbers", 3)),
    "glyphType": "string",
    "snapMode": "string",
}
_MEASUREMENT: dict[str, _Spec] = {
    "name": "string",
    "enabled": "boolean",
    "value": "number",
    "units": _UNITS,
    "description": "string",
    "printFormat": "string",
    "quantityCode": ("strings", 3),
    "derivationCode": ("strings", 3),
    "methodCode": ("strings", 3),
    "controlPointValues": ("numbers", None),
}
_MARKUP: dict[str, _Spec] = {
    "type": ("enum", MARKUP_TYPES),
    "name": "string",
    "coordinateSystem": ("enum", COORDINATE_SYSTEMS),
    "coordinateUnits": _UNITS,
    "locked": "boolean",
    "fixedNumberOfControlPoints": "boolean",
    "labelFormat": "string",
    "lastUsedControlPointNumber": "integer",
    "roiType": "string",
    "insideOut": "boolean",
    "planeType": "string",
    "sizeMode": "string",
    "autoScalingSizeFactor": "number",
    "autoScalingFactor": "number",
    "center": ("numbers", 3),
    "normal": ("numbers", 3),
    "size": ("numbers", 3),
    "planeBounds": ("numbers", 4),
    "objectToBase": ("numbers", 16),
    "baseToNode": ("numbers", 16),
    "orientation": ("numbers", 9),
    "controlPoints": ("objects", {}),
    "display": ("object", _DISPLAY),
    "measurements": ("objects", _MEASUREMENT),
}


def _is_number(value: object) -> bool:
    """A finite JSON number (never a boolean; an integer too large for a double is not finite)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(spec: _Spec) -> str:
    """What a property must be, in words, for the one-line message."""
    kind = spec if isinstance(spec, str) else spec[0]
    if kind in ("numbers", "strings", "string-or-strings"):
        what = "finite numbers" if kind == "numbers" else "strings"
        count = "a list of" if spec[1] is None else f"{spec[1]}"
        return (
            f"{count} {what} expected"
            if kind != "string-or-strings"
            else f"a string or {count} {what} expected"
        )
    if kind == "objects":
        return "a list of objects expected"
    article = "an" if kind[0] in "aeiou" else "a"
    return f"{article} {'finite number' if kind == 'number' else kind} expected"


def _matches(value: object, spec: _Spec) -> bool:
    kind = spec if isinstance(spec, str) else spec[0]
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return _is_number(value)
    if kind == "string-or-strings" and isinstance(value, str):
        return True
    if kind in ("numbers", "strings", "string-or-strings"):
        item_ok = _is_number if kind == "numbers" else (lambda v: isinstance(v, str))
        return isinstance(value, list) and spec[1] in (None, len(value)) and all(map(item_ok, value))
    if kind == "objects":
        return isinstance(value, list)
    return isinstance(value, dict)  # "object"


def _check_object(value: object, fields: Mapping[str, _Spec], owner: str) -> None:
    """Raise MarkupsFileError (without the file name) when a property of `value` does not match its spec."""
    if not isinstance(value, dict):
        raise MarkupsFileError(f"{owner} is {_short(value)}, an object expected")
    for key, spec in fields.items():
        if key not in value:
            continue
        item = value[key]
        if isinstance(spec, tuple) and spec[0] == "enum":
            if item not in spec[1]:
                choices = " or ".join(spec[1]) if len(spec[1]) <= 3 else "one of " + ", ".join(spec[1])
                raise MarkupsFileError(f"{owner} has {key} {_short(item)}; it must be exactly {choices}")
            continue
        if not _matches(item, spec):
            raise MarkupsFileError(f"{owner} has a malformed {key} {_short(item)} ({_expected(spec)})")
        if isinstance(spec, tuple) and spec[0] == "object":
            _check_object(item, spec[1], f"{owner}.{key}")
        elif isinstance(spec, tuple) and spec[0] == "objects":
            for n, element in enumerate(item):
                _check_object(element, spec[1], f"{owner}.{key}[{n}]")


def _check_control_points(markup: dict, owner: str) -> None:
    """A placed point needs its position: Slicer's reader would otherwise make it unplaced without a word
    (`vtkMRMLMarkupsJsonStorageNode.cxx:758-767`), and a prompt set missing a point is a different prompt."""
    for n, point in enumerate(markup.get("controlPoints", [])):
        label = point.get("label")
        name = (
            f"control point {label!r}" if isinstance(label, str) and label else f"{owner}.controlPoints[{n}]"
        )
        _check_object(point, _CONTROL_POINT, name)
        if point.get("positionStatus", "defined") == "defined" and "position" not in point:
            raise MarkupsFileError(f"{name} has a malformed position (missing; 3 finite numbers expected)")


def _depth(value: object, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counted only up to `limit + 1` (so never deep recursion)."""
    if limit < 0 or not isinstance(value, dict | list):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def _read_text(path: Path) -> str:
    """The file's text, refused when larger than MAX_BYTES or not UTF-8 (read at most MAX_BYTES + 1 bytes)."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise MarkupsFileError(f"cannot read markups file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise MarkupsFileError(
            f"markups file {path} is larger than {MAX_BYTES >> 20} MiB; not a markups file"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise MarkupsFileError(f"markups file {path} is not UTF-8 text") from None


def check_markups_json(path: str | os.PathLike[str]) -> dict:
    """Parse and check a `.mrk.json` against the markups schema; returns the document, or raises
    MarkupsFileError."""
    path = Path(path)
    text = _read_text(path)
    try:
        document = json.loads(text)  # NaN and Infinity parse, and are refused where a number is read
    except RecursionError:
        raise MarkupsFileError(f"markups file {path} is nested too deeply") from None
    except ValueError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MarkupsFileError(f"markups file {path} is not valid JSON ({reason})") from None
    if _depth(document, MAX_DEPTH) > MAX_DEPTH:
        raise MarkupsFileError(f"markups file {path} is nested more than {MAX_DEPTH} levels deep")
    try:
        if not isinstance(document, dict):
            raise MarkupsFileError(
                f"the document is {_short(document)}, an object with a 'markups' list expected"
            )
        _check_object(document, {"@schema": "string"}, "the document")
        if "markups" not in document:
            raise MarkupsFileError("there is no 'markups' list")
        markups = document["markups"]
        if not isinstance(markups, list) or not markups:
            raise MarkupsFileError(f"'markups' is {_short(markups)}, a non-empty list of markups expected")
        for m, markup in enumerate(markups):
            where = f"markups[{m}]"
            if isinstance(markup, dict) and "type" not in markup:
                raise MarkupsFileError(f"{where} has no 'type'")
            _check_object(markup, _MARKUP, where)
            _check_control_points(markup, where)
    except MarkupsFileError as exc:
        raise MarkupsFileError(f"markups file {path}: {exc}") from None
    return document


_FLOAT = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")
_INT = re.compile(r"\s*[+-]?\d+\s*")


def _fcsv_number(text: str) -> float | None:
    """A finite decimal number as C's strtod reads one, or None (Python's float() also takes 'nan', '1_0')."""
    if not _FLOAT.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def check_fcsv(path: str | os.PathLike[str]) -> str:
    """Check a Slicer `.fcsv` point list (`vtkMRMLMarkupsFiducialStorageNode.cxx`, v5.12.3): its coordinate
    system (lines 589-594) and, on every point line, finite x, y, z (lines 329-339) and numeric flags.
    Slicer's reader turns a coordinate that is text into 0 and an unknown coordinate system into RAS; both
    are refused.
    Returns the coordinate system, LPS when the header names none (the storage node's default)."""
    path = Path(path)
    text = _read_text(path)
    system, versioned = "LPS", False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("#"):
            name, _, value = line[1:].partition("=")
            name, value = name.strip(), value.strip()
            if name == "Markups fiducial file version":
                versioned = True
            elif name == "CoordinateSystem":
                if value not in FCSV_COORDINATE_SYSTEMS:
                    raise MarkupsFileError(
                        f"markups file {path} line {number}: CoordinateSystem is {value!r}; "
                        "it must be exactly LPS or RAS"
                    )
                system = FCSV_COORDINATE_SYSTEMS[value]
            continue
        if not line.strip():
            continue
        try:
            fields = next(csv.reader([line]))
        except csv.Error as exc:
            raise MarkupsFileError(f"markups file {path} line {number}: {exc}") from None
        # Slicer 3 files (no version line): label,x,y,z,sel,vis; later: id,x,y,z,ow,ox,oy,oz,vis,sel,lock,…
        coordinates, flags = (fields[1:4], fields[4:6]) if not versioned else (fields[1:4], fields[8:11])
        numbers = [_fcsv_number(c) for c in coordinates]
        if len(numbers) < 3 or None in numbers:
            raise MarkupsFileError(
                f"markups file {path} line {number}: x, y, z must be three finite numbers: {coordinates!r}"
            )
        orientation = fields[4:8] if versioned else []
        extra = fields[14:16] if versioned else []
        if any(f.strip() and _fcsv_number(f) is None for f in orientation) or any(
            f.strip() and not _INT.fullmatch(f) for f in flags + extra
        ):
            raise MarkupsFileError(
                f"markups file {path} line {number}: a numeric column holds text: {line[:80]!r}"
            )
    return system


def check_markups_file(path: str | os.PathLike[str]) -> None:
    """Check a markups file by its name: `.json` (`.mrk.json`) or `.fcsv`; any other name is refused, since
    Slicer would pick a reader by the name anyway."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".json"):
        check_markups_json(path)
    elif name.endswith(".fcsv"):
        check_fcsv(path)
    else:
        raise MarkupsFileError(f"{path} is not a markups file: the name must end in .mrk.json or .fcsv")


__all__ = [
    "COORDINATE_SYSTEMS",
    "MarkupsFileError",
    "check_fcsv",
    "check_markups_file",
    "check_markups_json",
]

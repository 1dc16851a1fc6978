"""Issue 24, item 5: markups files are checked in Python before Slicer's native reader sees them. A malformed
structure used to crash the process (SIGSEGV, SIGABRT) and a coordinate-system typo mirrored the prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from SAMMed2DSegmentLib import commands
from SAMMed2DSegmentLib.formats.markups_files import (
    MAX_BYTES,
    MarkupsFileError,
    check_fcsv,
    check_markups_file,
    check_markups_json,
)
from SAMMed2DSegmentLib.mrml import create_headless_scene, load_markups, points_from_markups

from .test_cli import DICOM, SCHEMA

LIB_PARENT = Path(commands.__file__).resolve().parents[2]


def _point(position=(1.0, 2.0, 3.0), **extra) -> dict:
    return {"id": "1", "label": "p", "position": list(position), "positionStatus": "defined", **extra}


def _doc(**markup) -> dict:
    return {"@schema": SCHEMA, "markups": [{"type": "Fiducial", "controlPoints": [_point()], **markup}]}


def _deep(depth: int) -> dict:
    nested: list = []
    for _ in range(depth):
        nested = [nested]
    return _doc(extra=nested)


#: Every structure that crashed Slicer's reader (or Python's JSON parser) in the issue, and neighbours.
CRASHERS: dict[str, object] = {
    "markups-item-number": {"markups": [5]},
    "markups-item-string": {"markups": ["x"]},
    "measurements-numbers": _doc(measurements=[1, 2]),
    "empty-object": {},
    "markups-item-list": {"markups": [[{"type": "Fiducial"}]]},
    "document-list": [_doc()],
    "numeric-type": {"markups": [{"type": 3, "controlPoints": [_point()]}]},
    "deep-nesting": "DEEP",
}


def _write_crasher(path: Path, structure: object) -> Path:
    if structure == "DEEP":  # deeper than Python's recursion limit: the parser itself gives up
        path.write_text('{"markups": [{"type": "Fiducial", "x": ' + "[" * 100_000 + "]" * 100_000 + "}]}")
    else:
        path.write_text(json.dumps(structure))
    return path


def test_native_crash_guard(tmp_path):
    """Each malformed structure ends with exit 2 and one stderr line, in its own process: a native crash
    would show as a negative return code (the signal)."""
    env = {**os.environ, "PYTHONPATH": str(LIB_PARENT), "SAMMED2D_CACHE_DIR": str(tmp_path / "cache")}
    procs = {}
    for name, structure in CRASHERS.items():
        bad = _write_crasher(tmp_path / f"{name}.mrk.json", structure)
        command = [
            sys.executable,
            "-m",
            "SAMMed2DSegmentLib",
            "segment",
            "--volume",
            str(DICOM),
            "--include",
            str(bad),
            "--out",
            str(tmp_path / f"{name}.seg.nrrd"),
            "--propagate",
            "none",
        ]
        procs[name] = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (name, proc.returncode, err[-2000:])
        assert len(lines) == 1 and f"{name}.mrk.json" in lines[0], (name, lines)
        assert not (tmp_path / f"{name}.seg.nrrd").exists()


@pytest.mark.parametrize("name", sorted(CRASHERS))
def test_malformed_structures_are_refused_by_the_check(tmp_path, name):
    bad = _write_crasher(tmp_path / "bad.mrk.json", CRASHERS[name])
    with pytest.raises(MarkupsFileError, match="bad.mrk.json") as info:
        check_markups_json(bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("document", "names"),
    [
        (_deep(40), "nested more than"),
        (_doc(controlPoints=5), "controlPoints"),
        (_doc(controlPoints=[_point(position=["1", 2, 3])]), "position"),
        (_doc(controlPoints=[_point(position=[1, 2])]), "position"),
        (_doc(controlPoints=[_point(position=["1e999", 2, 3])]), "position"),  # written as a bare 1e999
        (_doc(controlPoints=[_point(position=[10**400, 2, 3])]), "position"),
        (
            _doc(controlPoints=[_point(position=[float("nan"), 2, 3])]),
            "control point 'p' has a malformed position",
        ),
        (_doc(controlPoints=[{"label": "p", "positionStatus": "defined"}]), "malformed position .missing"),
        (_doc(controlPoints=[3]), r"controlPoints\[0\] is 3"),
        (_doc(controlPoints=[_point(position=[True, 2, 3])]), "position"),
        (_doc(controlPoints=[_point(positionStatus="placed")]), "positionStatus"),
        (_doc(controlPoints=[_point(visibility=1)]), "visibility"),
        (_doc(display=[1]), "display"),
        (_doc(display={"color": [1, 0]}), "color"),
        (_doc(measurements=[{"units": 5}]), "units"),
        (_doc(center=[1, 2, "x"]), "center"),
        (_doc(name=7), "name"),
        (_doc(type="Balloon"), "type"),
        ({"markups": [{"controlPoints": []}]}, "'type'"),
        ({"markups": []}, "non-empty"),
        ({"markups": {"type": "Fiducial"}}, "markups"),
        ({"@schema": 1, "markups": [{"type": "Fiducial"}]}, "@schema"),
    ],
)
def test_schema_types_are_checked(tmp_path, document, names):
    bad = tmp_path / "bad.mrk.json"
    bad.write_text(json.dumps(document).replace('"1e999"', "1e999"))
    with pytest.raises(MarkupsFileError, match=names):
        check_markups_json(bad)


@pytest.mark.parametrize("text", ["{ not json", "\xff\xfe", '{"markups": [{"type": "Fiducial"}]} trailing'])
def test_not_json_is_refused(tmp_path, text):
    bad = tmp_path / "bad.mrk.json"
    bad.write_bytes(text.encode("latin-1"))
    with pytest.raises(MarkupsFileError, match="bad.mrk.json"):
        check_markups_json(bad)


def test_size_is_bounded(tmp_path):
    big = tmp_path / "big.mrk.json"
    with big.open("wb") as f:
        f.truncate(MAX_BYTES + 1)
    with pytest.raises(MarkupsFileError, match="larger than"):
        check_markups_json(big)


@pytest.mark.parametrize("system", ["lps", "Lps", "LPS ", "XYZ", "ras", "", 0])
def test_coordinate_system_typo_is_refused(tmp_path, system):
    """A coordinate system Slicer does not know is read as RAS (the prompt mirrored): refused by name."""
    bad = tmp_path / "typo.mrk.json"
    bad.write_text(json.dumps(_doc(coordinateSystem=system)))
    with pytest.raises(MarkupsFileError, match=r"has coordinateSystem .*; it must be exactly LPS or RAS"):
        load_markups(create_headless_scene(), bad)


def test_missing_coordinate_system_means_lps(tmp_path):
    """As the schema's default and Slicer's reader say (markups-schema-v1.0.3.json:47-53)."""
    good = tmp_path / "default.mrk.json"
    good.write_text(json.dumps(_doc()))
    check_markups_file(good)
    (node,) = load_markups(create_headless_scene(), good)
    np.testing.assert_allclose(points_from_markups(node, 1)[0].position, [-1.0, -2.0, 3.0])


FCSV_HEADER = (
    "# Markups fiducial file version = 5.12\n# CoordinateSystem = {}\n"
    "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
)
FCSV_POINT = "vtkMRMLMarkupsFiducialNode_0,{},1,0,0,0,1,1,0,F-1,,\n"


@pytest.mark.parametrize("system", ["lps", "Lps", "XYZ", "-1"])
def test_fcsv_coordinate_system_typo_is_refused(tmp_path, system):
    bad = tmp_path / "typo.fcsv"
    bad.write_text(FCSV_HEADER.format(system) + FCSV_POINT.format("1,2,3"))
    with pytest.raises(MarkupsFileError, match=r"CoordinateSystem is .*exactly LPS or RAS"):
        load_markups(create_headless_scene(), bad)


@pytest.mark.parametrize(
    "line",
    [FCSV_POINT.format(xyz) for xyz in ("1,two,3", "1,2,", " ,2,3", "nan,2,3", "1,2,1e999", "1_0,2,3")]
    + ["vtkMRMLMarkupsFiducialNode_0,1,2\n"],
)
def test_fcsv_coordinate_that_is_not_a_number_is_refused(tmp_path, line):
    """Slicer's reader turns such a coordinate into 0, and that spot was segmented."""
    bad = tmp_path / "text.fcsv"
    bad.write_text(FCSV_HEADER.format("LPS") + line)
    with pytest.raises(MarkupsFileError, match="line 4: x, y, z must be three finite numbers"):
        load_markups(create_headless_scene(), bad)


@pytest.mark.parametrize(
    ("system", "ras"), [("LPS", [-1, -2, 3]), ("RAS", [1, 2, 3]), ("0", [1, 2, 3]), ("1", [-1, -2, 3])]
)
def test_fcsv_good_files_load(tmp_path, system, ras):
    good = tmp_path / "good.fcsv"
    good.write_text(FCSV_HEADER.format(system) + FCSV_POINT.format("1,2,3"))
    assert check_fcsv(good) in ("LPS", "RAS")
    (node,) = load_markups(create_headless_scene(), good)
    np.testing.assert_allclose(points_from_markups(node, 1)[0].position, ras)


def test_other_names_are_refused(tmp_path):
    other = tmp_path / "points.txt"
    other.write_text("1,2,3")
    with pytest.raises(MarkupsFileError, match="must end in .mrk.json or .fcsv"):
        check_markups_file(other)


def test_bundled_markups_pass(tmp_path):
    for path in Path(__file__).resolve().parents[1].glob("demo/*.mrk.json"):
        check_markups_file(path)


def test_command_line_refuses_a_coordinate_system_typo_in_one_line(tmp_path, capsys):
    """On the MSD spleen CT a spleen point written with "lps" segmented the patient's other side, exit 0."""
    typo = tmp_path / "typo.mrk.json"
    typo.write_text(json.dumps(_doc(coordinateSystem="lps")))
    out = tmp_path / "o.seg.nrrd"
    argv = ["segment", "--volume", str(DICOM), "--include", str(typo), "--out", str(out)]
    assert commands.main(argv) == commands.EXIT_BAD_INPUT
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "has coordinateSystem 'lps'; it must be exactly LPS or RAS" in lines[0], lines
    assert not out.exists()

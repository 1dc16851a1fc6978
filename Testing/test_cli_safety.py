"""Issue 11: nothing the command line is given can destroy data. Each test reproduces one finding of the
issue with the real command line, the bundled CT and the bundled demo model: outputs never overwrite inputs
or each other (links included), the outputs are one unit (disk full, SIGINT, SIGTERM), broken series and bad
results are refused before anything is written, the checkpoint cache follows content, and identical runs give
identical files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from SAMMed2DSegmentLib import commands
from SAMMed2DSegmentLib.commands import segment as segment_command
from SAMMed2DSegmentLib.commands.common import report_json
from SAMMed2DSegmentLib.engine.prompts import MAX_POINTS_PER_SLICE

from .synthetic_weights import synthetic_state_dict
from .terminal import sigint_as_in_a_terminal
from .test_cli import DICOM, LABELS, LIVER, read_segment, write_points, write_roi

LIB_PARENT = Path(commands.__file__).resolve().parents[2]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden temporary files included) with its content hash. Facts the cache
    keeps whatever the outcome are left out: the one-time precision calibration (a machine fact), the
    remembered hash of a checkpoint file (`NAME-KEY.source.json`, weights/checkpoint.py) and a model's int8
    weights (`int8/`, weights/int8_weights.py)."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "precision-calibration.json"
            and not p.name.endswith(".source.json")
            and not (p.parent.name == "int8" and p.name.endswith(".safetensors"))}  # fmt: skip


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Inputs shared by the tests (copies: a failing test must never damage the bundled data), and one
    existing result per kind of output, made by a first run."""
    root = tmp_path_factory.mktemp("safety")
    labels = sitk.ReadImage(str(LABELS))
    arr = sitk.GetArrayFromImage(labels)
    ys, xs = np.nonzero(arr[10] == LIVER)
    order = np.argsort((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2)
    liver = labels.TransformIndexToPhysicalPoint((int(xs[order[0]]), int(ys[order[0]]), 10))
    air = labels.TransformIndexToPhysicalPoint((5, 5, 10))
    series = root / "series"
    shutil.copytree(DICOM, series)
    volume = root / "ct.nrrd"
    sitk.WriteImage(sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series))), str(volume))
    ckpt = root / "small.pth"
    torch.save(synthetic_state_dict("small"), ckpt)
    return {
        "root": root,
        "series": series,
        "volume": volume,
        "ckpt": ckpt,
        "liver": write_points(root / "liver.mrk.json", [liver]),
        "air": write_points(root / "air.mrk.json", [air]),
        "liver_lps": liver,
    }


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMMED2D_CACHE_DIR", str(tmp_path / "cache"))


def segment(*args: str | Path) -> int:
    return commands.main(["segment", "--quiet", "--propagate", "none", *map(str, args)])


@pytest.fixture(scope="module")
def existing(data, tmp_path_factory):
    """A .seg.nrrd and a DICOM-SEG holding the liver on slice 10 (demo model), to be protected later."""
    folder = tmp_path_factory.mktemp("existing")
    out, dcm = folder / "liver.seg.nrrd", folder / "liver.dcm"
    assert (
        segment("--volume", data["series"], "--include", data["liver"], "--out", out, "--dicom-seg", dcm) == 0
    )
    return {"out": out, "dcm": dcm}


def copy_existing(existing, folder: Path) -> tuple[Path, Path]:
    out, dcm = folder / "liver.seg.nrrd", folder / "liver.dcm"
    shutil.copyfile(existing["out"], out)
    shutil.copyfile(existing["dcm"], dcm)
    return out, dcm


# -- 1. outputs never overwrite inputs or each other -------------------------------------------------------


COLLISIONS = [
    "report is the volume file",
    "report is a symlink to the volume file",
    "report is a hard link to the checkpoint",
    "dicom-seg is a file of the source series",
    "dicom-seg is a symlink to a file of the source series",
    "report is the out file",
    "out is a DICOM source file named .seg.nrrd",
    "out is a hard link to the markups",
    "dicom-seg is the report",
]


@pytest.mark.parametrize("case", COLLISIONS)
def test_an_output_that_is_an_input_or_another_output_is_refused(data, tmp_path, capsys, case):
    series = tmp_path / "series"
    shutil.copytree(data["series"], series)
    first = sorted(series.iterdir())[0]
    volume = series
    out, report, dcm = tmp_path / "out.seg.nrrd", tmp_path / "report.json", tmp_path / "seg.dcm"
    markups = tmp_path / "liver.mrk.json"
    shutil.copyfile(data["liver"], markups)
    ckpt = tmp_path / "small.pth"
    shutil.copyfile(data["ckpt"], ckpt)
    roles: tuple[str, str]
    if case == "report is the volume file":
        volume = tmp_path / "ct.nrrd"
        shutil.copyfile(data["volume"], volume)
        report, roles = volume, ("--report", "--volume")
    elif case == "report is a symlink to the volume file":
        volume = tmp_path / "ct.nrrd"
        shutil.copyfile(data["volume"], volume)
        report = tmp_path / "link.json"
        report.symlink_to(volume)
        roles = ("--report", "--volume")
    elif case == "report is a hard link to the checkpoint":
        report = tmp_path / "hard.json"
        os.link(ckpt, report)
        roles = ("--report", "--checkpoint")
    elif case == "dicom-seg is a file of the source series":
        dcm = first.rename(first.with_suffix(".dcm"))
        roles = ("--dicom-seg", "of the --volume folder")
    elif case == "dicom-seg is a symlink to a file of the source series":
        dcm = tmp_path / "elsewhere.dcm"
        dcm.symlink_to(first)
        roles = ("--dicom-seg", "of the --volume folder")
    elif case == "report is the out file":
        report, roles = out, ("--report", "--out")
    elif case == "out is a DICOM source file named .seg.nrrd":
        out = first.rename(series / "X.seg.nrrd")
        roles = ("--out", "of the --volume folder")
    elif case == "out is a hard link to the markups":
        out = tmp_path / "m.seg.nrrd"
        os.link(markups, out)
        roles = ("--out", "--include")
    elif case == "dicom-seg is the report":
        dcm = tmp_path / "both.dcm"
        report, roles = dcm, ("--report", "--dicom-seg")
    before = snapshot(tmp_path)
    args = ["--volume", volume, "--include", markups, "--checkpoint", ckpt, "--out", out, "--report", report]
    if case.startswith("dicom-seg") or dcm.exists():
        args += ["--dicom-seg", dcm]
    assert segment(*args) == commands.EXIT_BAD_INPUT
    line = one_error_line(capsys)
    assert "same file" in line and all(role in line for role in roles), line
    assert snapshot(tmp_path) == before


def test_dicom_seg_inside_the_source_folder_is_refused(data, tmp_path, capsys):
    series = tmp_path / "series"
    shutil.copytree(data["series"], series)
    before = snapshot(tmp_path)
    dcm = series / "seg.dcm"
    assert segment("--volume", series, "--include", data["liver"], "--out", tmp_path / "o.seg.nrrd",
                   "--dicom-seg", dcm) == commands.EXIT_BAD_INPUT  # fmt: skip
    assert "inside the source DICOM folder" in one_error_line(capsys)
    assert snapshot(tmp_path) == before


def test_out_naming_a_folder_says_so(data, tmp_path, capsys):
    folder = tmp_path / "results.seg.nrrd"
    folder.mkdir()
    assert segment("--volume", data["volume"], "--include", data["liver"], "--out", folder) == 2
    assert "is a folder" in one_error_line(capsys)


def test_existing_out_on_another_grid_is_refused_before_the_model_loads(data, tmp_path, capsys, monkeypatch):
    shifted = sitk.ReadImage(str(data["volume"]))
    spacing = np.array(shifted.GetSpacing())
    shifted.SetOrigin(tuple(np.array(shifted.GetOrigin()) + spacing * [0.5, 0.5, 0]))
    other = tmp_path / "shifted.nrrd"
    sitk.WriteImage(shifted, str(other))
    out = tmp_path / "other.seg.nrrd"
    assert segment("--volume", other, "--include", data["liver"], "--checkpoint", data["ckpt"],
                   "--iou-threshold", "0", "--out", out) == 0  # fmt: skip
    before = digest(out)

    def no_model(args):
        raise AssertionError("the model was loaded before the existing --out was checked")

    monkeypatch.setattr(segment_command, "load_model", no_model)
    assert segment("--volume", data["volume"], "--include", data["liver"], "--out", out) == 2
    assert "another voxel grid" in one_error_line(capsys)
    assert digest(out) == before


# -- 4./6. the outputs are one unit: disk full, SIGINT, SIGTERM ---------------------------------------------


@contextlib.contextmanager
def small_tmpfs(folder: Path, size_kib: int):
    folder.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)],
                       check=True, capture_output=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs to fill up ({exc}); the disk-full case is not tested here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="disk full needs root to mount a tmpfs")
def test_disk_full_on_the_second_output_replaces_nothing(data, existing, tmp_path, capsys):
    with small_tmpfs(tmp_path / "small", 1024) as folder:
        out, dcm = copy_existing(existing, folder)
        # Leave room for the new .seg.nrrd (two segments now) but not for the new DICOM-SEG, written second
        # (it holds one segment more than the existing one, so it is larger than that).
        room = 3 * out.stat().st_size + 8 * 1024
        assert room < dcm.stat().st_size
        with open(folder / "filler", "wb") as filler:
            free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
            filler.write(b"\0" * max(free - room, 0))
        before = snapshot(folder)
        status = segment("--volume", data["series"], "--include", data["liver"], "--segment-name", "second",
                         "--out", out, "--dicom-seg", dcm, "--report", folder / "r.json")  # fmt: skip
        assert status == commands.EXIT_WRITE_FAILED
        line = one_error_line(capsys)
        assert "No space left on device" in line and "nothing written" in line, line
        assert snapshot(folder) == before


HARNESS = """
import os, sys, time
from SAMMed2DSegmentLib import commands, files
from SAMMed2DSegmentLib.engine import predictor
from SAMMed2DSegmentLib.formats import volumes
from SAMMed2DSegmentLib.mrml import segmentations

MOMENT = os.environ["MOMENT"]

def pause(tag):
    if tag == MOMENT:
        print("MOMENT", tag, file=sys.stderr, flush=True)
        time.sleep(60)

def wrap(owner, name, before=None, after=None):
    original = getattr(owner, name)
    def wrapped(*args, **kwargs):
        if before:
            pause(before)
        result = original(*args, **kwargs)
        if after:
            pause(after)
        return result
    setattr(owner, name, wrapped)

wrap(volumes, "read_volume", before="reading")
wrap(predictor.SamMed2DPredictor, "predict", before="predicting")
wrap(segmentations, "save_segmentation", after="first output written")
wrap(files.OutputSet, "commit", before="every output written")
sys.exit(commands.main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "moment, signum",
    [
        ("reading", signal.SIGINT),
        ("predicting", signal.SIGTERM),
        ("first output written", signal.SIGINT),
        ("every output written", signal.SIGTERM),
    ],
)
def test_sigint_and_sigterm_change_nothing(data, existing, tmp_path, moment, signum):
    out, dcm = copy_existing(existing, tmp_path)
    before = snapshot(tmp_path)
    env = {
        **os.environ,
        "MOMENT": moment,
        "PYTHONPATH": str(LIB_PARENT),
        "SAMMED2D_CACHE_DIR": str(tmp_path.parent / "c"),
    }
    args = ["segment", "--volume", data["series"], "--include", data["liver"], "--segment-name", "2nd",
            "--propagate", "none", "--out", out, "--dicom-seg", dcm, "--report", tmp_path / "r"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", HARNESS, *map(str, args)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_in_a_terminal,
    )
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("MOMENT"):
            proc.send_signal(signum)
            break
    rest = proc.communicate(timeout=60)[1]
    err = "".join(lines) + rest
    assert lines and lines[-1].strip() == f"MOMENT {moment}", err
    assert proc.returncode == 128 + signum, err
    assert err.strip().splitlines()[-1] == "interrupted; nothing written", err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before


# -- 3. degenerate results never replace good voxels ------------------------------------------------------


def test_nan_checkpoint_changes_nothing(data, existing, tmp_path, capsys):
    out, dcm = copy_existing(existing, tmp_path)
    state = synthetic_state_dict("small")
    state["mask_decoder.iou_prediction_head.layers.0.weight"] = torch.full_like(
        state["mask_decoder.iou_prediction_head.layers.0.weight"], float("nan")
    )
    nan_ckpt = tmp_path / "nan.pth"
    torch.save(state, nan_ckpt)
    before = snapshot(tmp_path)
    status = segment("--volume", data["series"], "--include", data["liver"], "--checkpoint", nan_ckpt,
                     "--out", out, "--dicom-seg", dcm, "--report", tmp_path / "r.json")  # fmt: skip
    assert status != 0
    line = one_error_line(capsys)
    assert "NaN" in line and "nan.pth" in line, line
    assert snapshot(tmp_path) == before


def test_non_finite_results_stop_the_run_before_anything_is_written(
    data, existing, tmp_path, capsys, monkeypatch
):
    from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor

    predict = SamMed2DPredictor.predict

    def nan_iou(self, *args, **kwargs):
        masks, iou, low_res = predict(self, *args, **kwargs)
        return masks, np.full_like(iou, np.nan), low_res

    monkeypatch.setattr(SamMed2DPredictor, "predict", nan_iou)
    out, dcm = copy_existing(existing, tmp_path)
    before = snapshot(tmp_path)
    status = segment("--volume", data["series"], "--include", data["liver"], "--out", out,
                     "--report", tmp_path / "r.json")  # fmt: skip
    assert status == commands.EXIT_BAD_INPUT
    assert "NaN or infinity on slice 10" in one_error_line(capsys)
    assert snapshot(tmp_path) == before


def test_report_is_strict_json():
    text = report_json({"iou": float("nan"), "slices": [{"area": float("inf")}, 1.5]})
    assert json.loads(text) == {"iou": None, "slices": [{"area": None}, 1.5]}


def test_air_prompt_does_not_replace_an_existing_slice(data, existing, tmp_path, capsys):
    out, _ = copy_existing(existing, tmp_path)
    liver_before = read_segment(out, data["volume"], "SAM-Med2D")
    assert liver_before[10].sum() > 2_000  # a real mask to protect
    before = snapshot(tmp_path)
    args = ["--volume", data["series"], "--include", data["air"], "--out", out]
    assert segment(*args) == commands.EXIT_BAD_INPUT
    line = one_error_line(capsys)
    assert "slice(s) 10 (IoU" in line and "kept out" in line and "nothing written" in line, line
    assert snapshot(tmp_path) == before
    # Asked for explicitly, the doubtful slice is written (and the report says so).
    report = tmp_path / "r.json"
    assert segment(*args, "--overwrite-low-confidence", "--report", report) == 0
    rep = json.loads(report.read_text())
    assert rep["slices_written"] == [10] and rep["slices"][0]["predicted_iou"] < 0.5
    assert not np.array_equal(read_segment(out, data["volume"], "SAM-Med2D")[10], liver_before[10])


def test_slices_propagated_from_a_kept_out_slice_are_kept_out_too(
    data, existing, tmp_path, capsys, monkeypatch
):
    """The prompted slice is doubtful (its IoU made 0.3 here) and the segment has voxels there, so it is kept
    out; the slices the walk reached from it were judged against that doubtful mask, so they go too, and
    nothing is written. Asked for, all of them are written."""
    from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor

    predict, calls = SamMed2DPredictor.predict, []

    def doubtful_first(self, *args, **kwargs):
        masks, iou, low_res = predict(self, *args, **kwargs)
        calls.append(len(calls))
        return masks, (np.full_like(iou, 0.3) if len(calls) == 1 else iou), low_res

    monkeypatch.setattr(SamMed2DPredictor, "predict", doubtful_first)
    out, _ = copy_existing(existing, tmp_path)
    before = snapshot(tmp_path)
    args = ["--volume", data["series"], "--include", data["liver"], "--out", out, "--propagate", "both"]
    assert segment(*args) == commands.EXIT_BAD_INPUT
    line = one_error_line(capsys)
    assert "slice(s) 10 (IoU 0.30)" in line and "slice(s) propagated from them" in line, line
    assert "nothing written" in line and snapshot(tmp_path) == before
    calls.clear()
    report = tmp_path / "r.json"
    assert segment(*args, "--overwrite-low-confidence", "--report", report) == 0
    written = json.loads(report.read_text())["slices_written"]
    assert 10 in written and len(written) > 1


# -- 7. limits and malformed prompts -------------------------------------------------------------------------


def _grid_points(center_lps, count: int) -> list[tuple[float, float, float]]:
    """`count` points on one axial slice, 1 mm apart around `center_lps`."""
    side = int(np.ceil(np.sqrt(count)))
    return [
        (center_lps[0] + (n % side) - side / 2, center_lps[1] + (n // side) - side / 2, center_lps[2])
        for n in range(count)
    ]


def test_point_limit_per_slice(data, tmp_path, capsys):
    common = ["--volume", data["volume"], "--checkpoint", data["ckpt"], "--iou-threshold", "0"]
    many = write_points(tmp_path / "many.mrk.json", _grid_points(data["liver_lps"], MAX_POINTS_PER_SLICE + 1))
    out = tmp_path / "o.seg.nrrd"
    assert segment(*common, "--include", many, "--out", out) == commands.EXIT_BAD_INPUT
    line = one_error_line(capsys)
    assert (
        f"{MAX_POINTS_PER_SLICE + 1} points on slice 10" in line and f"at most {MAX_POINTS_PER_SLICE}" in line
    )
    assert not out.exists()
    enough = write_points(tmp_path / "enough.mrk.json", _grid_points(data["liver_lps"], MAX_POINTS_PER_SLICE))
    assert segment(*common, "--include", enough, "--out", out) == 0


@pytest.mark.parametrize("position", [["x", 1.0, 2.0], [1.0, 2.0], None, [1.0, float("nan"), 2.0]])
def test_malformed_point_coordinates_are_refused_not_dropped(data, tmp_path, capsys, position):
    markups = write_points(tmp_path / "p.mrk.json", [data["liver_lps"], (0.0, 0.0, 0.0)])
    document = json.loads(markups.read_text())
    point = document["markups"][0]["controlPoints"][1]
    if position is None:
        del point["position"]
    else:
        point["position"] = position
    markups.write_text(json.dumps(document))
    out = tmp_path / "o.seg.nrrd"
    assert segment("--volume", data["volume"], "--include", markups, "--out", out) == commands.EXIT_BAD_INPUT
    assert "control point 'p1' has a malformed position" in one_error_line(capsys)
    assert not out.exists()


def test_roi_file_given_to_include_is_refused(data, tmp_path, capsys):
    roi = write_roi(tmp_path / "roi.mrk.json", data["liver_lps"], (40, 40, 10))
    out = tmp_path / "o.seg.nrrd"
    assert segment("--volume", data["volume"], "--include", roi, "--out", out) == commands.EXIT_BAD_INPUT
    assert "holds an ROI, not points; pass it with --roi" in one_error_line(capsys)
    assert not out.exists()


# -- 2. a broken series is refused on every read, naming the file ------------------------------------------


def _remove_one(files: list[Path]) -> str:
    files[7].unlink()
    return "uneven slice spacing"


def _no_position(files: list[Path]) -> str:
    ds = pydicom.dcmread(files[7])
    del ds.ImagePositionPatient
    ds.save_as(files[7])
    return f"{files[7].name}: no ImagePositionPatient"


def _truncated(files: list[Path]) -> str:
    data = files[7].read_bytes()
    files[7].write_bytes(data[: len(data) // 2])
    return f"{files[7].name}: truncated DICOM file"


def _other_patient(files: list[Path]) -> str:
    ds = pydicom.dcmread(files[7])
    ds.PatientID = "SOMEONE-ELSE"
    ds.save_as(files[7])
    return f"different PatientIDs ({files[7].name} has 'SOMEONE-ELSE'"


def _other_study(files: list[Path]) -> str:
    ds = pydicom.dcmread(files[7])
    ds.StudyInstanceUID = "1.2.3.4.5"
    ds.save_as(files[7])
    return f"different StudyInstanceUIDs ({files[7].name}"


@pytest.mark.parametrize("edit", [_remove_one, _no_position, _truncated, _other_patient, _other_study])
def test_broken_series_is_refused_without_dicom_seg(data, tmp_path, capsys, edit):
    series = tmp_path / "series"
    shutil.copytree(data["series"], series)
    expected = edit(sorted(series.iterdir()))
    out = tmp_path / "o.seg.nrrd"
    assert segment("--volume", series, "--include", data["liver"], "--out", out) == commands.EXIT_BAD_INPUT
    line = one_error_line(capsys)
    assert expected in line, line
    assert not out.exists()


def test_our_seg_in_the_source_folder_is_ignored_with_a_note(data, existing, tmp_path, caplog):
    series = tmp_path / "series"
    shutil.copytree(data["series"], series)
    shutil.copyfile(existing["dcm"], series / "zz-seg.dcm")
    out = tmp_path / "o.seg.nrrd"
    with caplog.at_level(logging.WARNING):
        assert segment("--volume", series, "--include", data["liver"], "--out", out) == 0
    assert "ignored 1 file(s) that are not images of the series: zz-seg.dcm (a DICOM-SEG)" in caplog.text


# -- 5. the checkpoint cache follows the file's content ----------------------------------------------------


def test_same_size_same_mtime_checkpoint_swap_runs_the_new_weights(data, tmp_path):
    model = tmp_path / "model.pth"
    shutil.copyfile(data["ckpt"], model)
    other = tmp_path / "other.pth"
    torch.save({k: v * 1.5 for k, v in synthetic_state_dict("small").items()}, other)
    assert other.stat().st_size == model.stat().st_size
    common = [
        "--volume",
        data["volume"],
        "--include",
        data["liver"],
        "--checkpoint",
        model,
        "--iou-threshold",
        "0",
    ]
    assert segment(*common, "--out", tmp_path / "a.seg.nrrd", "--report", tmp_path / "a.json") == 0
    st = model.stat()
    with model.open("r+b") as fh:  # same path, inode and size ...
        fh.write(other.read_bytes())
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the same mtime
    assert segment(*common, "--out", tmp_path / "b.seg.nrrd", "--report", tmp_path / "b.json") == 0
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert first["model"]["sha256"] == digest(data["ckpt"])
    assert second["model"]["sha256"] == digest(other)
    assert first["slices"][0]["predicted_iou"] != second["slices"][0]["predicted_iou"]


# -- 7. identical runs, identical files ---------------------------------------------------------------------


def test_two_identical_runs_write_identical_files(data, tmp_path):
    """No timestamp is written into the .seg.nrrd at all, so the files are identical byte for byte."""
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        assert segment("--volume", data["series"], "--include", data["liver"], "--propagate", "both",
                       "--out", folder / "x.seg.nrrd") == 0  # fmt: skip
    assert (tmp_path / "a" / "x.seg.nrrd").read_bytes() == (tmp_path / "b" / "x.seg.nrrd").read_bytes()

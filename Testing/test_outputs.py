"""Issue 24, "Data lost": one output plan for every writer, and updates that are merges, serialised. Each test
reproduces one finding with small hostile inputs written here, on the bundled CT and demo model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import save as safetensors_save

from SAMMed2DSegmentLib import commands, files
from SAMMed2DSegmentLib.engine.geometry import SliceGeometry
from SAMMed2DSegmentLib.engine.prompts import PromptError, RoiPrompt, roi_slices
from SAMMed2DSegmentLib.engine.propagation import PropagationResult, SliceOutcome
from SAMMed2DSegmentLib.finetune.settings import MODEL_FORMAT

from . import test_cli_safety as safety
from .test_cli import LABELS, read_segment, write_roi
from .test_cli_safety import HARNESS, LIB_PARENT, copy_existing, digest, one_error_line, segment, snapshot

# The shared inputs and the existing results of the safety suite (module fixtures, built once here too).
data, existing, private_cache = safety.data, safety.existing, safety.private_cache


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(LIB_PARENT), "SAMMED2D_CACHE_DIR": str(tmp_path / "c"), **extra}


# -- 1. one output plan -----------------------------------------------------------------------------------


def test_existing_ct_volume_named_seg_nrrd_is_refused_not_rewritten(data, tmp_path, capsys):
    out = tmp_path / "ct.seg.nrrd"
    shutil.copyfile(data["volume"], out)  # a CT volume: no segmentation header fields
    before = digest(out)
    status = segment("--volume", data["series"], "--include", data["liver"], "--out", out)
    assert status == commands.EXIT_BAD_INPUT
    line = one_error_line(capsys)
    assert "--out" in line and "is not a segmentation" in line, line
    assert digest(out) == before
    empty = tmp_path / "empty.seg.nrrd"  # an empty file holds nothing to lose: it is written as a new one
    empty.touch()
    assert segment("--volume", data["series"], "--include", data["liver"], "--out", empty) == 0
    assert read_segment(empty, data["volume"], "SAM-Med2D")[10].any()


def test_existing_report_or_dicom_seg_of_another_kind_is_refused(data, tmp_path, capsys):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": "not a report"}')
    ct_slice = tmp_path / "slice.dcm"
    shutil.copyfile(sorted(data["series"].iterdir())[0], ct_slice)
    for option, victim, what in (
        ("--report", notes, "segment report"),
        ("--dicom-seg", ct_slice, "DICOM-SEG"),
    ):
        before = digest(victim)
        args = ["--volume", data["series"], "--include", data["liver"], "--out", tmp_path / "o.seg.nrrd"]
        assert segment(*args, option, victim) == commands.EXIT_BAD_INPUT
        line = one_error_line(capsys)
        assert option in line and f"is not a {what}" in line, line
        assert digest(victim) == before


def test_report_that_is_a_fifo_or_a_device_is_refused_and_dash_is_stdout(data, tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    specials = [fifo]
    if os.geteuid() == 0:  # a private /dev/null (character device 1,3), never the real one
        null = tmp_path / "null"
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        specials.append(null)
    out = tmp_path / "o.seg.nrrd"
    base = ["--volume", data["series"], "--include", data["liver"], "--out", out]
    for special in specials:
        kind = os.stat(special).st_mode
        assert segment(*base, "--report", special) == commands.EXIT_BAD_INPUT
        line = one_error_line(capsys)
        assert "--report" in line and ("FIFO" in line or "character device" in line), line
        assert os.stat(special).st_mode == kind and not out.exists()
    assert segment(*base, "--report", "-") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["slices_written"] == [10] and not (tmp_path / "-").exists()


def test_symlinked_out_is_written_through_to_its_target(data, existing, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    target, _ = copy_existing(existing, real)
    link = tmp_path / "link.seg.nrrd"
    link.symlink_to(target)
    assert (
        segment(
            "--volume", data["series"], "--include", data["liver"], "--segment-name", "2nd", "--out", link
        )
        == 0
    )
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert read_segment(target, data["volume"], "2nd")[10].any()  # the target has the new segment
    assert read_segment(target, data["volume"], "SAM-Med2D")[10].any()  # and keeps the old one
    assert not [p for p in real.iterdir() if files.TEMPORARY_NAME.match(p.name)]


def test_a_legal_250_byte_out_name_is_written(data, tmp_path):
    out = tmp_path / ("a" * 241 + ".seg.nrrd")
    assert len(out.name.encode()) == 250
    assert segment("--volume", data["series"], "--include", data["liver"], "--out", out) == 0
    assert read_segment(out, data["volume"], "SAM-Med2D")[10].any()


def test_leftover_temporaries_of_a_killed_run_are_removed_and_only_ours(data, existing, tmp_path):
    out, _ = copy_existing(existing, tmp_path)
    ours = [
        tmp_path / ".liver.seg.nrrd.0123456789ab.tmp.seg.nrrd",
        tmp_path / "..liver.seg.nrrd.aaaaaaaaaaaa.tmp.seg.nrrd.bbbbbbbbbbbb.tmp.seg.nrrd",  # nested, as found
        tmp_path / ".report.json.cccccccccccc.tmp",
    ]
    theirs = [
        tmp_path / ".notes.tmp",
        tmp_path / "liver.seg.nrrd.0123456789ab.tmp",
        tmp_path / ".x.12345.tmp",
    ]
    for path in [*ours, *theirs]:
        path.write_bytes(b"half-written")
    live = files.OutputSet()  # a concurrent run's temporary file, still being written
    held = live.path(tmp_path / "other.seg.nrrd", suffix=".tmp.seg.nrrd")
    try:
        args = ["--volume", data["series"], "--include", data["liver"], "--segment-name", "2nd", "--out", out]
        assert segment(*args) == 0
        assert not any(p.exists() for p in ours)
        assert all(p.exists() for p in theirs) and held.exists()
    finally:
        live.discard()


def test_a_writer_given_a_temporary_file_writes_it_directly_never_a_temporary_of_it(tmp_path):
    with files.commit_outputs() as outputs:
        temporary = outputs.path(tmp_path / "case.seg.nrrd", suffix=".tmp.seg.nrrd")
        with files.atomic_path(temporary, suffix=".tmp.seg.nrrd") as inner:
            assert inner == temporary
            inner.write_bytes(b"x")
    assert (tmp_path / "case.seg.nrrd").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.seg.nrrd"]


def test_sighup_is_handled_like_sigterm(data, existing, tmp_path):
    out, dcm = copy_existing(existing, tmp_path)
    before = snapshot(tmp_path)
    args = ["segment", "--volume", data["series"], "--include", data["liver"], "--segment-name", "2nd",
            "--propagate", "none", "--out", out, "--dicom-seg", dcm]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", HARNESS, *map(str, args)], env=_env(tmp_path.parent, MOMENT="predicting"),
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = []
    while line := proc.stderr.readline():
        lines.append(line)
        if line.startswith("MOMENT"):
            proc.send_signal(signal.SIGHUP)
            break
    err = "".join(lines) + proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert err.strip().splitlines()[-1] == "interrupted; nothing written", err
    assert snapshot(tmp_path) == before


def test_finetune_never_replaces_an_earlier_runs_best_weights(tmp_path, capsys):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    best = out_dir / "best.safetensors"  # an earlier run's best weights; its last.safetensors is gone
    best.write_bytes(safetensors_save({"w": torch.ones(2)}, metadata={"format": MODEL_FORMAT}))
    earlier = best.read_bytes()
    ct = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(LABELS)), str(ct))
    for resume in ([], ["--resume"]):
        status = commands.main(["finetune", "--quiet", "--image", str(ct), "--labels", str(LABELS),
                                "--steps", "1", "--out-dir", str(out_dir), *resume])  # fmt: skip
        assert status == commands.EXIT_BAD_INPUT
        line = one_error_line(capsys)
        assert "best.safetensors" in line and "not replaced" in line, line
    assert best.read_bytes() == earlier


def test_module_export_refuses_a_ct_slice_or_any_file_not_a_dicom_seg(data, tmp_path, monkeypatch):
    from SAMMed2DSegmentLib.mrml import create_headless_scene, dicom_database
    from SAMMed2DSegmentLib.mrml.panel import PanelModel, PanelParameters

    database = tmp_path / "database"  # the DICOM database's copies of the series
    shutil.copytree(data["series"], database)
    imported = sorted(data["series"].iterdir())  # the folder the user imported from
    started = []

    class Controller:
        busy = False
        model = {"sha256": "ab" * 32}

        def start_export(self, *args, **kwargs) -> None:
            started.append(args)

    panel = PanelModel(create_headless_scene(), Controller, lambda download: None)
    panel._export_problem = lambda p: ""
    monkeypatch.setattr(dicom_database, "source_files", lambda volume, db: sorted(database.iterdir()))
    p = PanelParameters()
    for victim in (imported[3], sorted(database.iterdir())[3]):
        before = digest(victim)
        assert panel.export_dicom_seg(p, str(victim)) is False
        message = panel.activity.dialogs[-1].message
        assert victim.name in message and ("not a DICOM-SEG" in message or "same file" in message), message
        assert digest(victim) == before
    assert not started
    assert panel.export_dicom_seg(p, str(tmp_path / "new.dcm")) is True and len(started) == 1


# -- 2. updates are merges, serialised ----------------------------------------------------------------------


def test_convert_onto_an_existing_seg_nrrd_adds_the_segments_and_keeps_the_others(data, existing, tmp_path):
    out, _ = copy_existing(existing, tmp_path)  # holds "SAM-Med2D" (a hand-edited segment, say)
    liver = read_segment(out, data["volume"], "SAM-Med2D")
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other_dcm = other_dir / "other.dcm"
    assert segment("--volume", data["series"], "--include", data["liver"], "--segment-name", "Other",
                   "--out", other_dir / "o.seg.nrrd", "--dicom-seg", other_dcm) == 0  # fmt: skip
    status = commands.main(["convert", "--quiet", "--dicom-seg", str(other_dcm),
                            "--volume", str(data["series"]), "--out", str(out)])  # fmt: skip
    assert status == 0
    assert np.array_equal(read_segment(out, data["volume"], "SAM-Med2D"), liver)
    assert read_segment(out, data["volume"], "Other")[10].any()


def test_two_concurrent_segment_runs_on_one_file_both_keep_their_segment(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "shared.seg.nrrd"
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "SAMMed2DSegmentLib",
                "segment",
                "--quiet",
                "--propagate",
                "none",
                "--volume",
                str(repo / "Testing/Data/totalseg-example-ct/ct"),
                "--include",
                str(repo / "demo/liver-point.mrk.json"),
                "--segment-name",
                name,
                "--out",
                str(out),
            ],
            env=_env(tmp_path),
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name in ("First", "Second")
    ]
    for run in runs:
        err = run.communicate(timeout=300)[1]
        assert run.returncode == 0, err
    volume = repo / "Testing/Data/totalseg-example-ct/ct"
    assert read_segment(out, volume, "First").any() and read_segment(out, volume, "Second").any()


def test_the_lock_makes_a_second_updater_wait(tmp_path):
    target = tmp_path / "x.seg.nrrd"
    lock = tmp_path / files.lock_name(target)
    waited = []
    with files.locked(lock):
        probe = subprocess.run(
            [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
             "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(lock)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert probe.returncode != 0 and "BlockingIOError" in probe.stderr
    with files.locked(lock, on_wait=lambda: waited.append(1)):
        pass
    assert not waited


def test_an_empty_mask_is_never_written_whatever_its_predicted_iou():
    result = PropagationResult()
    empty, liver = np.zeros((4, 4), bool), np.eye(4, dtype=bool)
    result.slices[3] = SliceOutcome(3, "prompted", 0.9, 0.9, 0, mask=empty)
    result.slices[4] = SliceOutcome(4, "propagated", 0.9, 0.9, 4, mask=liver)
    assert list(result.masks()) == [4]


def test_a_degenerate_roi_is_refused_at_input(data, tmp_path, capsys):
    roi = write_roi(tmp_path / "thin.mrk.json", data["liver_lps"], [1e-9, 80.0, 40.0])
    out = tmp_path / "o.seg.nrrd"
    status = segment("--volume", data["series"], "--roi", roi, "--iou-threshold", "0.4", "--out", out)
    assert status == commands.EXIT_BAD_INPUT
    line = one_error_line(capsys)
    assert "degenerate" in line, line
    assert not out.exists()
    # A flat ROI across the slices (as placed in a slice view) still prompts its slice.
    geometry = SliceGeometry.create((5, 10, 10), np.eye(4), "axial")
    assert list(roi_slices(RoiPrompt((4.0, 4.0, 2.0), np.eye(3), (5.0, 5.0, 0.0)), geometry)) == [2]
    with pytest.raises(PromptError, match="degenerate"):
        roi_slices(RoiPrompt((4.0, 4.0, 2.0), np.eye(3), (1e-9, 5.0, 3.0)), geometry)


def test_waiting_is_bounded_by_the_other_run_not_forever(tmp_path):
    """The lock is released when its holder ends, even when it is killed."""
    lock = tmp_path / ".x.seg.nrrd.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import pathlib, sys, time; from SAMMed2DSegmentLib import files\n"
         "with files.locked(pathlib.Path(sys.argv[1])):\n print('held', flush=True); time.sleep(60)",
         str(lock)], env=_env(tmp_path), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    start = time.monotonic()
    with files.locked(lock):
        pass
    assert time.monotonic() - start < 5

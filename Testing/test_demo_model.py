"""The shipped demo model: present and unaltered, and it segments the liver of the bundled DICOM CT (a patient
it was not trained on) from one include point, propagated through the volume, through the command line's
default model — the same run as `make demo`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SAMMed2DSegmentLib import commands
from SAMMed2DSegmentLib.formats.volumes import read_volume
from SAMMed2DSegmentLib.mrml.segmentations import read_segments_on_grid
from SAMMed2DSegmentLib.weights import registry as weights
from SAMMed2DSegmentLib.weights.checkpoint import load_model, sha256_file

from .liver_agreement import CT, LIVER

REPO = Path(__file__).resolve().parents[1]
PROMPT = REPO / "demo" / "liver-point.mrk.json"
# Measured 0.754 with the shipped model, version 4 (MODEL_CARD.md; version 3 gave 0.630); the threshold
# leaves room for the last digits of floating-point arithmetic on other CPUs, not for a different model.
LIVER_DICE_MIN = 0.72
ENTRY = weights.REGISTRY["demo"]


def liver_dice(seg_path: Path) -> float:
    volume = read_volume(CT / "ct")
    predicted = dict(read_segments_on_grid(seg_path, volume.array_kji, volume.ijk_to_ras))["liver"]
    labels = read_volume(CT / "labels" / "labels_on_ct_grid.nrrd")
    np.testing.assert_allclose(labels.ijk_to_ras, volume.ijk_to_ras, atol=1e-3)
    truth = labels.array_kji == LIVER
    return 2 * float((predicted & truth).sum()) / float(predicted.sum() + truth.sum())


def test_the_demo_model_is_shipped_unaltered():
    assert ENTRY.bundled is not None and ENTRY.bundled.is_file(), "the bundled demo model is missing"
    assert ENTRY.sha256, "the registry must pin the demo model's SHA-256"
    assert sha256_file(ENTRY.bundled) == ENTRY.sha256
    assert ENTRY.bundled.stat().st_size <= 25 * 2**20
    model, info = load_model(weights.resolve_model("demo"))
    assert info.build == ENTRY.build == "small"


def test_an_altered_demo_model_is_refused(tmp_path, monkeypatch):
    altered = tmp_path / ENTRY.filename
    data = bytearray(ENTRY.bundled.read_bytes())
    data[-1] ^= 0xFF
    altered.write_bytes(bytes(data))
    monkeypatch.setitem(
        weights.REGISTRY, "demo", weights.ModelEntry(**{**ENTRY.__dict__, "bundled": altered})
    )
    with pytest.raises(weights.WeightsError, match="altered or damaged"):
        weights.resolve_model("demo")
    altered.unlink()
    with pytest.raises(weights.WeightsError, match="missing"):
        weights.resolve_model("demo")


def test_liver_from_one_point_with_propagation(tmp_path):
    out, report = tmp_path / "liver.seg.nrrd", tmp_path / "report.json"
    argv = ["segment", "--volume", str(CT / "ct"), "--include", str(PROMPT), "--segment-name", "liver"]
    code = commands.main([*argv, "--out", str(out), "--report", str(report), "--quiet"])
    assert code == 0
    rep = json.loads(report.read_text())
    assert rep["model"]["sha256"] == ENTRY.sha256
    assert len(rep["slices_written"]) >= 15, rep["slices"]
    assert liver_dice(out) >= LIVER_DICE_MIN


def test_unknown_or_missing_models_are_clear_errors(tmp_path, capsys):
    base = [
        "segment",
        "--volume",
        str(CT / "ct"),
        "--include",
        str(PROMPT),
        "--out",
        str(tmp_path / "o.seg.nrrd"),
    ]
    assert commands.main([*base, "--model", "no-such-model"]) == 2
    assert "neither a model name" in capsys.readouterr().err
    monkey_cache = tmp_path / "cache"
    monkey_cache.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAMMED2D_CACHE_DIR", str(monkey_cache))
        assert commands.main([*base, "--model", "sam-med2d_b"]) == 2
    err = capsys.readouterr().err
    assert "not downloaded yet" in err and len(err.strip().splitlines()) == 1
    assert not any(p.name.endswith(".seg.nrrd") for p in tmp_path.iterdir())


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_writes_every_output(tmp_path):
    """`make demo` end to end (the venv exists when the suite runs through `make test`)."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip("runs only inside the project's .venv, as `make test` does")
    result = subprocess.run(["make", "-s", "demo", f"DEMO_OUT={tmp_path}"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("liver.seg.nrrd", "liver-seg.dcm", "report.json", "overview.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    dice = json.loads((tmp_path / "overview.dice.json").read_text())["dice_3d"]
    assert dice >= LIVER_DICE_MIN
    assert f"{dice:.3f}" in result.stdout
    png = sitk.ReadImage(str(tmp_path / "overview.png"))
    assert png.GetNumberOfComponentsPerPixel() == 3
    assert np.asarray(sitk.GetArrayFromImage(png)).std() > 10

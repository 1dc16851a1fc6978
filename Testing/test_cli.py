"""The headless command line end to end on the real CT with the real (small, synthetic-weight) network:
outputs, updating an existing file, invariance to voxel storage order, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMMed2DSegmentLib import commands
from SAMMed2DSegmentLib.engine.geometry import SliceGeometry
from SAMMed2DSegmentLib.formats.volumes import ijk_to_ras_from_itk, read_volume
from SAMMed2DSegmentLib.mrml import scene, segmentations, volumes

from .synthetic_weights import synthetic_state_dict

CT = Path(__file__).parent / "Data" / "totalseg-example-ct"
DICOM = CT / "ct"
LABELS = CT / "labels" / "labels_on_ct_grid.nrrd"
LIVER = 5
SCHEMA = "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#"


def write_points(path: Path, points_lps: list, system: str = "LPS", status: str = "defined") -> Path:
    cps = [
        {
            "id": str(n),
            "label": f"p{n}",
            "position": list(map(float, p)),
            "positionStatus": status,
            "visibility": True,
        }
        for n, p in enumerate(points_lps)
    ]
    path.write_text(
        json.dumps(
            {
                "@schema": SCHEMA,
                "markups": [{"type": "Fiducial", "coordinateSystem": system, "controlPoints": cps}],
            }
        )
    )
    return path


def write_roi(path: Path, center_lps, size) -> Path:
    """An axis-aligned ROI as Slicer saves it (the centre is also its one control point)."""
    identity = [1.0, 0, 0, 0, 1, 0, 0, 0, 1]
    point = {
        "id": "1",
        "label": "R-1",
        "position": list(center_lps),
        "positionStatus": "defined",
        "orientation": identity,
    }
    roi = {
        "type": "ROI",
        "roiType": "Box",
        "coordinateSystem": "LPS",
        "center": list(center_lps),
        "size": list(size),
        "orientation": identity,
        "controlPoints": [point],
    }
    path.write_text(json.dumps({"@schema": SCHEMA, "markups": [roi]}))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt = root / "small.pth"
    torch.save(synthetic_state_dict("small"), ckpt)
    labels = sitk.ReadImage(str(LABELS))
    arr = sitk.GetArrayFromImage(labels)
    k = 10
    ys, xs = np.nonzero(arr[k] == LIVER)
    order = np.argsort((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2)
    i, j = int(xs[order[0]]), int(ys[order[0]])
    liver_lps = labels.TransformIndexToPhysicalPoint((i, j, k))
    include = write_points(root / "include.mrk.json", [liver_lps])
    return {"root": root, "ckpt": ckpt, "include": include, "liver_lps": liver_lps, "voxel": (i, j, k)}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMMED2D_CACHE_DIR", str(tmp_path / "cache"))


def run(args: list[str]) -> int:
    return commands.main(["segment", "--quiet", *args])


def base_args(env, volume=DICOM, **extra) -> list[str]:
    args = [
        "--volume",
        str(volume),
        "--include",
        str(env["include"]),
        "--checkpoint",
        str(env["ckpt"]),
        "--iou-threshold",
        "0",
    ]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def read_segment(path: Path, volume_path: Path, name: str) -> np.ndarray:
    """A segment of a .seg.nrrd on a volume's grid, through Slicer's own classes."""
    hs = scene.create_headless_scene()
    node = volumes.load_volume(hs, volume_path) if volume_path.is_file() else None
    if node is None:
        v = read_volume(volume_path)
        node = volumes.add_volume_from_array(hs, v.array_kji, v.ijk_to_ras, "v")
    seg = segmentations.load_segmentation(hs, path)
    segment_id = seg.GetSegmentation().GetSegmentIdBySegmentName(name)
    assert segment_id, f"no segment {name!r}"
    return segmentations.segment_array(seg, segment_id, node)


def test_segment_writes_seg_nrrd_and_report(env, tmp_path):
    out, report = tmp_path / "out.seg.nrrd", tmp_path / "report.json"
    assert run(base_args(env, out=out, report=report, segment_name="liver")) == 0
    rep = json.loads(report.read_text())
    assert rep["seed_slices"] and rep["slices"] and rep["walks"]
    for entry in rep["slices"]:
        assert {"index", "status", "predicted_iou", "area_px", "reason"} <= set(entry)
    assert all(w["stopped_because"] for w in rep["walks"])
    assert {"read_volume_s", "load_model_s", "propagation_s", "write_s", "total_s"} <= set(rep["timings"])
    assert rep["model"]["build"] == "small" and len(rep["model"]["sha256"]) == 64
    mask = read_segment(out, DICOM, "liver")
    assert mask.shape == (20, 512, 512)
    written = sorted(set(np.nonzero(mask.any(axis=(1, 2)))[0].tolist()))
    assert written == rep["slices_written"] or set(written) <= set(rep["slices_written"])
    meta = segmentations.read_segmentation_metadata(out)
    assert meta["ModelSHA256"] == rep["model"]["sha256"] and "points_ras" in meta["Prompts"]


def test_existing_file_is_updated_not_replaced(env, tmp_path):
    out = tmp_path / "case.seg.nrrd"
    hs = scene.create_headless_scene()
    v = read_volume(DICOM)
    node = volumes.add_volume_from_array(hs, v.array_kji, v.ijk_to_ras, "ct")
    seg = segmentations.ensure_segmentation(hs, node)
    other = segmentations.ensure_segment(seg, "Other")
    liver = segmentations.ensure_segment(seg, "SAM-Med2D")
    g = SliceGeometry.create(v.array_kji.shape, v.ijk_to_ras, "axial")
    block = np.zeros(g.slice_shape, bool)
    block[10:40, 10:40] = True
    segmentations.write_segment_slices(seg, other, node, g, {i: block for i in range(g.num_slices)})
    segmentations.write_segment_slices(seg, liver, node, g, {0: block, 19: block})  # far from the prompt
    segmentations.save_segmentation(seg, out)
    before_other = read_segment(out, DICOM, "Other")
    before_liver = read_segment(out, DICOM, "SAM-Med2D")

    report = tmp_path / "r.json"
    assert run(base_args(env, out=out, report=report, propagate="none")) == 0
    after_other = read_segment(out, DICOM, "Other")
    after_liver = read_segment(out, DICOM, "SAM-Med2D")
    np.testing.assert_array_equal(after_other, before_other)
    written = json.loads(report.read_text())["slices_written"]
    assert written == [10]
    untouched = [k for k in range(20) if k not in written]
    np.testing.assert_array_equal(after_liver[untouched], before_liver[untouched])
    assert after_liver[10].any()


def test_interrupted_write_leaves_old_file(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "keep.seg.nrrd"
    assert run(base_args(env, out=out, propagate="none")) == 0
    before = out.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")

    # Fails after Slicer has written the new file's data, while its header is being completed.
    monkeypatch.setattr(segmentations, "_add_header_fields", broken)
    capsys.readouterr()
    assert run(base_args(env, out=out, propagate="none", segment_name="second")) == commands.EXIT_WRITE_FAILED
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: cannot write the outputs (disk full (simulated)); nothing written"
    ]
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if "keep" in p.name) == ["keep.seg.nrrd"]


def _physical_mask(seg_path: Path, reference: sitk.Image) -> np.ndarray:
    """The output segmentation resampled (nearest, exact on a shared lattice) onto a reference grid."""
    hs = scene.create_headless_scene()
    node = volumes.add_volume_from_array(
        hs, sitk.GetArrayFromImage(reference), ijk_to_ras_from_itk(reference), "ref"
    )
    seg = segmentations.load_segmentation(hs, seg_path)
    segment_id = seg.GetSegmentation().GetNthSegmentID(0)
    return segmentations.segment_array(seg, segment_id, node)


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_voxel_order_does_not_change_the_segmentation(env, tmp_path, axis):
    """Flipping/permuting the voxel axes of the volume file, with the same physical geometry, gives the same
    segmentation in physical space, exactly, whatever the weights."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(DICOM)))
    ct = reader.Execute()
    variants = {
        "plain": ct,
        "flipped": sitk.Flip(ct, [True, False, True]),
        "permuted": sitk.PermuteAxes(sitk.Flip(ct, [False, True, False]), [2, 0, 1]),
    }
    masks = {}
    for name, image in variants.items():
        path = tmp_path / f"{name}.nrrd"
        sitk.WriteImage(image, str(path))
        out = tmp_path / f"{name}.seg.nrrd"
        assert run(base_args(env, volume=path, out=out, axis=axis)) == 0
        masks[name] = _physical_mask(out, ct)
    assert masks["plain"].any()
    np.testing.assert_array_equal(masks["flipped"], masks["plain"])
    np.testing.assert_array_equal(masks["permuted"], masks["plain"])


def test_python_dash_m_entry_point(env, tmp_path):
    out = tmp_path / "m.seg.nrrd"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "SAMMed2DSegmentLib",
            "segment",
            "--quiet",
            *base_args(env, out=out, propagate="none"),
            "--precision",
            "int8",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "SAMMED2D_CACHE_DIR": str(tmp_path / "c")},
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    assert "deprecated" not in proc.stderr  # torch's notice on the quantized dtypes (model/int8_linear.py)


@pytest.mark.parametrize("flags", [[], ["-P"]])
def test_files_in_the_working_folder_are_never_imported(env, tmp_path, flags):
    """`python -m` puts the working folder first on `sys.path`: a `numpy.py`, `torch.py` or `SimpleITK.py`
    lying there is not imported (the package takes the folder off before importing anything), and with the
    README's `-P` not even a copy of this package there is."""
    folder = tmp_path / "work"
    folder.mkdir()
    planted = "raise SystemExit('imported from the working folder')\n"
    for name in ("numpy", "torch", "SimpleITK", "safetensors"):
        (folder / f"{name}.py").write_text(planted)
    if flags:
        (folder / "SAMMed2DSegmentLib").mkdir()
        (folder / "SAMMed2DSegmentLib" / "__init__.py").write_text(planted)
        (folder / "SAMMed2DSegmentLib" / "__main__.py").write_text(planted)
    out = tmp_path / "m.seg.nrrd"
    library = Path(__file__).resolve().parents[1] / "SAMMed2DSegment"
    proc = subprocess.run(
        [sys.executable, *flags, "-m", "SAMMed2DSegmentLib", "segment", "--quiet",
         *base_args(env, out=out, propagate="none")],
        cwd=folder, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(library), "SAMMED2D_CACHE_DIR": str(tmp_path / "c")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "working folder" not in proc.stderr and out.is_file()


# -- bad input: exit status ≠ 0, one clear line, nothing written ------------------------------------------


def _bad_volumes(tmp: Path) -> dict[str, Path]:
    garbage = tmp / "garbage.nrrd"
    garbage.write_bytes(b"NRRD0004\nthis is not a volume\n")
    four_d = tmp / "fourd.nrrd"
    sitk.WriteImage(sitk.Image([8, 8, 8, 3], sitk.sitkInt16), str(four_d))
    rgb = tmp / "rgb.nrrd"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3), str(rgb))
    single = tmp / "single.nrrd"
    sitk.WriteImage(sitk.Image([16, 16, 1], sitk.sitkInt16), str(single))
    volumes = {"missing": tmp / "nope.nrrd", "garbage": garbage, "4-D": four_d, "RGB": rgb, "single": single}
    noise = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 1000, (30, 64, 64), np.int16))
    for case, name in (("truncated nii.gz", "cut.nii.gz"), ("truncated gzip nrrd", "cut.nrrd")):
        whole = tmp / f"whole-{name}"
        sitk.WriteImage(noise, str(whole), useCompression=True)
        data = whole.read_bytes()
        volumes[case] = tmp / name
        volumes[case].write_bytes(data[: len(data) * 2 // 3])  # a copy cut short
    return volumes


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file"),
        ("garbage", "cannot read"),
        ("4-D", "3-D"),
        ("RGB", "RGB"),
        ("single", "single-slice"),
        ("truncated nii.gz", "damaged or truncated"),
        ("truncated gzip nrrd", "cannot read volume"),
        ("empty markups", "no prompt"),
        ("unplaced markups", "no prompt"),
        ("point outside", "outside the volume"),
        ("roi outside", "outside the volume"),
        ("missing checkpoint", "no such file"),
        ("bad out name", ".seg.nrrd"),
        ("missing out folder", "does not exist"),
        ("out name not UTF-8", "not valid UTF-8"),
    ],
)
def test_bad_input(env, tmp_path, capsys, case, message):
    out = tmp_path / "bad.seg.nrrd"
    report = tmp_path / "bad.json"
    args = base_args(env, out=out, report=report)
    volumes_ = _bad_volumes(tmp_path)
    if case in volumes_:
        args[1] = str(volumes_[case])
    elif case == "empty markups":
        args[3] = str(write_points(tmp_path / "empty.mrk.json", []))
    elif case == "unplaced markups":
        args[3] = str(write_points(tmp_path / "unplaced.mrk.json", [env["liver_lps"]], status="undefined"))
    elif case == "point outside":
        args[3] = str(write_points(tmp_path / "far.mrk.json", [(0.0, 0.0, 500.0)]))
    elif case == "roi outside":
        args += ["--roi", str(write_roi(tmp_path / "roi.mrk.json", (0.0, 0.0, 900.0), (10, 10, 10)))]
    elif case == "missing checkpoint":
        args[5] = str(tmp_path / "none.pth")
    elif case == "bad out name":
        out = tmp_path / "bad.nrrd"
        args[args.index("--out") + 1] = str(out)
    elif case == "missing out folder":
        out = tmp_path / "no" / "such" / "out.seg.nrrd"
        args[args.index("--out") + 1] = str(out)
    elif case == "out name not UTF-8":
        out = Path(os.fsdecode(bytes(tmp_path / "bad") + b"\xff.seg.nrrd"))
        args[args.index("--out") + 1] = str(out)
    assert run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists() and not report.exists()


def test_unknown_axis_is_refused(env, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(base_args(env, out=tmp_path / "x.seg.nrrd", axis="oblique"))
    assert exc.value.code != 0
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "x.seg.nrrd").exists()


def test_roi_alone_prompts_and_bounds_the_result(env, tmp_path):
    out, report = tmp_path / "roi.seg.nrrd", tmp_path / "roi.json"
    center = env["liver_lps"]
    roi = write_roi(tmp_path / "box.mrk.json", center, (60.0, 50.0, 9.0))  # 9 mm: slices 8..12 at 2 mm
    args = [
        "--volume",
        str(DICOM),
        "--roi",
        str(roi),
        "--checkpoint",
        str(env["ckpt"]),
        "--iou-threshold",
        "0",
    ]
    assert run([*args, "--out", str(out), "--report", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert rep["seed_slices"] == [10]
    assert set(rep["slices_written"]) <= set(range(8, 13))
    mask = read_segment(out, DICOM, "SAM-Med2D")
    i, j, _ = env["voxel"]
    ys, xs = np.nonzero(mask.any(axis=0))
    # Inside the ROI's in-plane extent (60 × 50 mm at 0.977 mm pixels), give or take a pixel.
    assert xs.min() >= i - 31.5 and xs.max() <= i + 31.5 and ys.min() >= j - 26.5 and ys.max() <= j + 26.5


def test_dicom_seg_output_matches_the_seg_nrrd(env, tmp_path):
    from SAMMed2DSegmentLib.formats.dicom.seg_read import read_dicom_seg
    from SAMMed2DSegmentLib.formats.dicom.series import read_series_datasets

    out, dcm = tmp_path / "case.seg.nrrd", tmp_path / "case.dcm"
    assert run(base_args(env, out=out, dicom_seg=dcm, segment_name="Liver")) == 0
    masks = read_dicom_seg(dcm, read_series_datasets(DICOM))
    np.testing.assert_array_equal(masks["Liver"], read_segment(out, DICOM, "Liver"))
    errors = subprocess.run(
        [str(Path(sys.executable).parent / "dciodvfy"), str(dcm)], capture_output=True, text=True
    )
    assert not [line for line in (errors.stdout + errors.stderr).splitlines() if line.startswith("Error")]


def test_dicom_seg_needs_a_dicom_source(env, tmp_path, capsys):
    volume = tmp_path / "ct.nrrd"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(DICOM)))
    sitk.WriteImage(reader.Execute(), str(volume))
    out, dcm = tmp_path / "x.seg.nrrd", tmp_path / "x.dcm"
    assert run(base_args(env, volume=volume, out=out, dicom_seg=dcm)) == 2
    assert "DICOM series" in capsys.readouterr().err
    assert not out.exists() and not dcm.exists()


def test_provenance_in_the_seg_nrrd_and_the_dicom_seg(env, tmp_path):
    """Per-slice confidence and the prompts go into both files; the SEG carries the points in LPS (the
    markups file's own frame here); updating a file keeps the provenance of its other segments."""
    import pydicom

    from SAMMed2DSegmentLib.formats.dicom.seg_read import read_dicom_seg_provenance
    from SAMMed2DSegmentLib.formats.provenance import parse_algorithm_parameters

    out, dcm, report = tmp_path / "case.seg.nrrd", tmp_path / "case.dcm", tmp_path / "r.json"
    assert run(base_args(env, out=out, segment_name="Liver")) == 0
    assert (
        run(base_args(env, out=out, dicom_seg=dcm, report=report, segment_name="Liver 2", axis="coronal"))
        == 0
    )

    first, second = segmentations.read_segmentation_provenance(out)
    assert (first.segment, first.axis, second.segment, second.axis) == (
        "Liver",
        "axial",
        "Liver 2",
        "coronal",
    )
    rep = json.loads(report.read_text())
    assert [(s.index, s.status, s.confidence, s.predicted_iou) for s in second.slices] == [
        (s["index"], s["status"], s["confidence"], s["predicted_iou"]) for s in rep["slices"]
    ]
    assert second.model_sha256 == rep["model"]["sha256"]
    assert second.window == (rep["window"]["low"], rep["window"]["high"])
    assert second.window_method == rep["window"]["method"] and second.window_method.startswith("SA-Med2D-20M")
    x, y, z = env["liver_lps"]
    assert second.points_ras[0].position == pytest.approx((-x, -y, z), abs=1e-9)

    from_seg = read_dicom_seg_provenance(dcm)
    assert set(from_seg) == {"Liver", "Liver 2"}
    assert from_seg["Liver 2"].slices == second.slices and from_seg["Liver"].slices == first.slices
    assert from_seg["Liver 2"].points_ras[0].position == pytest.approx((-x, -y, z), abs=1e-4)
    items = {item.SegmentLabel: item for item in pydicom.dcmread(dcm).SegmentSequence}
    params = parse_algorithm_parameters(
        items["Liver 2"].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    )
    sign, *lps = params["points_lps"].split()
    assert sign == "+" and [float(v) for v in lps] == pytest.approx([x, y, z], abs=1e-4)


def test_exclude_points_alone_refine_the_segment_in_out(tmp_path, capsys):
    """The module's negative click, headless: the demo model segments the liver from the README's point;
    then one exclude point on the worst spill of slices 12-15, alone, re-segments that slice from the
    segment --out holds there (with --propagate none nothing else changes). Without that segment in --out
    the same point is one line and nothing is written."""
    from SAMMed2DSegmentLib.evaluation.clicks import deepest_point

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "liver.seg.nrrd"
    first_run = ["--volume", str(DICOM), "--include", str(repo / "demo" / "liver-point.mrk.json"),
                 "--segment-name", "liver", "--out", str(out)]  # fmt: skip
    assert run(first_run) == 0
    first = read_segment(out, DICOM, "liver")
    labels = sitk.ReadImage(str(LABELS))
    liver = sitk.GetArrayFromImage(labels) == LIVER
    spill = (first & ~liver).sum(axis=(1, 2))
    k = 12 + int(np.argmax(spill[12:16]))
    assert spill[k] > 0
    spacing = labels.GetSpacing()
    i, j = deepest_point(first[k] & ~liver[k], spacing=(spacing[1], spacing[0]))
    exclude = write_points(tmp_path / "stop.mrk.json", [labels.TransformIndexToPhysicalPoint((i, j, k))])
    refine = ["--volume", str(DICOM), "--exclude", str(exclude), "--segment-name", "liver"]
    report = tmp_path / "refine.json"
    assert run([*refine, "--out", str(out), "--report", str(report)]) == 0
    done = json.loads(report.read_text())
    assert done["slices_written"] == [k] and done["propagate"] == "none"  # a correction walks nowhere
    assert segmentations.read_segmentation_metadata(out)["Refined"] == str(k)  # named in the provenance
    fixed = read_segment(out, DICOM, "liver")
    assert first[k, j, i] and not fixed[k, j, i]  # the voxel under the point removed
    assert (fixed[k] & ~liver[k]).sum() < spill[k]
    assert (fixed[k] & first[k] & liver[k]).sum() > 0.85 * (first[k] & liver[k]).sum()  # the rest kept
    others = [n for n in range(first.shape[0]) if n != k]
    np.testing.assert_array_equal(fixed[others], first[others])
    capsys.readouterr()

    fresh = tmp_path / "fresh.seg.nrrd"
    for target, name, message in [
        (fresh, "liver", "--out fresh.seg.nrrd does not exist yet"),
        (out, "Spleen", "--out liver.seg.nrrd holds no segment 'Spleen'"),
    ]:
        before = out.read_bytes()
        assert run([*refine[:-1], name, "--out", str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"slice(s) {k} have only exclude points" in err[0] and message in err[0], err
        assert not fresh.exists() and out.read_bytes() == before
    empty = tmp_path / "empty-there.mrk.json"  # the segment, but no voxel on that slice: the engine's refusal
    write_points(empty, [labels.TransformIndexToPhysicalPoint((5, 5, k))])
    with_hole = tmp_path / "hole.seg.nrrd"
    hs = scene.create_headless_scene()
    v = read_volume(DICOM)
    node = volumes.add_volume_from_array(hs, v.array_kji, v.ijk_to_ras, "ct")
    seg = segmentations.ensure_segmentation(hs, node)
    g = SliceGeometry.create(v.array_kji.shape, v.ijk_to_ras, "axial")
    others = {n: g.view(first, n) for n in range(g.num_slices) if n != k}
    segmentations.write_segment_slices(seg, segmentations.ensure_segment(seg, "liver"), node, g, others)
    segmentations.save_segmentation(seg, with_hole)
    assert run(["--volume", str(DICOM), "--exclude", str(empty), "--segment-name", "liver",
                "--out", str(with_hole)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only exclude points and no segment there to correct" in err[0], err

"""DICOM-SEG export/import on the real 20-slice CT (Testing/Data/totalseg-example-ct).

Checked by three readers (our own, highdicom's frame positions, dcmqi's segimage2itkimage) and by dciodvfy
(dicom3tools) for conformance."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from SAMMed2DSegmentLib.formats import provenance
from SAMMed2DSegmentLib.formats.dicom import seg_read, seg_write
from SAMMed2DSegmentLib.formats.dicom import series as dseries
from SAMMed2DSegmentLib.formats.dicom.seg_write import SegmentSpec

DATA = Path(__file__).parent / "Data" / "totalseg-example-ct"
CT = DATA / "ct"
LABELS = DATA / "labels" / "labels_on_ct_grid.nrrd"
BIN = Path(sys.executable).parent
HASH = "0123456789abcdef" * 4
LIVER, SPLEEN, PANCREAS = 5, 1, 7


@pytest.fixture(scope="module")
def series() -> list[pydicom.Dataset]:
    return dseries.read_series_datasets(CT)


@pytest.fixture(scope="module")
def labels_image() -> sitk.Image:
    return sitk.ReadImage(str(LABELS))


@pytest.fixture(scope="module")
def labels_kji(labels_image, series) -> np.ndarray:
    """The label map as [k, j, i] on the sorted series; the geometry is checked, not assumed."""
    array = sitk.GetArrayFromImage(labels_image)  # SimpleITK arrays are [z, y, x] = [k, j, i]
    assert array.shape == (len(series), series[0].Rows, series[0].Columns)
    assert labels_image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    for k, ds in enumerate(series):
        corner = labels_image.TransformIndexToPhysicalPoint((0, 0, k))
        assert corner == pytest.approx([float(v) for v in ds.ImagePositionPatient], abs=1e-4)
    affine = dseries.series_affine(series)
    index = np.array([7, 11, 3, 1.0])
    assert affine @ index == pytest.approx(
        [*labels_image.TransformContinuousIndexToPhysicalPoint((7, 11, 3)), 1]
    )
    return array


@pytest.fixture(scope="module")
def segments(labels_kji) -> list[SegmentSpec]:
    return [
        SegmentSpec(
            "liver",
            labels_kji == LIVER,
            color_rgb=(0.87, 0.51, 0.40),
            category=("123037004", "SCT", "Anatomical Structure"),
            type=("10200004", "SCT", "Liver"),
        ),
        SegmentSpec("spleen", labels_kji == SPLEEN),
        SegmentSpec("pancreas", labels_kji == PANCREAS, color_rgb=(0.98, 0.84, 0.6)),
    ]


@pytest.fixture(scope="module")
def seg_path(tmp_path_factory, series, segments) -> Path:
    out = tmp_path_factory.mktemp("seg") / "seg.dcm"
    assert seg_write.write_dicom_seg(series, segments, out, model_hash=HASH) == out
    return out


def dciodvfy_errors(path: Path) -> list[str]:
    # dciodvfy quotes offending values in their own bytes: decode leniently so they show in the message.
    result = subprocess.run(
        [str(BIN / "dciodvfy"), str(path)], capture_output=True, text=True, errors="replace", timeout=60
    )
    lines = (result.stdout + result.stderr).splitlines()
    assert any(lines), "dciodvfy printed nothing"
    return [line for line in lines if line.startswith("Error")]


def only_file(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------- series reading


def test_series_is_sorted_along_the_normal(series):
    z = [float(ds.ImagePositionPatient[2]) for ds in series]
    assert len(series) == 20
    assert z == sorted(z) and z[0] == -804.5 and z[-1] == -766.5
    assert "PixelData" not in series[0]


def test_labels_fixture_has_a_structure_on_few_slices(labels_kji):
    assert np.flatnonzero((labels_kji == PANCREAS).any(axis=(1, 2))).tolist() == [0, 1, 2, 3]
    assert (labels_kji == LIVER).any(axis=(1, 2)).all()


def test_mask_convention_matches_pixel_array(series, labels_kji):
    """mask_kji[k] is on source_datasets[k].pixel_array: the liver is soft tissue, the outside is air."""
    with_pixels = dseries.read_series_datasets(CT, load_pixels=True)
    assert [ds.SOPInstanceUID for ds in with_pixels] == [ds.SOPInstanceUID for ds in series]
    k = 10
    ds = with_pixels[k]
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert 20 < np.median(hu[labels_kji[k] == LIVER]) < 200
    assert np.median(hu[:20, :20]) < -900


# ------------------------------------------------------------------------------------------- round trip


def test_round_trip_exact(seg_path, series, segments):
    back = seg_read.read_dicom_seg(seg_path, series)
    assert list(back) == [s.label for s in segments]
    for spec in segments:
        assert back[spec.label].dtype == np.bool_
        np.testing.assert_array_equal(back[spec.label], spec.mask_kji, err_msg=spec.label)


def test_header_contents(seg_path, series, segments):
    seg = pydicom.dcmread(seg_path)
    src = series[0]
    assert seg.SOPClassUID == dseries.SEG_SOP_CLASS_UID and seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    for attr in ("StudyInstanceUID", "PatientID", "PatientName", "FrameOfReferenceUID"):
        assert seg[attr].value == src[attr].value, attr
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    assert seg.SOPInstanceUID not in {ds.SOPInstanceUID for ds in series}
    labels = [item.SegmentLabel for item in seg.SegmentSequence]
    assert labels == ["liver", "spleen", "pancreas"]
    liver, spleen, _ = seg.SegmentSequence
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert spleen.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert spleen.SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "SEMIAUTOMATIC"
        assert item.SegmentAlgorithmName == "SAM-Med2D"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "SAM-Med2D" and algo.AlgorithmVersion
        assert f"checkpoint_sha256={HASH}" in algo.AlgorithmParameters
        assert len(item.RecommendedDisplayCIELabValue) == 3
    rgb = hd.color.CIELabColor.from_dicom_value(liver.RecommendedDisplayCIELabValue).to_rgb()
    assert np.allclose(rgb, (0.87 * 255, 0.51 * 255, 0.40 * 255), atol=2)


def test_empty_frames_are_omitted(seg_path, segments):
    seg = pydicom.dcmread(seg_path)
    expected = sum(int(s.mask_kji.any(axis=(1, 2)).sum()) for s in segments)
    assert int(seg.NumberOfFrames) == expected
    pancreas_frames = [
        f
        for f in seg.PerFrameFunctionalGroupsSequence
        if f.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 3
    ]
    assert len(pancreas_frames) == 4


def test_every_frame_references_its_source_at_its_position(seg_path, series):
    by_uid = {ds.SOPInstanceUID: ds for ds in series}
    seg = hd.seg.segread(seg_path)
    assert seg.number_of_frames > 0
    for frame in seg.PerFrameFunctionalGroupsSequence:
        refs = frame.DerivationImageSequence[0].SourceImageSequence
        assert len(refs) == 1
        source = by_uid[refs[0].ReferencedSOPInstanceUID]
        assert refs[0].ReferencedSOPClassUID == source.SOPClassUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in source.ImagePositionPatient], abs=1e-6)
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert referenced == set(by_uid)


def test_dciodvfy_reports_no_errors(seg_path):
    assert dciodvfy_errors(seg_path) == []


def test_dcmqi_reads_the_same_voxels_on_the_ct_grid(seg_path, tmp_path, labels_image, segments):
    out = tmp_path / "dcmqi"
    out.mkdir()
    subprocess.run(
        [
            str(BIN / "segimage2itkimage"),
            "--inputDICOM",
            str(seg_path),
            "--outputDirectory",
            str(out),
            "-t",
            "nrrd",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    meta = json.loads((out / "meta.json").read_text())
    labels = [group[0]["SegmentLabel"] for group in meta["segmentAttributes"]]
    assert labels == [s.label for s in segments]
    for number, spec in enumerate(segments, start=1):
        image = sitk.ReadImage(str(out / f"{number}.nrrd"))
        assert image.GetSize() == labels_image.GetSize()
        assert image.GetOrigin() == pytest.approx(labels_image.GetOrigin(), abs=1e-4)
        assert image.GetSpacing() == pytest.approx(labels_image.GetSpacing(), abs=1e-6)
        assert image.GetDirection() == pytest.approx(labels_image.GetDirection(), abs=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image) != 0, spec.mask_kji, err_msg=spec.label)


def test_fractional_round_trip(tmp_path, series, segments):
    rng = np.random.default_rng(0)
    shape = segments[0].mask_kji.shape
    probabilities = [
        SegmentSpec(
            spec.label, np.where(spec.mask_kji, rng.uniform(0.6, 1, shape), rng.uniform(0, 0.4, shape))
        )
        for spec in segments[:2]
    ]
    for spec in probabilities:  # zero outside a band of slices, so some frames are empty
        spec.mask_kji = spec.mask_kji.astype(np.float32)
        spec.mask_kji[:2] = 0
    out = seg_write.write_dicom_seg(
        series, probabilities, tmp_path / "frac.dcm", model_hash=HASH, fractional=True
    )
    seg = pydicom.dcmread(out)
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    back = seg_read.read_dicom_seg(out, series)
    for spec in segments[:2]:
        expected = spec.mask_kji.copy()
        expected[:2] = False
        np.testing.assert_array_equal(back[spec.label], expected, err_msg=spec.label)
    assert int(seg.NumberOfFrames) == 2 * (len(series) - 2)
    assert dciodvfy_errors(out) == []
    values = hd.seg.segread(out).get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in series], segment_numbers=[1], assert_missing_frames_are_empty=True
    )[..., 0]
    np.testing.assert_allclose(values, probabilities[0].mask_kji, atol=1 / 255 / 2 + 1e-6)


def test_overlapping_segments_round_trip(tmp_path, series, segments):
    body = SegmentSpec("liver and spleen", segments[0].mask_kji | segments[1].mask_kji)
    out = seg_write.write_dicom_seg(series, [segments[0], body], tmp_path / "overlap.dcm", model_hash=HASH)
    back = seg_read.read_dicom_seg(out, series)
    np.testing.assert_array_equal(back["liver"], segments[0].mask_kji)
    np.testing.assert_array_equal(back["liver and spleen"], body.mask_kji)
    assert pydicom.dcmread(out).SegmentsOverlap == "YES"


def test_label_is_sanitised_and_truncated_with_a_marker(tmp_path, series, segments):
    long = "x" * 70 + "\\y"
    out = seg_write.write_dicom_seg(
        series, [SegmentSpec(long, segments[2].mask_kji)], tmp_path / "s.dcm", model_hash=HASH
    )
    label = pydicom.dcmread(out).SegmentSequence[0].SegmentLabel
    assert label == "x" * 61 + "..."  # cut, and the cut shows
    assert list(seg_read.read_dicom_seg(out, series)) == [long]  # the full label is kept in the parameters
    assert dciodvfy_errors(out) == []


def test_an_empty_segment_among_others_is_kept_without_frames(tmp_path, series, segments):
    empty = SegmentSpec("nothing", np.zeros_like(segments[2].mask_kji))
    out = seg_write.write_dicom_seg(series, [segments[2], empty], tmp_path / "s.dcm", model_hash=HASH)
    back = seg_read.read_dicom_seg(out, series)
    assert not back["nothing"].any()
    np.testing.assert_array_equal(back["pancreas"], segments[2].mask_kji)


def test_parse_slicer_terminology():
    entry = (
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
        "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
    )
    assert seg_write.parse_slicer_terminology(entry) == (
        ("123037004", "SCT", "Anatomical Structure"),
        ("10200004", "SCT", "Liver"),
    )
    assert seg_write.parse_slicer_terminology("") == (None, None)
    assert seg_write.parse_slicer_terminology("ctx~^^~^^") == (None, None)


# ------------------------------------------------------------------------------------------- header defects

OPTIONAL = (
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "Manufacturer",
    "SeriesNumber",
    "ReferringPhysicianName",
    "PatientID",
    "SliceThickness",
    "InstanceNumber",
    "Modality",
)


def _defective_copy(tmp_path: Path, edit, shuffle: bool = False) -> Path:
    folder = tmp_path / "series"
    folder.mkdir()
    files = sorted(CT.iterdir())
    names = [f"IM{n:04d}" for n in range(len(files))]
    if shuffle:
        random.Random(4).shuffle(names)
    for path, name in zip(files, names, strict=True):
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(folder / name)
    return folder


def _remove(*keywords):
    def edit(ds):
        for keyword in keywords:
            if keyword in ds:
                del ds[keyword]

    return edit


def _blank(*keywords):
    def edit(ds):
        for keyword in keywords:
            setattr(ds, keyword, None)

    return edit


def _malformed(ds):
    ds.PatientSex = "Male"
    ds.StudyDate = "2022-12-08"
    ds.PatientBirthDate = "19700231"
    ds.StudyTime = "25:99"
    ds.AccessionNumber = "A" * 20


HEADER_VARIANTS = {
    "optional-removed": _remove(*OPTIONAL),
    "optional-blank": _blank(*OPTIONAL),
    "patient-removed": _remove("PatientName", "PatientBirthDate", "PatientSex", "PatientID"),
    "study-removed": _remove(
        "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"
    ),
    "malformed-values": _malformed,
    "shuffled-names": lambda ds: None,
}


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")
@pytest.mark.parametrize("variant", sorted(HEADER_VARIANTS))
def test_header_defects_still_export(variant, tmp_path, segments):
    folder = _defective_copy(tmp_path, HEADER_VARIANTS[variant], shuffle=True)
    datasets = dseries.read_series_datasets(folder)
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert z == sorted(z)
    out = seg_write.write_dicom_seg(datasets, segments, tmp_path / "seg.dcm", model_hash=HASH)
    back = seg_read.read_dicom_seg(out, datasets)
    for spec in segments:
        np.testing.assert_array_equal(back[spec.label], spec.mask_kji, err_msg=spec.label)
    if variant in ("optional-removed", "malformed-values"):
        assert dciodvfy_errors(out) == []


# ------------------------------------------------------------------------------------------- bad input


def _series_copy(tmp_path: Path, edit_by_index) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    for n, path in enumerate(sorted(CT.iterdir())):
        ds = pydicom.dcmread(path)
        if edit_by_index(n, ds) is not False:
            ds.save_as(folder / path.name)
    return folder


def _assert_nothing_written(folder: Path, before: list[str]) -> None:
    assert only_file(folder) == before


def test_geometry_mismatch_is_refused_and_leaves_nothing(tmp_path, series, segments):
    before = only_file(tmp_path)
    wrong = SegmentSpec("liver", segments[0].mask_kji[:, :, :-1])
    with pytest.raises(ValueError, match="does not match the source series"):
        seg_write.write_dicom_seg(series, [segments[1], wrong], tmp_path / "seg.dcm", model_hash=HASH)
    _assert_nothing_written(tmp_path, before)
    shifted = dseries.series_affine(series)
    shifted[2, 3] += 2.0
    with pytest.raises(ValueError, match="geometry does not match"):
        seg_write.write_dicom_seg(
            series, segments, tmp_path / "seg.dcm", model_hash=HASH, mask_affine=shifted
        )
    _assert_nothing_written(tmp_path, before)
    out = seg_write.write_dicom_seg(
        series,
        segments[2:],
        tmp_path / "ok.dcm",
        model_hash=HASH,
        mask_affine=dseries.series_affine(series),
    )
    assert out.is_file()


def test_empty_segmentation_is_refused(tmp_path, series, segments):
    empty = np.zeros_like(segments[0].mask_kji)
    with pytest.raises(ValueError, match="empty"):
        seg_write.write_dicom_seg(series, [SegmentSpec("a", empty)], tmp_path / "seg.dcm", model_hash=HASH)
    with pytest.raises(ValueError, match="no segments"):
        seg_write.write_dicom_seg(series, [], tmp_path / "seg.dcm", model_hash=HASH)
    assert only_file(tmp_path) == []


def test_missing_output_folder_is_refused(tmp_path, series, segments):
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        seg_write.write_dicom_seg(series, segments, tmp_path / "nope" / "seg.dcm", model_hash=HASH)
    assert not (tmp_path / "nope").exists()


def test_float_mask_needs_fractional(tmp_path, series, segments):
    with pytest.raises(ValueError, match="fractional=True"):
        seg_write.write_dicom_seg(
            series,
            [SegmentSpec("p", segments[0].mask_kji.astype(float))],
            tmp_path / "s.dcm",
            model_hash=HASH,
        )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        seg_write.write_dicom_seg(
            series,
            [SegmentSpec("p", segments[0].mask_kji * 2.0)],
            tmp_path / "s.dcm",
            model_hash=HASH,
            fractional=True,
        )
    assert only_file(tmp_path) == []


def test_failure_during_write_leaves_no_partial_file(tmp_path, series, segments, monkeypatch):
    target = tmp_path / "seg.dcm"
    target.write_bytes(b"previous export")

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pydicom.Dataset, "save_as", explode)
    with pytest.raises(OSError, match="disk full"):
        seg_write.write_dicom_seg(series, segments, target, model_hash=HASH)
    assert only_file(tmp_path) == ["seg.dcm"]
    assert target.read_bytes() == b"previous export"


def test_unsorted_datasets_are_refused(tmp_path, series, segments):
    with pytest.raises(ValueError, match="not sorted"):
        seg_write.write_dicom_seg(series[::-1], segments, tmp_path / "s.dcm", model_hash=HASH)
    assert only_file(tmp_path) == []


def _tilt(n, ds):
    if n == 5:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9805807, -0.1961161]


def _gantry_tilt(n, ds):
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y + (z + 766.5) * 0.2679, z]  # 15° tilt: y moves with z


def _gap(n, ds):
    return n != 7


def _other_series(n, ds):
    if n == 3:
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()


def _no_position(n, ds):
    if n == 2:
        del ds.ImagePositionPatient


def _no_orientation(n, ds):
    if n == 2:
        del ds.ImageOrientationPatient


def _blank_study_uid(n, ds):
    ds.StudyInstanceUID = ""


def _duplicate_position(n, ds):
    if n == 4:
        ds.ImagePositionPatient = [-249.51171875, -437.51171875, -804.5 + 2.0 * 3]


BAD_SERIES = {
    "mixed orientations": (_tilt, "mixed orientations"),
    "gap": (_gap, "uneven slice spacing"),
    "gantry tilt": (_gantry_tilt, "gantry tilt"),
    "several series": (_other_series, "different SeriesInstanceUIDs"),
    "no position": (_no_position, "ImagePositionPatient"),
    "no orientation": (_no_orientation, "ImageOrientationPatient"),
    "blank study uid": (_blank_study_uid, "StudyInstanceUID"),
    "duplicate position": (_duplicate_position, "same position"),
}


@pytest.mark.parametrize("name", sorted(BAD_SERIES))
def test_bad_series_is_refused_with_a_clear_error(name, tmp_path, segments):
    edit, message = BAD_SERIES[name]
    folder = _series_copy(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        dseries.read_series_datasets(folder)
    # the writer checks the same when handed the datasets directly (e.g. from Slicer's DICOM database)
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
    datasets.sort(key=lambda ds: float(ds.get("ImagePositionPatient", [0, 0, 0])[2]))
    masks = [SegmentSpec(s.label, s.mask_kji[: len(datasets)]) for s in segments]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ValueError, match=message):
        seg_write.write_dicom_seg(datasets, masks, out_dir / "seg.dcm", model_hash=HASH)
    assert only_file(out_dir) == []


def test_missing_series_folder_and_non_dicom_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        dseries.read_series_datasets(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(ValueError, match="no DICOM images"):
        dseries.read_series_datasets(tmp_path)


def test_seg_next_to_the_series_is_ignored_and_other_files_skipped(tmp_path, seg_path, series):
    folder = tmp_path / "series"
    shutil.copytree(CT, folder)
    shutil.copy(seg_path, folder / "seg.dcm")
    (folder / "README").write_text("hello")
    datasets = dseries.read_series_datasets(folder)
    assert [ds.SOPInstanceUID for ds in datasets] == [ds.SOPInstanceUID for ds in series]


def test_read_refuses_a_seg_of_another_series(seg_path, series):
    other = [copy.deepcopy(ds) for ds in series]
    for ds in other:
        ds.FrameOfReferenceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="FrameOfReferenceUID"):
        seg_read.read_dicom_seg(seg_path, other)
    for ds in other:
        ds.FrameOfReferenceUID = series[0].FrameOfReferenceUID
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
    with pytest.raises(ValueError, match="does not reference"):
        seg_read.read_dicom_seg(seg_path, other)


# ------------------------------------------------------------------------------------------- provenance


def _provenance(n_points: int = 2, n_slices: int = 5, segment: str = "liver") -> provenance.Provenance:
    """A run as the engine records it; coordinates with at most 4 decimals survive the SEG exactly."""
    from types import SimpleNamespace as Ns

    points = [
        Ns(position=(10.25 + n, -20.5 - n, -790.0 + n / 8), label=int(n % 3 != 2)) for n in range(n_points)
    ]
    axes = np.array([[0.6, -0.8, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
    rois = [Ns(center=(1.5, -2.0, -780.0), axes=axes, size=(60.0, 50.0, 12.5))]
    statuses = ["prompted", "propagated", "rejected"]
    outcomes = [
        Ns(index=k, status=statuses[min(k, 2)], confidence=0.9 - k / 1e4, predicted_iou=0.81234 + k / 1e5)
        for k in range(n_slices)
    ]
    return provenance.build_provenance(
        points, rois, outcomes, model="SAM-Med2D vit_b", model_sha256=HASH, axis="axial", propagate="both",
        segment=segment, window=(-160.0, 240.0),
        window_method="SA-Med2D-20M rule: percentile 0.5–99.5 of all voxels",
    )  # fmt: skip


def test_provenance_round_trips_through_the_seg_in_lps(tmp_path, series, segments):
    prov = _provenance(segment="liver, left lobe = 1 ü")
    spec = SegmentSpec("liver, left lobe = 1 ü", segments[0].mask_kji, provenance=prov)
    out = seg_write.write_dicom_seg(series, [spec, segments[1]], tmp_path / "p.dcm", model_hash=HASH)

    back = seg_read.read_dicom_seg_provenance(out)
    assert back == {"liver, left lobe = 1 ü": prov}  # spleen has no provenance: left out
    seg = pydicom.dcmread(out)
    liver, spleen = seg.SegmentSequence
    text = liver.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert text.isascii() and len(text) <= provenance.MAX_LT_LENGTH
    # An independent parser (highdicom's own) reads our parameters, and the points are in LPS there.
    params = hd.AlgorithmIdentificationSequence.from_sequence(
        liver.SegmentationAlgorithmIdentificationSequence
    ).parameters
    assert params["checkpoint_sha256"] == HASH and params["frame"] == "LPS mm"
    first = prov.points_ras[0].position
    assert params["points_lps"].split(";")[0] == f"+ {-first[0]:g} {-first[1]:g} {first[2]:g}"
    assert params["slices"].startswith("0:P:0.9:0.8123;1:A:0.8999:0.8123;2:R:")
    assert (
        spleen.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
        == f"checkpoint_sha256={HASH}"
    )
    assert seg.SeriesDescription == f"SAM-Med2D segmentation, checkpoint {HASH[:12]}"
    assert seg.ContentDescription == "axial both; 2 pt 1 ROI; 2 slices conf 0.90-0.90"
    assert dciodvfy_errors(out) == []


def test_long_prompt_lists_are_cut_with_a_marker_and_stay_valid(tmp_path, series, segments):
    prov = _provenance(n_points=300, n_slices=900)
    spec = SegmentSpec("liver", segments[0].mask_kji, provenance=prov)
    out = seg_write.write_dicom_seg(series, [spec], tmp_path / "long.dcm", model_hash=HASH)

    seg = pydicom.dcmread(out)
    text = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert len(text) <= provenance.MAX_LT_LENGTH
    assert seg.ContentDescription.endswith("; parameters truncated") and len(seg.ContentDescription) <= 64
    assert dciodvfy_errors(out) == []
    back = seg_read.read_dicom_seg_provenance(out)["liver"]
    assert back.truncated.startswith("kept points ") and back.truncated.endswith("...")
    # The slice list goes first; what is kept is an exact prefix; the prompts are all there.
    assert back.points_ras == prov.points_ras and back.rois_ras == prov.rois_ras
    assert 0 < len(back.slices) < len(prov.slices) and back.slices == prov.slices[: len(back.slices)]
    assert f"slices {len(back.slices)}/900" in back.truncated


def test_prompts_are_cut_only_when_the_slices_are_gone(series, segments):
    params = _provenance(n_points=2000, n_slices=50).to_algorithm_parameters()
    assert params["slices"] == "" and 0 < len(params["points_lps"].split(";")) < 2000
    assert provenance.parameters_length(params) <= provenance.MAX_LT_LENGTH
    assert "slices 0/50" in params["truncated"] and "rois 1/1" in params["truncated"]


def test_provenance_metadata_round_trip_and_history():
    first, second = _provenance(segment="liver"), _provenance(n_points=1, segment="spleen")
    meta = second.to_metadata([first])
    assert all(isinstance(v, str) for v in meta.values()) and meta["CoordinateSystem"] == "RAS"
    assert provenance.Provenance.from_metadata(meta) == second
    assert provenance.provenance_history(meta) == [first, second]
    assert provenance.provenance_history({"something": "else"}) == []
    with pytest.raises(ValueError, match="malformed"):
        provenance.provenance_history({**meta, "Prompts": "{not json"})
    with pytest.raises(ValueError, match="malformed"):
        provenance.Provenance.from_metadata({**meta, "Slices": "3:Q:0.5:0.5"})


def test_slice_list_format():
    records = provenance.parse_slices("10:P:0.9312:0.912;11:A:0.88:0.8671;12:R:0:0.1")
    assert [r.status for r in records] == ["prompted", "propagated", "rejected"]
    assert provenance.format_slices(records) == "10:P:0.9312:0.912;11:A:0.88:0.8671;12:R:0:0.1"
    with pytest.raises(ValueError, match="unknown slice status"):
        provenance.format_slices([provenance.SliceRecord(1, "maybe", 0.5, 0.5)])


def test_provenance_records_the_precision_and_reads_files_without_it():
    prov = dataclasses.replace(_provenance(segment="liver"), precision="bf16")
    meta = prov.to_metadata()
    assert meta["Precision"] == "bf16"
    assert provenance.Provenance.from_metadata(meta) == prov
    params = prov.to_algorithm_parameters()
    assert params["precision"] == "bf16"
    assert provenance.Provenance.from_algorithm_parameters(params) == prov
    older = {k: v for k, v in meta.items() if k != "Precision"}  # a file written before the field existed
    assert provenance.Provenance.from_metadata(older).precision == ""
    assert "precision" not in _provenance().to_algorithm_parameters()  # not recorded: not written


def test_provenance_records_the_refined_slices_and_reads_files_without_them(tmp_path, series, segments):
    """Slices corrected from the segment's own mask are named in both encodings, through a real DICOM-SEG."""
    prov = dataclasses.replace(_provenance(segment="liver"), refined=(1, 13))
    meta = prov.to_metadata()
    assert meta["Refined"] == "1 13" and provenance.Provenance.from_metadata(meta) == prov
    spec = SegmentSpec("liver", segments[0].mask_kji, provenance=prov)
    out = seg_write.write_dicom_seg(series, [spec], tmp_path / "refined.dcm", model_hash=HASH)
    assert seg_read.read_dicom_seg_provenance(out) == {"liver": prov}
    older = {k: v for k, v in meta.items() if k != "Refined"}
    assert provenance.Provenance.from_metadata(older).refined == ()
    assert "refined_slices" not in _provenance().to_algorithm_parameters()


def _tiles(shape: tuple[int, int, int], count: int) -> list[tuple[slice, slice, slice]]:
    """`count` non-overlapping boxes, a TotalSegmentator-like set of structures on one volume."""
    return [(slice(2, shape[0] - 2), slice(r * 64 + 4, r * 64 + 60), slice(c * 64 + 4, c * 64 + 60))
            for r, c in (divmod(i, 8) for i in range(count))]  # fmt: skip


_MANY_SEGMENTS = """
import resource, sys, weakref
from pathlib import Path
import numpy as np
from SAMMed2DSegmentLib.formats.dicom import seg_read, seg_write, series as dseries
from SAMMed2DSegmentLib.formats.dicom.seg_write import SegmentSpec
count, out = int(sys.argv[1]), Path(sys.argv[2])
datasets = dseries.read_series_datasets(sys.argv[3])
shape = (len(datasets), datasets[0].Rows, datasets[0].Columns)
boxes = [(slice(2, shape[0] - 2), slice(r * 64 + 4, r * 64 + 60), slice(c * 64 + 4, c * 64 + 60))
         for r, c in (divmod(i, 8) for i in range(count))]
alive, most = [0], [0]
def made(box):
    mask = np.zeros(shape, dtype=bool)
    mask[box] = True
    alive[0] += 1
    most[0] = max(most[0], alive[0])
    weakref.finalize(mask, lambda: alive.__setitem__(0, alive[0] - 1))
    return mask
specs = [SegmentSpec(f"s{n}", lambda box=box: made(box)) for n, box in enumerate(boxes)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seg_write.write_dicom_seg(datasets, specs, out, model_hash="ab" * 32)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
back = seg_read.read_dicom_seg(out, datasets)
assert len(back) == count and back[f"s{count - 1}"][boxes[-1]].all()
print(grown * 1024, most[0])
"""


def _export_peak(tmp_path: Path, count: int) -> tuple[int, int]:
    """Peak memory growth (bytes, in a fresh process) of writing `count` non-overlapping segments given as
    callables, and how many of their masks were alive at once."""
    done = subprocess.run(
        [sys.executable, "-c", _MANY_SEGMENTS, str(count), str(tmp_path / f"many{count}.dcm"), str(CT)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    grown, most = done.stdout.split()
    return int(grown), int(most)


def test_many_segments_are_written_one_at_a_time_in_bounded_memory(tmp_path, series):
    """Issue 24: 117 segments of a 512x512x300 CT took 10 GB, every mask held at once. Masks given as
    callables are made one at a time, cropped, pasted into one label map and dropped: 35 more segments add
    less than half of what holding their masks would (5 MiB each here); what remains is the SEG's own
    encoded frames, which follow the output's size."""
    few, few_alive = _export_peak(tmp_path, 5)
    many, many_alive = _export_peak(tmp_path, 40)
    assert few_alive == many_alive == 1
    mask_bytes = len(series) * series[0].Rows * series[0].Columns
    assert many - few < 35 * mask_bytes / 2, (few, many)


def test_cropped_and_lazy_masks_write_the_same_voxels(tmp_path, series, segments):
    """A mask given as a block at an offset, or made by a callable, writes exactly the voxels of the whole
    mask; a block that does not fit the series is refused naming the segment."""
    liver = segments[0].mask_kji
    box = np.argwhere(liver)
    low, high = box.min(axis=0), box.max(axis=0) + 1
    block = seg_write.MaskBlock(tuple(int(v) for v in low), liver[tuple(map(slice, low, high))])
    specs = [dataclasses.replace(segments[0], mask_kji=block),
             dataclasses.replace(segments[1], mask_kji=lambda: segments[1].mask_kji)]  # fmt: skip
    out = seg_write.write_dicom_seg(series, specs, tmp_path / "c.dcm", model_hash=HASH)
    back = seg_read.read_dicom_seg(out, series)
    np.testing.assert_array_equal(back["liver"], liver)
    np.testing.assert_array_equal(back["spleen"], segments[1].mask_kji)
    moved = seg_write.MaskBlock((len(series) - 1, 0, 0), block.array)
    with pytest.raises(ValueError, match="'liver': mask shape .* does not match the source series"):
        seg_write.write_dicom_seg(series, [dataclasses.replace(segments[0], mask_kji=moved)],
                                  tmp_path / "bad.dcm", model_hash=HASH)  # fmt: skip


def test_engine_export_takes_segments_cropped_to_their_extent(tmp_path, series, segments):
    """The module sends each segment packed and cropped to its extent ("offset", "shape"); the engine
    unpacks one at a time when the writer reaches it. A segment sent whole (no offset) still works."""
    from SAMMed2DSegmentLib.service.protocol import pack_mask
    from SAMMed2DSegmentLib.service.server import EngineServer

    liver, spleen = segments[0].mask_kji, segments[1].mask_kji
    hits = np.argwhere(liver)
    low, high = hits.min(axis=0), hits.max(axis=0) + 1
    header = {
        "files": [str(p) for p in sorted(CT.iterdir())], "out": str(tmp_path / "engine.dcm"),
        "shape": list(liver.shape), "model_sha256": HASH,
        "ijk_to_ras": (np.diag([-1.0, -1.0, 1.0, 1.0]) @ dseries.series_affine(series)).tolist(),
        "segments": [
            {"label": "liver", "color": [1, 0, 0], "offset": low.tolist(), "shape": (high - low).tolist()},
            {"label": "spleen", "color": [0, 1, 0]},
        ],
    }  # fmt: skip
    arrays = {"segment_0": pack_mask(liver[tuple(map(slice, low, high))]), "segment_1": pack_mask(spleen)}
    reply = EngineServer.op_export_dicom_seg(None, 0, header, arrays)
    back = seg_read.read_dicom_seg(reply["path"], series)
    np.testing.assert_array_equal(back["liver"], liver)
    np.testing.assert_array_equal(back["spleen"], spleen)

"""DICOM as it comes from scanners, anonymisers and other tools: the real-world corpus
(Testing/Data/dicom-corpus), non-Latin segment names, series without FrameOfReferenceUID, and `convert` in
both directions (our SEGs, dcmqi's, FRACTIONAL, frames shuffled, a SEG of another series)."""

from __future__ import annotations

import copy
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from SAMMed2DSegmentLib import commands
from SAMMed2DSegmentLib.formats.dicom import headers, seg_read, seg_write
from SAMMed2DSegmentLib.formats.dicom import series as dseries
from SAMMed2DSegmentLib.formats.dicom.seg_write import SegmentSpec
from SAMMed2DSegmentLib.formats.volumes import read_volume
from SAMMed2DSegmentLib.mrml.segmentations import read_segments_on_grid

DATA = Path(__file__).parent / "Data"
CT = DATA / "totalseg-example-ct" / "ct"
LABELS = DATA / "totalseg-example-ct" / "labels" / "labels_on_ct_grid.nrrd"
CORPUS = DATA / "dicom-corpus"
BIN = Path(sys.executable).parent
HASH = "0123456789abcdef" * 4
ORGANS = {"liver": 5, "spleen": 1, "pancreas": 7}
NAMES = ["Печень", "肝臓 (かんぞう)", "Lunge 🫁 ✓"]  # Cyrillic, CJK, emoji


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(
        [str(BIN / "dciodvfy"), str(path)], capture_output=True, text=True, errors="replace", timeout=60
    )
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def dcmqi_masks(seg_path: Path, out: Path, shape: tuple, ijk_to_lps: np.ndarray) -> dict[str, np.ndarray]:
    """dcmqi's reading of a SEG, placed on our grid by each output image's own geometry."""
    out.mkdir()
    subprocess.run(
        [str(BIN / "segimage2itkimage"), "--inputDICOM", str(seg_path), "--outputDirectory", str(out),
         "-t", "nrrd"], check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    inverse = np.linalg.inv(ijk_to_lps)
    masks = {}
    for number, group in enumerate(meta["segmentAttributes"], start=1):
        image = sitk.ReadImage(str(out / f"{number}.nrrd"))
        array = sitk.GetArrayFromImage(image) != 0
        origin = inverse @ np.asarray([*image.GetOrigin(), 1.0])
        offset = np.round(origin[:3]).astype(int)
        assert np.allclose(origin[:3], offset, atol=1e-3), "dcmqi's image is not on our grid"
        placed = np.zeros(shape, dtype=bool)
        i, j, k = offset
        placed[k : k + array.shape[0], j : j + array.shape[1], i : i + array.shape[2]] = array
        masks[group[0]["SegmentLabel"]] = placed
    return masks


def seg_nrrd_segments(path: Path, volume) -> dict[str, np.ndarray]:
    return dict(read_segments_on_grid(path, volume.array_kji, volume.ijk_to_ras))


def seg_nrrd_header(path: Path) -> str:
    return path.read_bytes().split(b"\n\n", 1)[0].decode("utf-8")


def convert(*args: str) -> int:
    return commands.main(["convert", "--quiet", *map(str, args)])


@pytest.fixture(scope="module")
def ct_series() -> list[pydicom.Dataset]:
    return dseries.read_series_datasets(CT)


@pytest.fixture(scope="module")
def ct_volume():
    return read_volume(CT)


@pytest.fixture(scope="module")
def organ_masks(ct_series) -> dict[str, np.ndarray]:
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(LABELS)))
    assert labels.shape == (len(ct_series), ct_series[0].Rows, ct_series[0].Columns)
    return {name: labels == value for name, value in ORGANS.items()}


@pytest.fixture(scope="module")
def our_seg(tmp_path_factory, ct_series, organ_masks) -> Path:
    out = tmp_path_factory.mktemp("ours") / "organs.dcm"
    specs = [SegmentSpec(name, mask) for name, mask in organ_masks.items()]
    return seg_write.write_dicom_seg(ct_series, specs, out, model_hash=HASH)


# ------------------------------------------------------------------------------------------- corpus

#: Every corpus item (see its README): None = exports, else the words of its one-line refusal.
CORPUS_ITEMS = {
    "ge-ct-3-slices": None,
    "ge-ct-5-slices-descending": None,
    "mr-radial-localizer": "mixed orientations",
    "mr-single-image-rle": "single-slice",
    "siemens-mr-single-image-jpegls": "single-slice",
    "rt-plan-not-an-image": "no DICOM images",
}


def test_the_corpus_table_lists_every_item():
    assert sorted(p.name for p in CORPUS.iterdir() if p.is_dir()) == sorted(CORPUS_ITEMS)


def _export_corpus_series(folder: Path, out: Path) -> tuple[Path, np.ndarray, list, object]:
    volume = read_volume(folder)
    datasets = dseries.sort_series_datasets(volume.dicom_datasets)
    dseries.check_series_grid(datasets, volume.array_kji.shape, volume.ijk_to_ras)
    mask = np.zeros(volume.array_kji.shape, dtype=bool)
    mask[1:-1, 3:11, 4:13] = True  # partial coverage: the first and last slices stay empty
    seg_write.write_dicom_seg(datasets, [SegmentSpec("lesion", mask)], out, model_hash=HASH)
    return out, mask, datasets, volume


@pytest.mark.parametrize("item", sorted(CORPUS_ITEMS))
def test_corpus_series_exports_cleanly_or_is_refused_in_one_line(item, tmp_path):
    folder = CORPUS / item
    refusal = CORPUS_ITEMS[item]
    if refusal is not None:
        with pytest.raises(ValueError, match=refusal) as caught:
            _export_corpus_series(folder, tmp_path / "seg.dcm")
        assert "\n" not in str(caught.value)
        assert not (tmp_path / "seg.dcm").exists()
        return
    out, mask, datasets, volume = _export_corpus_series(folder, tmp_path / "seg.dcm")
    assert dciodvfy_errors(out) == []
    np.testing.assert_array_equal(seg_read.read_dicom_seg(out, datasets)["lesion"], mask)
    back = dcmqi_masks(out, tmp_path / "dcmqi", mask.shape, dseries.series_affine(datasets))
    np.testing.assert_array_equal(back["lesion"], mask)
    # and through the command line onto the series again
    assert convert("--dicom-seg", out, "--volume", folder, "--out", tmp_path / "back.seg.nrrd") == 0
    np.testing.assert_array_equal(seg_nrrd_segments(tmp_path / "back.seg.nrrd", volume)["lesion"], mask)


@pytest.mark.parametrize("item", [name for name, refusal in CORPUS_ITEMS.items() if refusal is None])
def test_corpus_series_de_identified_without_frame_of_reference_exports(item, tmp_path):
    folder = tmp_path / item
    folder.mkdir()
    for path in sorted((CORPUS / item).iterdir()):
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(folder / path.name)
    out, mask, datasets, _ = _export_corpus_series(folder, tmp_path / "seg.dcm")
    assert dciodvfy_errors(out) == []
    seg = pydicom.dcmread(out)
    assert seg.FrameOfReferenceUID == headers.derived_frame_of_reference(datasets)
    np.testing.assert_array_equal(seg_read.read_dicom_seg(out, datasets)["lesion"], mask)


# ------------------------------------------------------------------------------------------- charset


def test_non_latin_segment_names_round_trip_through_export_and_convert(
    tmp_path, ct_series, ct_volume, organ_masks
):
    specs = [SegmentSpec(name, mask) for name, mask in zip(NAMES, organ_masks.values(), strict=True)]
    out = seg_write.write_dicom_seg(ct_series, specs, tmp_path / "names.dcm", model_hash=HASH)
    assert dciodvfy_errors(out) == []
    seg = pydicom.dcmread(out)
    assert seg.SpecificCharacterSet == "ISO_IR 192"
    assert [item.SegmentLabel for item in seg.SegmentSequence] == NAMES
    assert list(seg_read.read_dicom_seg(out, ct_series)) == NAMES

    nrrd = tmp_path / "names.seg.nrrd"
    assert convert("--dicom-seg", out, "--volume", CT, "--out", nrrd) == 0
    segments = seg_nrrd_segments(nrrd, ct_volume)
    assert list(segments) == NAMES
    for name, spec in zip(NAMES, specs, strict=True):
        np.testing.assert_array_equal(segments[name], spec.mask_kji, err_msg=name)

    again = tmp_path / "again.dcm"
    assert convert("--seg", nrrd, "--volume", CT, "--dicom-seg", again) == 0
    assert dciodvfy_errors(again) == []
    assert [item.SegmentLabel for item in pydicom.dcmread(again).SegmentSequence] == NAMES


def test_an_ascii_seg_declares_no_character_set_even_when_the_source_does(our_seg, ct_series):
    assert ct_series[0].SpecificCharacterSet == "ISO_IR 100"
    assert "SpecificCharacterSet" not in pydicom.dcmread(our_seg, stop_before_pixels=True)


# ------------------------------------------------------------------------------------ no frame of reference


def _ct_without_frame_of_reference(folder: Path, slices: int = 3) -> Path:
    folder.mkdir()
    for path in sorted(CT.iterdir())[:slices]:
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(folder / path.name)
    return folder


def test_a_series_without_frame_of_reference_exports_with_a_stable_derived_uid(tmp_path, caplog):
    folder = _ct_without_frame_of_reference(tmp_path / "anon")
    datasets = dseries.read_series_datasets(folder)
    mask = np.zeros((3, 512, 512), dtype=bool)
    mask[1, 200:240, 220:300] = True
    uids = []
    for run in range(2):
        caplog.clear()
        out = seg_write.write_dicom_seg(
            datasets, [SegmentSpec("x", mask)], tmp_path / f"{run}.dcm", model_hash=HASH
        )
        warnings = [r.getMessage() for r in caplog.records if "FrameOfReferenceUID" in r.getMessage()]
        assert len(warnings) == 1 and "\n" not in warnings[0]
        seg = pydicom.dcmread(out)
        uids.append(seg.FrameOfReferenceUID)
        assert seg.ContentDescription == headers.DERIVED_FOR_NOTE
        referenced = {
            i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        }
        assert referenced == {ds.SOPInstanceUID for ds in datasets}
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID
        assert dciodvfy_errors(out) == []
        np.testing.assert_array_equal(seg_read.read_dicom_seg(out, datasets)["x"], mask)
    assert uids[0] == uids[1] and pydicom.uid.UID(uids[0]).is_valid
    # another series (other instance UIDs) gets another frame
    other = [copy.deepcopy(ds) for ds in datasets]
    for ds in other:
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
    assert headers.derived_frame_of_reference(other) != uids[0]


def test_the_command_line_warns_in_one_line_when_the_frame_of_reference_is_derived(tmp_path, ct_series):
    folder = _ct_without_frame_of_reference(tmp_path / "anon")
    datasets = dseries.read_series_datasets(folder)
    mask = np.zeros((3, 512, 512), dtype=bool)
    mask[2, 100:140, 120:200] = True
    seg = seg_write.write_dicom_seg(datasets, [SegmentSpec("x", mask)], tmp_path / "in.dcm", model_hash=HASH)
    nrrd = tmp_path / "x.seg.nrrd"
    assert convert("--dicom-seg", seg, "--volume", folder, "--out", nrrd) == 0
    result = subprocess.run(
        [sys.executable, "-m", "SAMMed2DSegmentLib", "convert", "--seg", str(nrrd), "--volume", str(folder),
         "--dicom-seg", str(tmp_path / "out.dcm")], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "FrameOfReferenceUID" in line]
    assert len(warnings) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        pydicom.dcmread(tmp_path / "out.dcm").FrameOfReferenceUID == pydicom.dcmread(seg).FrameOfReferenceUID
    )


# ------------------------------------------------------------------------------------------- convert


def test_convert_our_seg_gives_the_original_voxels_names_colours_and_terminology(
    tmp_path, our_seg, ct_volume, organ_masks
):
    nrrd = tmp_path / "organs.seg.nrrd"
    assert convert("--dicom-seg", our_seg, "--volume", CT, "--out", nrrd) == 0
    segments = seg_nrrd_segments(nrrd, ct_volume)
    assert list(segments) == list(organ_masks)
    for name, mask in organ_masks.items():
        np.testing.assert_array_equal(segments[name], mask, err_msg=name)
    header = seg_nrrd_header(nrrd)
    assert "SCT^91723000^Anatomical Structure~SCT^85756007^Tissue" in header  # Slicer's terminology entry
    # and back: the .seg.nrrd exported again holds the same voxels
    again = tmp_path / "again.dcm"
    assert convert("--seg", nrrd, "--volume", CT, "--dicom-seg", again) == 0
    back = seg_read.read_dicom_seg(again, dseries.read_series_datasets(CT))
    for name, mask in organ_masks.items():
        np.testing.assert_array_equal(back[name], mask, err_msg=name)
    assert dciodvfy_errors(again) == []


def _dcmqi_seg(tmp_path: Path) -> Path:
    """A SEG written by dcmqi's itkimage2segimage from the label map (one segment per organ)."""
    colors = {"liver": [221, 130, 101], "spleen": [157, 108, 162], "pancreas": [249, 180, 111]}
    types = {
        "liver": ("10200004", "Liver"),
        "spleen": ("78961009", "Spleen"),
        "pancreas": ("15776009", "Pancreas"),
    }
    meta = {
        "ContentCreatorName": "Reader1", "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
        "SeriesDescription": "dcmqi organs", "SeriesNumber": "300", "InstanceNumber": "1",
        "ContentLabel": "SEGMENTATION", "ContentDescription": "dcmqi", "BodyPartExamined": "ABDOMEN",
        "segmentAttributes": [[{
            "labelID": value, "SegmentDescription": name, "SegmentLabel": name,
            "SegmentAlgorithmType": "MANUAL",
            "recommendedDisplayRGBValue": colors[name],
            "SegmentedPropertyCategoryCodeSequence": {
                "CodeValue": "91723000", "CodingSchemeDesignator": "SCT",
                "CodeMeaning": "Anatomical Structure"},
            "SegmentedPropertyTypeCodeSequence": {
                "CodeValue": types[name][0], "CodingSchemeDesignator": "SCT", "CodeMeaning": types[name][1]},
        } for name, value in ORGANS.items()]],
    }  # fmt: skip
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    image = sitk.ReadImage(str(LABELS))  # dcmqi wants every label described: keep the three organs only
    array = sitk.GetArrayFromImage(image)
    array[~np.isin(array, list(ORGANS.values()))] = 0
    organs = sitk.GetImageFromArray(array)
    organs.CopyInformation(image)
    sitk.WriteImage(organs, str(tmp_path / "organs.nrrd"))
    out = tmp_path / "dcmqi.dcm"
    subprocess.run(
        [str(BIN / "itkimage2segimage"), "--inputImageList", str(tmp_path / "organs.nrrd"),
         "--inputDICOMDirectory", str(CT),
         "--outputDICOM", str(out), "--inputMetadata", str(tmp_path / "meta.json")],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return out


def test_convert_a_dcmqi_seg_equals_the_label_map_segment_by_segment(tmp_path, ct_volume, organ_masks):
    seg = _dcmqi_seg(tmp_path)
    nrrd = tmp_path / "dcmqi.seg.nrrd"
    assert convert("--dicom-seg", seg, "--volume", CT, "--out", nrrd) == 0
    segments = seg_nrrd_segments(nrrd, ct_volume)
    assert sorted(segments) == sorted(organ_masks)
    for name, mask in organ_masks.items():
        np.testing.assert_array_equal(segments[name], mask, err_msg=name)
    header = seg_nrrd_header(nrrd)
    assert "SCT^10200004^Liver" in header and "SCT^78961009^Spleen" in header
    read = {s.label: s for s in seg_read.read_seg_segments(
        seg, ct_volume.array_kji.shape, dseries.series_affine(dseries.read_series_datasets(CT)))}  # fmt: skip
    assert np.allclose(np.asarray(read["liver"].color_rgb) * 255, [221, 130, 101], atol=2)
    assert read["spleen"].type == ("78961009", "SCT", "Spleen")


def test_convert_onto_a_volume_file_on_the_same_grid(tmp_path, our_seg, organ_masks):
    """A SEG opened on a NRRD of its source (no DICOM headers): frames placed by position alone."""
    volume = read_volume(CT)
    image = sitk.ReadImage(str(LABELS))  # the label map lies on the CT grid; any volume file on it will do
    nrrd_volume = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(nrrd_volume))
    out = tmp_path / "organs.seg.nrrd"
    assert convert("--dicom-seg", our_seg, "--volume", nrrd_volume, "--out", out) == 0
    segments = seg_nrrd_segments(out, volume)
    for name, mask in organ_masks.items():
        np.testing.assert_array_equal(segments[name], mask, err_msg=name)


def test_convert_a_fractional_seg(tmp_path, ct_series, ct_volume, organ_masks):
    liver = organ_masks["liver"]
    probability = np.zeros(liver.shape, dtype=np.float32)
    probability[liver] = 0.9
    ring = np.zeros_like(liver)
    ring[:, 1:, :] |= liver[:, :-1, :]
    probability[ring & ~liver] = 0.3  # below 0.5: not in the binary segment
    out = seg_write.write_dicom_seg(
        ct_series,
        [SegmentSpec("liver p", probability)],
        tmp_path / "frac.dcm",
        model_hash=HASH,
        fractional=True,
    )
    assert pydicom.dcmread(out, stop_before_pixels=True).SegmentationType == "FRACTIONAL"
    read = seg_read.read_seg_segments(out, liver.shape, dseries.series_affine(ct_series), ct_series)
    assert np.allclose(read[0].mask_kji, probability, atol=1 / 255)
    nrrd = tmp_path / "frac.seg.nrrd"
    assert convert("--dicom-seg", out, "--volume", CT, "--out", nrrd) == 0
    np.testing.assert_array_equal(seg_nrrd_segments(nrrd, ct_volume)["liver p"], liver)


def test_convert_a_seg_whose_frames_are_shuffled(tmp_path, our_seg, ct_volume, organ_masks):
    seg = pydicom.dcmread(our_seg)
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    order = list(range(len(frames)))
    random.Random(7).shuffle(order)
    assert order != sorted(order)
    seg.PerFrameFunctionalGroupsSequence = [seg.PerFrameFunctionalGroupsSequence[n] for n in order]
    seg.PixelData = pydicom.pixels.pack_bits(frames[order].astype(np.uint8))
    shuffled = tmp_path / "shuffled.dcm"
    seg.save_as(shuffled)
    nrrd = tmp_path / "shuffled.seg.nrrd"
    assert convert("--dicom-seg", shuffled, "--volume", CT, "--out", nrrd) == 0
    segments = seg_nrrd_segments(nrrd, ct_volume)
    for name, mask in organ_masks.items():
        np.testing.assert_array_equal(segments[name], mask, err_msg=name)


def test_convert_refuses_a_seg_of_another_series_naming_both_and_writes_nothing(tmp_path, capsys):
    out, _, datasets, _ = _export_corpus_series(CORPUS / "ge-ct-3-slices", tmp_path / "other.dcm")
    target = tmp_path / "x.seg.nrrd"
    assert convert("--dicom-seg", out, "--volume", CT, "--out", target) == commands.EXIT_BAD_INPUT
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert str(datasets[0].SeriesInstanceUID) in error
    assert str(dseries.read_series_datasets(CT)[0].SeriesInstanceUID) in error
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["other.dcm"]


def test_convert_refuses_bad_arguments_in_one_line(tmp_path, our_seg, capsys):
    assert convert("--dicom-seg", our_seg, "--volume", CT) == commands.EXIT_BAD_INPUT
    bad_out = tmp_path / "x.nrrd"
    assert convert("--dicom-seg", our_seg, "--volume", CT, "--out", bad_out) == commands.EXIT_BAD_INPUT
    assert (
        convert("--dicom-seg", tmp_path / "none.dcm", "--volume", CT, "--out", tmp_path / "x.seg.nrrd") == 2
    )
    assert (
        convert("--seg", our_seg, "--volume", CT, "--dicom-seg", our_seg) == commands.EXIT_BAD_INPUT
    )  # same file
    copy_of_ct = tmp_path / "ct"
    shutil.copytree(CT, copy_of_ct)
    assert (
        convert("--dicom-seg", CT / "CT267.dcm", "--volume", copy_of_ct, "--out", tmp_path / "x.seg.nrrd")
        == 2
    )
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 5 and all(line.startswith("error: ") for line in errors), errors
    assert not (tmp_path / "x.seg.nrrd").exists()

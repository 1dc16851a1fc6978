"""Issue 24, item 5: a volume's declared size is checked against the memory available before any voxel is read
(a 100 kB gzip NRRD claiming 8 GB took 8.7 GB before its error), and DICOM spacing must be positive and finite
(`0\\0` was read as a made-up 1 mm, a negative spacing mirrored the volume)."""

from __future__ import annotations

import gzip
import resource
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from SAMMed2DSegmentLib import memory
from SAMMed2DSegmentLib.formats.dicom.series import read_series_datasets, series_affine
from SAMMed2DSegmentLib.formats.volumes import MAX_VOXEL_VALUES, VolumeReadError, read_volume
from SAMMed2DSegmentLib.memory import NotEnoughMemory, available_memory, require_memory

#: 2048×2048×1024 int16: 8.6 GB declared, in a file of a few hundred bytes.
CLAIM = (2048, 2048, 1024)
GB = 1 << 30


@pytest.fixture
def one_gigabyte(monkeypatch):
    """Pretend 1 GiB is available, whatever this machine has."""
    monkeypatch.setattr(memory, "available_memory", lambda: GB)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _nrrd(path: Path, sizes=CLAIM, kind: str = "short") -> Path:
    header = (
        f"NRRD0004\ntype: {kind}\ndimension: 3\nspace: left-posterior-superior\n"
        f"sizes: {' '.join(map(str, sizes))}\n"
        "space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\nendian: little\nencoding: gzip\n\n"
    )
    path.write_bytes(header.encode() + gzip.compress(b"\0" * 100_000))
    return path


def _nifti(path: Path, sizes=CLAIM) -> Path:
    """A real NIfTI-1 header from SimpleITK, its dimensions patched to claim `sizes` (data stays tiny)."""
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkInt16), str(path))
    data = bytearray(path.read_bytes())
    data[40:56] = struct.pack("<8h", 3, *sizes, 1, 1, 1, 1)
    path.write_bytes(bytes(data))
    return path


def _mha(path: Path, sizes=CLAIM) -> Path:
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"DimSize = {' '.join(map(str, sizes))}\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + b"\0" * 1000)
    return path


@pytest.mark.parametrize("write", [_nrrd, _nifti, _mha], ids=["nrrd-gzip", "nifti", "mha"])
def test_declared_size_beyond_memory_is_refused_before_reading(tmp_path, one_gigabyte, write):
    suffix = {"_nrrd": ".nrrd", "_nifti": ".nii", "_mha": ".mha"}[write.__name__]
    path = write(tmp_path / f"claim{suffix}")
    before = _peak_rss_bytes()
    with pytest.raises(
        VolumeReadError, match=r"declares 2048×2048×1024 voxels \(8\.59 GB\).*only 1\.07 GB"
    ) as info:
        read_volume(path)
    assert "\n" not in str(info.value)
    assert _peak_rss_bytes() - before < 500 << 20  # nothing near the claim was allocated


def test_a_claim_beyond_any_volume_is_refused_whatever_the_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: None)  # memory unknown
    with pytest.raises(VolumeReadError, match=f"more than the {MAX_VOXEL_VALUES:,}"):
        read_volume(_nrrd(tmp_path / "huge.nrrd", sizes=(100_000, 100_000, 1_000)))


def test_segmentation_file_claiming_gigabytes_is_refused(tmp_path, one_gigabyte):
    """`--seg` and an existing `--out` go through Slicer's segmentation reader, probed by ITK first."""
    from SAMMed2DSegmentLib.mrml import create_headless_scene
    from SAMMed2DSegmentLib.mrml.segmentations import load_segmentation

    path = _nrrd(tmp_path / "claim.seg.nrrd", kind="uchar")
    with pytest.raises(ValueError, match=r"declares 2048×2048×1024 voxels"):
        load_segmentation(create_headless_scene(), path)


def test_ordinary_volume_still_reads(tmp_path):
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    sitk.WriteImage(image, str(tmp_path / "small.nrrd"), useCompression=True)
    assert read_volume(tmp_path / "small.nrrd").array_kji.shape == (4, 5, 6)


def test_available_memory_and_the_refusal_message():
    available = available_memory()
    assert available is None or available > 0
    require_memory(1, "one byte")
    expected = r"^ten exabytes: that needs about 10,000,000,000 GB of memory, but only .*; buy more$"
    with pytest.raises(NotEnoughMemory, match=expected):
        require_memory(10**19, "ten exabytes", "buy more")


# -- DICOM spacing --------------------------------------------------------------------------------------


def _series(folder: Path, pixel_spacing=("0.8", "0.8"), positions=None, thickness=None) -> Path:
    """A tiny axial CT series written with pydicom (4 slices of 8×8, 2 mm apart unless `positions`)."""
    folder.mkdir()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for n, z in enumerate(positions if positions is not None else [0.0, 2.0, 4.0, 6.0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.Modality = "p", "CT"
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = list(pixel_spacing)
        if thickness is not None:
            ds.SliceThickness = thickness
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.full((8, 8), n, dtype=np.int16).tobytes()
        ds.save_as(folder / f"{n}.dcm", enforce_file_format=True)
    return folder


@pytest.mark.parametrize(
    "spacing", [("0", "0"), ("-0.8", "0.8"), ("0.8", "-0.8"), ("nan", "0.8"), ("inf", "1")]
)
def test_dicom_pixel_spacing_must_be_positive_and_finite(tmp_path, spacing):
    folder = _series(tmp_path / "s", pixel_spacing=spacing)
    with pytest.raises(VolumeReadError, match=r"0\.dcm: PixelSpacing .* must be two positive finite numbers"):
        read_volume(folder)


def test_dicom_slice_positions_must_be_finite(tmp_path):
    folder = _series(tmp_path / "s", positions=[0.0, 2.0, float("nan"), 6.0])
    with pytest.raises(VolumeReadError, match="ImagePositionPatient holds a value that is not finite"):
        read_volume(folder)


@pytest.mark.parametrize("thickness", ["-2", "nan"])
def test_single_slice_spacing_must_be_positive_and_finite(tmp_path, thickness):
    datasets = read_series_datasets(_series(tmp_path / "s", positions=[0.0], thickness=thickness))
    with pytest.raises(ValueError, match="slice spacing .* must be positive and finite"):
        series_affine(datasets)


def test_good_dicom_series_reads(tmp_path):
    volume = read_volume(_series(tmp_path / "s"))
    assert volume.array_kji.shape == (4, 8, 8)
    np.testing.assert_allclose(np.diag(volume.ijk_to_ras)[:3], [-0.8, -0.8, 2.0])


def test_dicom_series_size_is_checked_before_reading(tmp_path, monkeypatch):
    """Rows × Columns × slices of the headers, before ITK decodes a pixel (4 × 8 × 8 int16 = 512 bytes)."""
    folder = _series(tmp_path / "s")
    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    with pytest.raises(
        VolumeReadError,
        match=r"declares 8×8×4 voxels \(512 bytes\): that needs about 1 kB of memory, but only 1 kB",
    ):
        read_volume(folder)

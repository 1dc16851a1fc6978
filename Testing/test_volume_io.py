"""Reading volumes for the command line: compressed DICOM transfer syntaxes seen in practice decode to the
same voxels and geometry (the real series is JPEG 2000 lossless; RLE and JPEG-LS copies are made here)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless

from SAMMed2DSegmentLib.formats.volumes import read_volume

DICOM = Path(__file__).parent / "Data" / "totalseg-example-ct" / "ct"


@pytest.fixture(scope="module")
def first_slices():
    return sorted(DICOM.glob("*.dcm"))[:3]


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, RLELossless, JPEGLSLossless], ids=lambda u: u.name
)
def test_compressed_series_decode_identically(tmp_path, first_slices, syntax):
    plain = tmp_path / "plain"
    other = tmp_path / "other"
    plain.mkdir()
    other.mkdir()
    for path in first_slices:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        ds.decompress()
        ds.save_as(plain / path.name)
        ds = pydicom.dcmread(path)
        if syntax == ExplicitVRLittleEndian:
            ds.decompress()
        else:
            ds.compress(syntax, pixels)
        ds.save_as(other / path.name)
        assert pydicom.dcmread(other / path.name).file_meta.TransferSyntaxUID == syntax
    reference = read_volume(plain)
    decoded = read_volume(other)
    assert decoded.array_kji.shape == (3, 512, 512)
    np.testing.assert_array_equal(decoded.array_kji, reference.array_kji)
    np.testing.assert_allclose(decoded.ijk_to_ras, reference.ijk_to_ras, atol=1e-9)
    # The JPEG 2000 originals of the same slices decode to the same voxels too.
    j2k = tmp_path / "j2k"
    j2k.mkdir()
    for path in first_slices:
        shutil.copy(path, j2k / path.name)
    np.testing.assert_array_equal(read_volume(j2k).array_kji, reference.array_kji)
    assert decoded.modality == "CT"

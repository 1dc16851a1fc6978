"""Segmentation node → DICOM-SEG → segmentation node, with Slicer's MRML classes: a case can be reopened."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SAMMed2DSegmentLib.engine.geometry import SliceGeometry
from SAMMed2DSegmentLib.formats.dicom.series import read_series_datasets
from SAMMed2DSegmentLib.formats.volumes import read_volume
from SAMMed2DSegmentLib.mrml import (
    add_volume_from_array,
    create_headless_scene,
    ensure_segment,
    ensure_segmentation,
    segment_array,
    write_segment_slices,
)
from SAMMed2DSegmentLib.mrml.dicom_segmentations import export_dicom_seg, import_dicom_seg

CT = Path(__file__).parent / "Data" / "totalseg-example-ct"
ORGANS = {"liver": 5, "spleen": 1, "pancreas": 7}


@pytest.fixture(scope="module")
def case():
    hs = create_headless_scene()
    volume = read_volume(CT / "ct")
    node = add_volume_from_array(hs, volume.array_kji, volume.ijk_to_ras, "ct")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(CT / "labels" / "labels_on_ct_grid.nrrd")))
    geometry = SliceGeometry.create(volume.array_kji.shape, volume.ijk_to_ras, "axial")
    seg = ensure_segmentation(hs, node)
    for name, value in ORGANS.items():
        segment_id = ensure_segment(seg, name)
        organ = labels == value
        write_segment_slices(
            seg, segment_id, node, geometry, {k: geometry.extract(organ, k) for k in range(20)}
        )
    return hs, node, seg, read_series_datasets(CT / "ct")


def test_export_then_import_gives_the_same_segments(case, tmp_path):
    hs, node, seg, datasets = case
    path = export_dicom_seg(seg, node, datasets, tmp_path / "case.dcm", model_hash="ab" * 32)
    reopened = import_dicom_seg(hs, path, node, datasets)
    segmentation = reopened.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(ORGANS)
    for name in ORGANS:
        original = segment_array(seg, seg.GetSegmentation().GetSegmentIdBySegmentName(name), node)
        again = segment_array(reopened, segmentation.GetSegmentIdBySegmentName(name), node)
        assert original.any()
        np.testing.assert_array_equal(again, original)


def test_export_refuses_a_volume_of_another_grid(case, tmp_path):
    hs, node, seg, datasets = case
    other = add_volume_from_array(hs, np.zeros((20, 512, 512), np.int16), np.eye(4), "other")
    with pytest.raises(ValueError, match="voxel grid of the DICOM series"):
        export_dicom_seg(seg, other, datasets, tmp_path / "x.dcm", model_hash="00" * 32)
    assert not (tmp_path / "x.dcm").exists()

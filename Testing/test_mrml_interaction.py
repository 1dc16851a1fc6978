"""The main-thread half of the module's background jobs and the DICOM database lookup, with Slicer's real
MRML classes (tier B). Only the DICOM database is a stand-in: an object with `fileForInstance`."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
import slicer
from highdicom.seg import Segmentation as HdSegmentation

from SAMMed2DSegmentLib.formats.volumes import read_volume
from SAMMed2DSegmentLib.mrml import (
    add_volume_from_array,
    create_headless_scene,
    ensure_segment,
    ensure_segmentation,
)
from SAMMed2DSegmentLib.mrml.dicom_database import (
    source_datasets,
    source_files,
    source_modality,
)
from SAMMed2DSegmentLib.mrml.dicom_segmentations import export_dicom_seg
from SAMMed2DSegmentLib.mrml.interaction import prompts_from_nodes, snapshot_volume
from SAMMed2DSegmentLib.mrml.segmentations import write_segment_slices

CT = Path(__file__).parent / "Data" / "totalseg-example-ct" / "ct"
IJK_TO_RAS = np.array([[0, 0, -1.5, 40], [0.7, 0, 0, -10], [0, -0.7, 0, 5], [0, 0, 0, 1.0]])


@pytest.fixture
def setup():
    hs = create_headless_scene()
    volume = add_volume_from_array(hs, np.arange(6 * 8 * 10, dtype=np.int16).reshape(6, 8, 10), IJK_TO_RAS)
    seg = ensure_segmentation(hs, volume)
    segment_id = ensure_segment(seg, "organ")
    return hs, volume, seg, segment_id


def test_snapshot_is_a_copy_with_a_key_that_follows_edits(setup):
    hs, volume, _, _ = setup
    snap = snapshot_volume(volume, "CT")
    assert snap.array_kji.shape == (6, 8, 10) and snap.modality == "CT"
    assert np.allclose(snap.ijk_to_ras, IJK_TO_RAS)
    assert snapshot_volume(volume).key == snap.key
    slicer.util.arrayFromVolume(volume)[0, 0, 0] = 999
    slicer.util.arrayFromVolumeModified(volume)
    assert snap.array_kji[0, 0, 0] == 0
    assert snapshot_volume(volume).key != snap.key
    moved = snapshot_volume(volume).key
    transform = hs.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    m = transform.GetMatrixTransformToParent()
    m.SetElement(0, 3, 5.0)
    transform.SetMatrixTransformToParent(m)
    assert snapshot_volume(volume).key != moved


def test_prompts_from_nodes_in_world_coordinates(setup):
    hs, *_ = setup
    include = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "include")
    include.AddControlPoint(1.0, 2.0, 3.0)
    exclude = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "exclude")
    exclude.AddControlPoint(4.0, 5.0, 6.0)
    roi = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(0.0, 0.0, 0.0)
    roi.SetSize(10.0, 20.0, 30.0)
    points, rois = prompts_from_nodes(include, exclude, roi)
    assert [(p.position, p.label) for p in points] == [((1.0, 2.0, 3.0), 1), ((4.0, 5.0, 6.0), 0)]
    assert len(rois) == 1 and rois[0].size == pytest.approx((10.0, 20.0, 30.0))
    assert prompts_from_nodes(None, None, None) == ([], [])


def _mask(geometry, index):
    mask = np.zeros(geometry.slice_shape, bool)
    mask[2:5, 3:6] = True
    return {index: mask}


# -- DICOM database ---------------------------------------------------------------------------------------


class FakeDicomDatabase:
    """Only `fileForInstance`, the one ctkDICOMDatabase method the lookup uses."""

    def __init__(self, files_by_uid: dict[str, str]) -> None:
        self.files_by_uid = files_by_uid

    def fileForInstance(self, uid: str) -> str:  # noqa: N802
        return self.files_by_uid.get(uid, "")


@pytest.fixture(scope="module")
def dicom_case():
    files = sorted(CT.glob("*.dcm"))
    uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: str(f) for f in files}
    hs = create_headless_scene()
    volume = read_volume(CT)
    node = add_volume_from_array(hs, volume.array_kji, volume.ijk_to_ras, "ct")
    order = list(uids)
    random.Random(3).shuffle(order)  # Slicer's order need not be the slice order
    node.SetAttribute("DICOM.instanceUIDs", " ".join(order))
    return hs, node, uids


def test_source_files_and_sorted_datasets_from_the_database(dicom_case):
    _, node, uids = dicom_case
    database = FakeDicomDatabase(uids)
    assert sorted(source_files(node, database)) == sorted(uids.values())
    datasets = source_datasets(node, database)
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert len(datasets) == 20 and (z == sorted(z) or z == sorted(z, reverse=True))
    assert source_modality(node, database) == "CT"


def test_volume_not_from_dicom_gets_a_clear_message(setup):
    _, volume, _, _ = setup
    with pytest.raises(ValueError, match="was not loaded from DICOM.*DICOM module"):
        source_files(volume, FakeDicomDatabase({}))
    assert source_modality(volume, FakeDicomDatabase({})) is None


def test_missing_instances_and_database_are_reported(dicom_case):
    _, node, uids = dicom_case
    partial = dict(list(uids.items())[:-2])
    with pytest.raises(ValueError, match="2 of the 20 source images"):
        source_files(node, FakeDicomDatabase(partial))
    with pytest.raises(ValueError, match="DICOM database is not available"):
        source_files(node, None)


def test_export_from_database_sources_references_every_instance(dicom_case, tmp_path):
    hs, node, uids = dicom_case
    seg = ensure_segmentation(hs, node)
    segment_id = ensure_segment(seg, "box")
    geometry = snapshot_volume(node).geometry("axial")
    mask = np.zeros(geometry.slice_shape, bool)
    mask[200:260, 200:300] = True
    write_segment_slices(seg, segment_id, node, geometry, {5: mask, 6: mask})
    out = export_dicom_seg(seg, node, source_datasets(node, FakeDicomDatabase(uids)), tmp_path / "s.dcm",
                           "0" * 64)  # fmt: skip
    result = HdSegmentation.from_dataset(pydicom.dcmread(out))
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in result.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == set(uids)
    assert result.number_of_frames == 2

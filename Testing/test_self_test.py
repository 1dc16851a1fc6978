"""The module's self-test (SAMMed2DSegmentTest) headless: the same checks (SAMMed2DSegmentLib.mrml.self_test)
with `slicer-core`'s scene, a real engine process, the bundled demo model and the synthetic DICOM series,
read as Slicer's DICOM module would load it. Only the DICOM database is a stand-in (`fileForInstance`)."""

from __future__ import annotations

import pydicom
import pytest

from SAMMed2DSegmentLib.formats.volumes import read_volume
from SAMMed2DSegmentLib.mrml import add_volume_from_array, create_headless_scene, self_test
from SAMMed2DSegmentLib.mrml.controller import InteractiveSegmentation
from SAMMed2DSegmentLib.mrml.panel import PanelModel
from SAMMed2DSegmentLib.service.client import EngineClient


class DicomDatabase:
    """Only `fileForInstance`, the one ctkDICOMDatabase method the module uses."""

    def __init__(self, files_by_uid: dict[str, str]) -> None:
        self.files_by_uid = files_by_uid

    def fileForInstance(self, uid: str) -> str:  # noqa: N802
        return self.files_by_uid.get(uid, "")


def _controller_factory(hs, tmp_path):
    editor = hs.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    env = {"SAMMED2D_CACHE_DIR": str(tmp_path / "engine-cache")}
    return lambda: InteractiveSegmentation(hs.scene, EngineClient(extra_env=env), editor, hs.app_logic)


def test_self_test_logic_loads(tmp_path):
    hs = create_headless_scene()
    panel = PanelModel(hs, _controller_factory(hs, tmp_path), lambda download: self_test.READY)
    self_test.check_logic_loads(panel, str(tmp_path))


def test_self_test_parameter_node():
    pytest.skip("needs slicer.parameterNodeWrapper, which only the Slicer application has (tier C)")


def test_self_test_dicom_segment_propagate_undo_export(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    self_test.write_synthetic_ct_series(str(folder))
    files = sorted(folder.glob("*.dcm"))
    uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: str(f) for f in files}
    hs = create_headless_scene()
    volume = read_volume(folder)
    node = add_volume_from_array(hs, volume.array_kji, volume.ijk_to_ras, "ct")
    node.SetAttribute("DICOM.instanceUIDs", " ".join(uids))  # as Slicer's DICOMScalarVolumePlugin sets it
    self_test.check_segment_propagate_undo_export(hs, _controller_factory(hs, tmp_path), node,
                                                  DicomDatabase(uids), str(tmp_path))  # fmt: skip

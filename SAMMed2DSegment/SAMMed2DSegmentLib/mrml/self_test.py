"""The module's self-test checks, written once for both places they run: the Slicer application's self-test
(SAMMed2DSegmentTest, with the application's scene, DICOM database and engine) and, headless, CI
(Testing/test_self_test.py, with `slicer-core`'s classes). What needs the application itself (the
parameter node wrapper, DICOMUtils' temporary database) stays in the module's test class.

Failures are AssertionError with a message, which unittest reports as a failure and pytest as well.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk

from ..requirements import RequirementsState
from .panel import LOCAL_MODEL, PanelModel, PanelParameters
from .scene import HeadlessScene
from .segmentations import segment_array

_LIB_PARENT = str(Path(__file__).resolve().parents[2])

#: What the Slicer process imports of the library: none of it may load torch or highdicom.
SLICER_SIDE_MODULES = ("SAMMed2DSegmentLib.mrml.panel", "SAMMed2DSegmentLib.service.client",
                       "SAMMed2DSegmentLib.requirements", "SAMMed2DSegmentLib.installer",
                       "SAMMed2DSegmentLib.torch_install")  # fmt: skip


#: A requirements state with nothing missing, for a panel whose engine is known to be ready.
READY = RequirementsState(torch_version="", torch_problem="", missing=(), package_folder="", package_dirs=())


def _wait(panel: PanelModel, timeout: float = 600.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while panel.poll():
        if time.monotonic() > deadline:
            raise AssertionError("the engine did not answer in time")
        time.sleep(0.005)


def check_logic_loads(panel: PanelModel, temporary_folder: str) -> None:
    """The library's Slicer side loads without torch; a missing checkpoint and a volume that is not from
    DICOM are refused with a message, nothing started."""
    import SAMMed2DSegmentLib

    assert isinstance(SAMMed2DSegmentLib.__version__, str)
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in SLICER_SIDE_MODULES)
        + (
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'highdicom'))\n"
            "assert not bad, bad[:5]\n"
        )
    )
    path = os.pathsep.join(filter(None, [_LIB_PARENT, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the Slicer side imports torch or highdicom: {result.stderr[-300:]}"

    p = PanelParameters(model=LOCAL_MODEL)
    panel.local_checkpoint = os.path.join(temporary_folder, "no-such.pth")
    try:
        panel.model_path(p)
    except (ValueError, RuntimeError) as error:  # WeightsError is a RuntimeError
        assert "not found" in str(error), str(error)
    else:
        raise AssertionError("a missing checkpoint file was accepted")
    assert "not found" in panel.view(p).model_status

    hs = panel.hs
    volume = hs.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "not from DICOM")
    p.inputVolume = volume
    p.outputSegmentation = hs.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert not panel.view(p).export_enabled
    assert not panel.export_dicom_seg(p, os.path.join(temporary_folder, "x.dcm"))
    assert "not loaded from DICOM" in panel.view(p).status, panel.view(p).status
    assert panel.take_dialogs(), "a refused export must be shown"


def check_segment_propagate_undo_export(
    hs: HeadlessScene,
    make_controller: Callable[[], Any],
    volume_node: vtk.vtkObject,
    database: Any,
    folder: str,
) -> None:
    """One include point in the bright ball of `write_synthetic_ct_series`' CT: one slice, then a propagation
    (one undo step), undone, then the DICOM-SEG referencing every source image."""
    panel = PanelModel(hs, make_controller, lambda download: READY, lambda: database)
    try:
        include = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "include")
        include.AddControlPoint(*_ijk_to_ras(volume_node, (32, 32, 10)))
        p = PanelParameters(inputVolume=volume_node, includePoints=include, device="cpu")
        segment_id = panel.segment(p, "none")
        assert segment_id, panel.view(p).status
        _wait(panel)
        seg = p.outputSegmentation
        labelmap = segment_array(seg, segment_id, volume_node)
        one_slice = int(labelmap.sum())
        assert panel.view(p).status.startswith("1 slice(s) written"), panel.view(p).status
        assert one_slice > 0 and int(labelmap[10].sum()) == one_slice and labelmap[10, 32, 32]

        history = slicer.vtkSegmentationHistory()
        history.SetSegmentation(seg.GetSegmentation())
        assert panel.segment(p, "both", segment_id, save_undo=history.SaveState) == segment_id
        _wait(panel)
        labelmap = segment_array(seg, segment_id, volume_node)
        assert int(labelmap.any(axis=(1, 2)).sum()) >= 2 and int(labelmap.sum()) > one_slice
        assert history.RestorePreviousState(), "no undo state was saved"
        assert int(segment_array(seg, segment_id, volume_node).sum()) == one_slice

        out = os.path.join(folder, "seg.dcm")
        assert panel.export_dicom_seg(p, out), panel.view(p).status
        _wait(panel)
        assert panel.view(p).status == f"DICOM-SEG written to {out}", panel.view(p).status
        import pydicom

        written = pydicom.dcmread(out)
        referenced = {i.ReferencedSOPInstanceUID for s in written.ReferencedSeriesSequence
                      for i in s.ReferencedInstanceSequence}  # fmt: skip
        assert written.Modality == "SEG"
        assert referenced == set(volume_node.GetAttribute("DICOM.instanceUIDs").split())
        frames = int(np.count_nonzero(segment_array(seg, segment_id, volume_node).any(axis=(1, 2))))
        assert int(written.NumberOfFrames) == frames
    finally:
        panel.shutdown()


def _ijk_to_ras(volume_node: vtk.vtkObject, ijk) -> list[float]:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return list(matrix.MultiplyPoint([*ijk, 1.0])[:3])


def write_synthetic_ct_series(folder: str, slices: int = 20, size: int = 64) -> str:
    """A CT series of a soft-tissue ball (radius 12 px) in fat, written with pydicom; returns its UID."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    k, j, i = np.mgrid[:slices, :size, :size]
    ball = ((i - 32) ** 2 + (j - 32) ** 2 + ((k - 10) * 2.0) ** 2) <= 12**2
    voxels = np.where(ball, 60, -100).astype(np.int16)
    for index in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(os.path.join(folder, f"ct{index:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.Modality = "SAMMed2D^Test", "SAMMED2D-TEST", "CT"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.SeriesNumber, ds.InstanceNumber = 1, index + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-32.0, -32.0, 2.0 * index]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = size, size, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = voxels[index].tobytes()
        try:
            ds.save_as(ds.filename, enforce_file_format=True)  # pydicom 3
        except TypeError:  # pydicom 2 (Slicer 5.10)
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.save_as(ds.filename, write_like_original=False)
    return series


__all__ = [
    "READY",
    "SLICER_SIDE_MODULES",
    "check_logic_loads",
    "check_segment_propagate_undo_export",
    "write_synthetic_ct_series",
]

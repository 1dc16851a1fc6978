"""Where the source DICOM files of a volume loaded through Slicer's DICOM module are: the volume node keeps
the SOP instance UIDs in its `DICOM.instanceUIDs` attribute and Slicer's DICOM database maps each UID to a
file. The database is a parameter (inside Slicer `slicer.dicomDatabase`), so this runs headless too."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

import vtk

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"


class DicomDatabase(Protocol):
    """The one method of `ctkDICOMDatabase` used here."""

    def fileForInstance(self, sopInstanceUID: str) -> str: ...  # noqa: N802, N803


def instance_uids(volume_node: vtk.vtkObject) -> list[str]:
    """The SOP instance UIDs the volume was loaded from, or ValueError saying how to get a DICOM volume."""
    uids = (volume_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split()
    if not uids:
        raise ValueError(
            f"volume {volume_node.GetName()!r} was not loaded from DICOM, so a DICOM-SEG cannot "
            "reference it: import the CT/MR series into the DICOM database (DICOM module → Import), "
            "load it from there, segment that volume and export again (or save as .seg.nrrd)"
        )
    return uids


def source_files(volume_node: vtk.vtkObject, database: DicomDatabase | None) -> list[str]:
    """The files of the volume's source instances, in the volume's UID order."""
    uids = instance_uids(volume_node)
    if database is None:
        raise ValueError("the DICOM database is not available (open the DICOM module once to create it)")
    files, missing = [], []
    for uid in uids:
        path = database.fileForInstance(uid) or ""
        if path and os.path.isfile(path):
            files.append(path)
        else:
            missing.append(uid)
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(uids)} source images of {volume_node.GetName()!r} are no longer in "
            f"the DICOM database or on disk (first missing SOP instance UID: {missing[0]}); "
            "re-import the series"
        )
    return files


def source_datasets(volume_node: vtk.vtkObject, database: DicomDatabase | None) -> list[Dataset]:
    """Headers (no pixels) of the source series, sorted along the slice normal, for `export_dicom_seg`."""
    import pydicom  # here, not at import: Slicer's process reads no DICOM itself (the engine does)

    from ..formats.dicom.series import sort_series_datasets

    return sort_series_datasets(
        pydicom.dcmread(path, stop_before_pixels=True) for path in source_files(volume_node, database)
    )


def source_modality(volume_node: vtk.vtkObject, database: DicomDatabase | None) -> str | None:
    """The series' modality (CT, MR, …) when the volume came from DICOM, else None (for the window).

    Runs on the main thread before each new volume snapshot, so it asks the database for one instance only
    (not one query per slice), and it never fails: the modality only picks the automatic window."""
    uids = (volume_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split()
    if not uids or database is None:
        return None
    try:
        import pydicom

        path = database.fileForInstance(uids[0]) or ""
        if not os.path.isfile(path):
            return None
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality")
    except Exception:  # unreadable file, closed database: fall back to the intensity-based window
        return None


__all__ = [
    "INSTANCE_UIDS_ATTRIBUTE",
    "DicomDatabase",
    "instance_uids",
    "source_datasets",
    "source_files",
    "source_modality",
]

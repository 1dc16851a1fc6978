"""The provenance of a segment the model made, kept on the segment itself as a tag, so it is saved with the
segmentation (scene or .seg.nrrd) and a DICOM-SEG exported after the scene was reopened still names the
model and the prompts. Without it the export had only the running engine to ask, and refused."""

from __future__ import annotations

import json

import vtk

from ..formats.provenance import Provenance

#: Segment tag holding `Provenance.to_metadata()` as JSON.
TAG = "SAMMed2D.Provenance"


def record(seg_node: vtk.vtkObject, segment_id: str, provenance: Provenance) -> None:
    segment = seg_node.GetSegmentation().GetSegment(segment_id)
    if segment is not None:
        segment.SetTag(TAG, json.dumps(provenance.to_metadata()))


def stored(seg_node: vtk.vtkObject | None, segment_id: str) -> Provenance | None:
    """The provenance recorded on a segment, or None (none recorded, or unreadable: then it is ignored)."""
    segment = seg_node.GetSegmentation().GetSegment(segment_id) if seg_node is not None else None
    if segment is None:
        return None
    text = vtk.reference("")
    if not segment.GetTag(TAG, text) or not str(text):
        return None
    try:
        return Provenance.from_metadata(json.loads(str(text)))
    except (ValueError, TypeError, KeyError):
        return None


def model_sha256_of(seg_node: vtk.vtkObject | None) -> str:
    """The model hash recorded on any segment of the segmentation, or "" (what the export needs to name)."""
    if seg_node is None:
        return ""
    for segment_id in seg_node.GetSegmentation().GetSegmentIDs():
        provenance = stored(seg_node, segment_id)
        if provenance is not None and provenance.model_sha256:
            return provenance.model_sha256
    return ""


__all__ = ["TAG", "model_sha256_of", "record", "stored"]

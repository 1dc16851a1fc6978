"""MRML bridge: Slicer scene nodes ↔ the pure layer's arrays, matrices, prompts and masks.

Needs only Slicer's MRML Python classes, which the Slicer application and the `slicer-core` package both
provide. Functions take the scene (a `HeadlessScene`) and nodes as arguments and never reach for
`slicer.mrmlScene`, `slicer.app` or `slicer.modules`, so the same code runs in both.
"""

from .markups import load_markups, points_from_markups, roi_from_node
from .scene import HeadlessScene, captured_vtk_messages, create_headless_scene, quiet_vtk_logging
from .segmentations import (
    ensure_segment,
    ensure_segmentation,
    load_segmentation,
    read_segmentation_metadata,
    save_segmentation,
    segment_array,
    write_segment_slices,
)
from .volumes import (
    add_volume_from_array,
    load_volume,
    node_to_world_matrix,
    volume_array,
    volume_ijk_to_world,
)

__all__ = [
    "HeadlessScene",
    "add_volume_from_array",
    "captured_vtk_messages",
    "create_headless_scene",
    "ensure_segment",
    "ensure_segmentation",
    "load_markups",
    "load_segmentation",
    "load_volume",
    "node_to_world_matrix",
    "points_from_markups",
    "quiet_vtk_logging",
    "read_segmentation_metadata",
    "roi_from_node",
    "save_segmentation",
    "segment_array",
    "volume_array",
    "volume_ijk_to_world",
    "write_segment_slices",
]

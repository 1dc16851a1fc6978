"""Markups nodes → prompts in world RAS (parent transforms applied), and reading `.mrk.json` files.

Only what the user actually placed becomes a prompt: control points still being placed (undefined, preview)
and hidden points are skipped, the way Slicer itself treats them in the views.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import vtk

from ..engine.prompts import PointPrompt, PromptError, RoiPrompt
from ..formats.markups_files import check_markups_file
from .scene import HeadlessScene, captured_vtk_messages
from .volumes import array_from_vtk_matrix


def _markups_node_ids(scene: vtk.vtkObject) -> list[str]:
    nodes = scene.GetNodesByClass("vtkMRMLMarkupsNode")
    return [nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())]


def load_markups(hs: HeadlessScene, path: str | os.PathLike[str]) -> list[vtk.vtkObject]:
    """Every markups node in a Slicer markups file (.mrk.json, also .fcsv), coordinates converted to RAS by
    Slicer's reader whatever the file's coordinate system. A file can hold several markups (point lists and
    ROIs together), so a list comes back. Raises FileNotFoundError or ValueError naming the file.

    The file is checked against the markups schema first (`check_markups_file`): Slicer's native reader
    crashes the process on a malformed structure and reads an unknown coordinate system as RAS."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"markups file not found: {path}")
    check_markups_file(path)
    before = set(_markups_node_ids(hs.scene))
    with captured_vtk_messages() as messages:
        first_id = hs.markups_logic.LoadMarkups(str(path))
    added = [hs.scene.GetNodeByID(i) for i in _markups_node_ids(hs.scene) if i not in before]
    if not first_id or not added:
        raise ValueError(f"cannot read markups from {path}: {messages.summary()}")
    return added


def points_from_markups(node: vtk.vtkObject, label: int, include_hidden: bool = False) -> list[PointPrompt]:
    """Placed control points of a markups node as point prompts in world RAS, named by their labels.
    `label` is 1 (include) or 0 (exclude) for all of them."""
    prompts = []
    position = [0.0, 0.0, 0.0]
    for index in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(index) != node.PositionDefined:
            continue
        if not include_hidden and not node.GetNthControlPointVisibility(index):
            continue
        node.GetNthControlPointPositionWorld(index, position)
        name = node.GetNthControlPointLabel(index) or f"{node.GetName()}[{index}]"
        prompts.append(PointPrompt(tuple(float(c) for c in position), label, name))
    return prompts


def roi_from_node(roi_node: vtk.vtkObject) -> RoiPrompt:
    """The ROI box in world RAS as Slicer shows it. `GetObjectToWorldMatrix()` carries the centre and the
    (orthogonalised) axes including parent transforms; a scaling parent leaves its scale in the axis lengths,
    so the axes are normalised and the side lengths multiplied by them (this equals `GetSizeWorld`)."""
    name = roi_node.GetName() or "ROI"
    if roi_node.GetNumberOfControlPoints() > 0 and (
        roi_node.GetNthControlPointPositionStatus(0) != roi_node.PositionDefined
    ):
        raise PromptError(f"ROI {name!r} is not placed yet")
    size = np.array(roi_node.GetSize(), dtype=np.float64)
    if not (size > 0).any():
        raise PromptError(f"ROI {name!r} has no size")
    object_to_world = array_from_vtk_matrix(roi_node.GetObjectToWorldMatrix())
    axes = object_to_world[:3, :3]
    lengths = np.linalg.norm(axes, axis=0)
    if (lengths < 1e-12).any():
        raise PromptError(f"ROI {name!r} is degenerate in world coordinates")
    return RoiPrompt(
        center=tuple(float(c) for c in object_to_world[:3, 3]),
        axes=axes / lengths,
        size=tuple(float(s) for s in size * lengths),
        name=name,
    )


__all__ = ["load_markups", "points_from_markups", "roi_from_node"]

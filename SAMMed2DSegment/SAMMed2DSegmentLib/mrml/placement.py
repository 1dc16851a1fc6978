"""The include/exclude toggle (Shift+T): which point list the next click in a view goes to.

Slicer leaves place mode after one point unless placement is persistent (the interaction node's
PlaceModePersistence, 0 by default), so "is the include list being placed right now?" is false right after
the first include click, and a toggle that asked it would arm include again: the exclude click would land in
the include list. The selection node keeps the list that was armed last (its active place node) whatever
the persistence, so the toggle reads that instead and arms the other list.
"""

from __future__ import annotations

from typing import Any

import vtk

INCLUDE, EXCLUDE = "include", "exclude"

#: Colours of the two lists (green in, red out), as the module has always shown them.
LIST_COLORS = {INCLUDE: (0.0, 0.8, 0.3), EXCLUDE: (0.9, 0.15, 0.15)}

_FIELDS = {INCLUDE: "includePoints", EXCLUDE: "excludePoints"}


def ensure_point_lists(scene: vtk.vtkObject, params: Any) -> None:
    """Create the include and exclude point lists the parameters lack (`params.includePoints` /
    `params.excludePoints`), with their colours."""
    for which, field in _FIELDS.items():
        if getattr(params, field) is not None:
            continue
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", which)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetSelectedColor(*LIST_COLORS[which])
        display.SetColor(*LIST_COLORS[which])
        setattr(params, field, node)


def armed_list(app_logic: vtk.vtkObject, params: Any) -> str | None:
    """Which of the two lists was armed last ("include", "exclude"), or None when the active place node is
    neither (nothing armed yet, or another module's markups were placed since)."""
    active = app_logic.GetSelectionNode().GetActivePlaceNodeID()
    for which, field in _FIELDS.items():
        node = getattr(params, field)
        if node is not None and active and node.GetID() == active:
            return which
    return None


def arm(app_logic: vtk.vtkObject, node: vtk.vtkObject) -> None:
    """Make `node` the list the next click goes to and enter place mode, as the markups place button does;
    the user's placement persistence is left as it is."""
    selection = app_logic.GetSelectionNode()
    selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
    selection.SetActivePlaceNodeID(node.GetID())
    interaction = app_logic.GetInteractionNode()
    interaction.SetCurrentInteractionMode(interaction.Place)


def toggle(scene: vtk.vtkObject, app_logic: vtk.vtkObject, params: Any) -> str:
    """Shift+T: arm the exclude list if the include list was armed last, else the include list (creating
    the lists when missing). Returns the list armed."""
    ensure_point_lists(scene, params)
    which = EXCLUDE if armed_list(app_logic, params) == INCLUDE else INCLUDE
    arm(app_logic, getattr(params, _FIELDS[which]))
    return which


__all__ = ["EXCLUDE", "INCLUDE", "LIST_COLORS", "arm", "armed_list", "ensure_point_lists", "toggle"]

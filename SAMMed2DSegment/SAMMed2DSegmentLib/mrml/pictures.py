"""Pictures made from the offscreen slice views (`offscreen_views.py`): what Slicer draws, as RGB arrays, with
captions drawn by VTK, composed side by side or in a grid, and written as PNG files. The README's screenshots
(`Resources/Screenshots/make_screenshots.py`) and `make demo`'s overview (`demo/summarize.py`) share these, so
both show Slicer's own rendering of the volume, the segments and the markups, not a re-drawing of it."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

from ..files import atomic_path
from .offscreen_views import SliceView

#: Where a caption goes in its view: VTK's text justification and the position's fraction of the view.
_CORNERS = {
    "upper_left": (vtk.VTK_TEXT_LEFT, vtk.VTK_TEXT_TOP, 0.0, 1.0),
    "upper_right": (vtk.VTK_TEXT_RIGHT, vtk.VTK_TEXT_TOP, 1.0, 1.0),
    "lower_left": (vtk.VTK_TEXT_LEFT, vtk.VTK_TEXT_BOTTOM, 0.0, 0.0),
    "lower_right": (vtk.VTK_TEXT_RIGHT, vtk.VTK_TEXT_BOTTOM, 1.0, 0.0),
}


def view_rgb(view: SliceView) -> np.ndarray:
    """Render `view` and return its pixels, rows×columns×3 uint8, top row first (as an image is read)."""
    view.render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(view.render_window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.ShouldRerenderOn()
    grab.Update()
    image = grab.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, 3)
    return np.ascontiguousarray(pixels[::-1])  # VTK's first row is the bottom one


def add_caption(
    view: SliceView,
    text: str,
    corner: str = "upper_left",
    size: int = 16,
    color: tuple[float, float, float] = (1.0, 1.0, 1.0),
    line: int = 0,
) -> vtk.vtkTextActor:
    """A text drawn by VTK in a corner of the view (with a dark shadow, readable on any image), `line` lines
    away from the corner's edge; returns the actor, to change its text (`SetInput`) or remove it
    (`view.renderer.RemoveViewProp`)."""
    horizontal, vertical, fx, fy = _CORNERS[corner]
    actor = vtk.vtkTextActor()
    actor.SetInput(text)
    prop = actor.GetTextProperty()
    prop.SetFontSize(size)
    prop.SetColor(*color)
    prop.SetJustification(horizontal)
    prop.SetVerticalJustification(vertical)
    prop.ShadowOn()
    prop.BoldOn()
    width, height = view.size
    margin = 6
    x = fx * width + (margin if fx == 0 else -margin)
    y = fy * height + (margin if fy == 0 else -margin) + (1 if fy == 0 else -1) * line * (size + 4)
    actor.SetPosition(x, y)
    view.renderer.AddViewProp(actor)
    return actor


@contextmanager
def captions(view: SliceView, texts: dict[str, str], size: int = 16) -> Iterator[list[vtk.vtkTextActor]]:
    """Captions ({corner: text}) shown while the block runs, removed after it."""
    actors = [add_caption(view, text, corner, size) for corner, text in texts.items() if text]
    try:
        yield actors
    finally:
        for actor in actors:
            view.renderer.RemoveViewProp(actor)


def zoom(view: SliceView, center_ras: Sequence[float], width_mm: float) -> None:
    """Centre the view on `center_ras` (moving its slice there too) and show `width_mm` across, as a user
    does with the mouse wheel and a pan."""
    view.slice_node.JumpSliceByCentering(*(float(c) for c in center_ras))
    width, height = view.size
    thickness = view.slice_node.GetFieldOfView()[2]
    view.slice_node.SetFieldOfView(float(width_mm), float(width_mm) * height / width, thickness)


def set_window(volume_node: vtk.vtkObject, level: float, width: float) -> None:
    """Show the volume through a fixed window (e.g. soft tissue, level 40 width 400), not Slicer's automatic
    one, which for a CT spans bone and air and leaves the organs grey."""
    display = volume_node.GetDisplayNode()
    if display is None:
        volume_node.CreateDefaultDisplayNodes()
        display = volume_node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(float(width), float(level))


def show_segment(seg_node: vtk.vtkObject, segment_id: str, fill: float = 0.5, outline: float = 1.0) -> None:
    """How the slice views draw one segment: the opacity of its fill and of its outline (Slicer's default
    is 0.5 and 1); 0 hides either."""
    if seg_node.GetDisplayNode() is None:
        seg_node.CreateDefaultDisplayNodes()
    display = seg_node.GetDisplayNode()
    display.SetSegmentVisibility(segment_id, True)
    display.SetSegmentVisibility2DFill(segment_id, fill > 0)
    display.SetSegmentVisibility2DOutline(segment_id, outline > 0)
    display.SetSegmentOpacity2DFill(segment_id, float(fill))
    display.SetSegmentOpacity2DOutline(segment_id, float(outline))


def grid(images: Sequence[np.ndarray], columns: int | None = None, gap: int = 4) -> np.ndarray:
    """Images of one size in rows of `columns` (default: one row), `gap` black pixels between them."""
    if not images:
        raise ValueError("no image to compose")
    shape = images[0].shape
    if any(image.shape != shape for image in images):
        raise ValueError(f"images differ in size: {sorted({image.shape for image in images})}")
    columns = len(images) if columns is None else max(1, int(columns))
    rows = -(-len(images) // columns)
    height, width = shape[:2]
    out = np.zeros((rows * height + (rows - 1) * gap, columns * width + (columns - 1) * gap, *shape[2:]),
                   dtype=images[0].dtype)  # fmt: skip
    for n, image in enumerate(images):
        r, c = divmod(n, columns)
        top, left = r * (height + gap), c * (width + gap)
        out[top : top + height, left : left + width] = image
    return out


def write_png(rgb: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write a rows×columns×3 uint8 image (top row first) as a PNG with VTK's writer, atomically."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected a rows×columns×3 uint8 image, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(rgb[::-1]).reshape(-1, 3), deep=True)
    scalars.SetName("rgb")
    image.GetPointData().SetScalars(scalars)
    path = Path(path)
    with atomic_path(path, suffix=".tmp.png") as temporary:
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(temporary))
        writer.SetInputData(image)
        writer.Write()
        if writer.GetErrorCode():
            raise OSError(f"cannot write {path}: VTK error {writer.GetErrorCode()}")
    return path


def read_png(path: str | os.PathLike[str]) -> np.ndarray:
    """A PNG as rows×columns×channels uint8, top row first (the inverse of `write_png`)."""
    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(path))
    reader.Update()
    image = reader.GetOutput()
    width, height, _ = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return np.ascontiguousarray(scalars.reshape(height, width, -1)[::-1])


__all__ = ["add_caption", "captions", "grid", "read_png", "set_window", "show_segment", "view_rgb",
           "write_png", "zoom"]  # fmt: skip

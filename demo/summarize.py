"""The last step of `make demo`: a PNG overview of the result and its Dice against the reference labels.

The overview is drawn by Slicer's own slice view (`SAMMed2DSegmentLib/mrml/offscreen_views.py`, rendered
offscreen): one tile per slice of the segmented view, the CT in the soft-tissue window, the model's outline
(green) and the reference outline (magenta) as segment outlines, and on each tile the slice number and that
slice's confidence and Dice (written by VTK). Where no OpenGL context exists (no EGL, OSMesa or X), the Dice
is still printed and written, and the overview is left out with one line saying so.

    python demo/summarize.py --volume DICOM_FOLDER --segmentation OUT.seg.nrrd --segment liver \
        --report report.json --labels labels.nrrd --label-value 5 --png overview.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from SAMMed2DSegmentLib.engine.geometry import SliceGeometry
from SAMMed2DSegmentLib.engine.session import slice_center_ras
from SAMMed2DSegmentLib.files import atomic_path
from SAMMed2DSegmentLib.formats.volumes import read_volume
from SAMMed2DSegmentLib.mrml import pictures, segmentations
from SAMMed2DSegmentLib.mrml.offscreen_views import SliceViews, can_render
from SAMMed2DSegmentLib.mrml.scene import create_headless_scene
from SAMMed2DSegmentLib.mrml.segmentations import read_segments_on_grid
from SAMMed2DSegmentLib.mrml.volumes import add_volume_from_array

TILE = 240
GREEN, MAGENTA = (0.16, 0.86, 0.24), (0.9, 0.16, 0.86)
ORANGE, GREY = (1.0, 0.6, 0.1), (0.7, 0.7, 0.7)
VIEW_OF_AXIS = {"axial": "Red", "coronal": "Green", "sagittal": "Yellow"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2 * int(np.logical_and(a, b).sum()) / total if total else 1.0


def read_segment(seg_path: Path, volume, name: str) -> np.ndarray:
    """The segment on the volume's voxel grid (KJI)."""
    segments = dict(read_segments_on_grid(seg_path, volume.array_kji, volume.ijk_to_ras))
    if name not in segments:
        raise SystemExit(f"error: {seg_path} has no segment named {name!r}")
    return segments[name]


def slice_text(slice_info: dict | None, slice_dice: float) -> tuple[str, tuple[float, float, float]]:
    """What a tile says under its slice: confidence and Dice, coloured by the slice's status."""
    if slice_info is None:
        return f"not visited  Dice {slice_dice:.2f}", GREY
    accepted = slice_info["status"] in ("prompted", "propagated", "given")
    text = f"conf {float(slice_info['confidence']):.2f}  Dice {slice_dice:.2f}"
    return (text if accepted else f"{text} (rejected)"), (GREEN if accepted else ORANGE)


def framing(view, volume, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """Where to centre the tiles and how many mm they show across: the structure (model or reference, all
    slices) with a margin, so that its outline is large enough to read."""
    kji = np.argwhere(mask)
    if not len(kji):
        return np.zeros(3), 0.0
    ras = (volume.ijk_to_ras @ np.c_[kji[:, ::-1], np.ones(len(kji))].T)[:3].T
    xy_to_ras = view.slice_node.GetXYToRAS()
    axes = [np.array([xy_to_ras.GetElement(r, c) for r in range(3)]) for c in (0, 1)]
    extent = max(float(np.ptp(ras @ (a / np.linalg.norm(a)))) for a in axes)
    return (ras.min(axis=0) + ras.max(axis=0)) / 2, 1.3 * extent + 20.0


def overview(volume, geometry: SliceGeometry, predicted: np.ndarray, reference: np.ndarray,
             report: dict, per_slice_dice: list[float], columns: int = 5) -> np.ndarray:  # fmt: skip
    """One tile per slice, drawn by Slicer's slice view for the report's axis, in rows of `columns`."""
    hs = create_headless_scene()
    node = add_volume_from_array(hs, volume.array_kji, volume.ijk_to_ras, "CT")
    pictures.set_window(node, 40, 400)
    seg = segmentations.ensure_segmentation(hs, node)
    for name, mask, colour in (("reference", reference, MAGENTA), ("model", predicted, GREEN)):
        segment = segmentations.ensure_segment(seg, name, colour)
        slices = {i: geometry.extract(mask, i) for i in range(geometry.num_slices)}
        written = {i: m for i, m in slices.items() if m.any()}
        segmentations.write_segment_slices(seg, segment, node, geometry, written)
        pictures.show_segment(seg, segment, fill=0.0, outline=1.0)
    name = VIEW_OF_AXIS[geometry.axis]
    views = SliceViews(hs, names=(name,), size=(TILE, TILE))
    view = views[name]
    view.show_volume(node)
    center, width = framing(view, volume, predicted | reference)
    if width > 0:
        pictures.zoom(view, center, width)
    by_index = {s["index"]: s for s in report["slices"]}
    tiles = []
    try:
        for index in range(geometry.num_slices):
            view.jump_to(slice_center_ras(geometry, index))
            text, colour = slice_text(by_index.get(index), per_slice_dice[index])
            captions = [pictures.add_caption(view, f"slice {index}", "upper_left", 15),
                        pictures.add_caption(view, text, "lower_left", 13, colour)]  # fmt: skip
            if index == 0:  # the legend, on the first tile
                captions += [
                    pictures.add_caption(view, "model", "upper_right", 13, GREEN),
                    pictures.add_caption(view, "reference", "upper_right", 13, MAGENTA, line=1),
                ]
            tiles.append(pictures.view_rgb(view))
            for actor in captions:
                view.renderer.RemoveViewProp(actor)
    finally:
        views.close()
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % columns)
    return pictures.grid(tiles, columns)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volume", type=Path, required=True)
    p.add_argument("--segmentation", type=Path, required=True)
    p.add_argument("--segment", required=True)
    p.add_argument("--report", type=Path, required=True)
    p.add_argument("--labels", type=Path, required=True, help="reference label map on the volume's grid")
    p.add_argument("--label-value", type=int, required=True)
    p.add_argument("--png", type=Path, required=True)
    args = p.parse_args(argv)

    volume = read_volume(args.volume)
    report = json.loads(args.report.read_text())
    geometry = SliceGeometry.create(volume.array_kji.shape, volume.ijk_to_ras, report["axis"])
    predicted = read_segment(args.segmentation, volume, args.segment)
    labels = read_volume(args.labels)
    same_grid = np.allclose(labels.ijk_to_ras, volume.ijk_to_ras, atol=1e-3)
    if labels.array_kji.shape != predicted.shape or not same_grid:
        raise SystemExit(f"error: {args.labels} is not on the volume's voxel grid")
    reference = labels.array_kji == args.label_value
    per_slice = [
        dice(geometry.extract(predicted, i), geometry.extract(reference, i))
        for i in range(geometry.num_slices)
    ]
    total = dice(predicted, reference)
    drawn = can_render()
    if drawn:
        pictures.write_png(overview(volume, geometry, predicted, reference, report, per_slice), args.png)
    else:
        print("warning: no OpenGL context for Slicer's renderer (EGL, OSMesa or X): no overview written",
              file=sys.stderr)  # fmt: skip
    print(f"Dice against the reference {args.segment} labels: {total:.3f} (3-D)")
    print("per slice: " + " ".join(f"{i}:{d:.2f}" for i, d in enumerate(per_slice)))
    if drawn:
        print(f"overview: {args.png}")
    summary = {"dice_3d": round(total, 4), "dice_per_slice": [round(d, 4) for d in per_slice]}
    with atomic_path(args.png.with_suffix(".dice.json")) as temporary:
        temporary.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

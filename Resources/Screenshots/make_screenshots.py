"""`make screenshots`: the README's pictures, drawn by Slicer's own slice views.

From the bundled CT and the bundled demo model, the liver is segmented the way `segment` does it (markups
point lists -> prompts -> the engine's session -> propagation -> the segment's slices), in a headless MRML
scene. Red, Green and Yellow slice views (`SAMMed2DSegmentLib/mrml/offscreen_views.py`: Slicer's slice logic,
segmentation and markups displayable managers, rendered offscreen) then draw the CT, the segment (Slicer's
outline and fill, in the liver's colour) and the include/exclude points. These are Slicer's slice views as
Slicer draws them, not the whole application window (no panel, no toolbar: those need a running Slicer).

    python Resources/Screenshots/make_screenshots.py [--out-dir Resources/Screenshots]

writes red-liver.png (the Red view: include and exclude points, the propagated liver), three-views.png (Red,
Green, Yellow side by side) and propagate-from-here.png (a slice fixed with an exclude click, and a slice
two above it before and after "Propagate from here").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import vtk

from SAMMed2DSegmentLib.engine.geometry import SliceGeometry
from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor
from SAMMed2DSegmentLib.engine.session import SegmentationSession, slice_center_ras
from SAMMed2DSegmentLib.formats.volumes import read_volume
from SAMMed2DSegmentLib.mrml import markups, pictures, segmentations
from SAMMed2DSegmentLib.mrml.offscreen_views import SliceViews, can_render
from SAMMed2DSegmentLib.mrml.placement import ensure_point_lists
from SAMMed2DSegmentLib.mrml.scene import create_headless_scene
from SAMMed2DSegmentLib.mrml.volumes import add_volume_from_array
from SAMMed2DSegmentLib.weights.checkpoint import load_model
from SAMMed2DSegmentLib.weights.registry import REGISTRY, resolve_model

ROOT = Path(__file__).resolve().parents[2]
CT = ROOT / "Testing" / "Data" / "totalseg-example-ct" / "ct"
INCLUDE_FILE = ROOT / "demo" / "liver-point.mrk.json"  # `make demo`'s click: slice 10, in the liver
#: The clicks a user makes (world RAS, mm). On slice 10 (the include point's), an exclude point where the
#: demo model's liver spills over the liver's medial edge. On slice 17, where the one-click result spills
#: further, an include and an exclude point fix that slice before "Propagate from here".
EXCLUDE_SLICE_10 = (55.18, 179.70, -784.5)
FIX_SLICE = 17
FIX_INCLUDE = (93.26, 129.89, -770.5)
FIX_EXCLUDE = (28.81, 138.68, -770.5)
SHOWN_AFTER_FIX = 19  # the slice shown before and after propagating from the fixed one
SOFT_TISSUE = (40.0, 400.0)  # level, width (HU)


class Demo:
    """The CT in a headless scene, the demo model's session, the liver segment, the point lists and the
    three slice views."""

    def __init__(self, view_size: int) -> None:
        volume = read_volume(CT)
        self.hs = create_headless_scene()
        self.volume = add_volume_from_array(self.hs, volume.array_kji, volume.ijk_to_ras, "CT")
        pictures.set_window(self.volume, *SOFT_TISSUE)
        self.geometry = SliceGeometry.create(volume.array_kji.shape, volume.ijk_to_ras, "axial")
        path = resolve_model("demo", download=False)
        model, info = load_model(path, device="cpu", build=REGISTRY["demo"].build)
        predictor = SamMed2DPredictor(model, precision="fp32")
        self.session = SegmentationSession(predictor, model_sha256=info.sha256)
        self.session.set_volume(volume.array_kji, volume.ijk_to_ras, volume.modality)
        self.seg = segmentations.ensure_segmentation(self.hs, self.volume)
        self.segment = segmentations.ensure_segment(self.seg, "liver")
        pictures.show_segment(self.seg, self.segment)
        # The module's include and exclude lists (names, colours); the include list gets `make demo`'s point.
        lists = SimpleNamespace(includePoints=None, excludePoints=None)
        ensure_point_lists(self.hs.scene, lists)
        self.include, self.exclude = lists.includePoints, lists.excludePoints
        for node in (self.include, self.exclude):
            node.GetDisplayNode().SetGlyphScale(2.5)
        loaded = markups.load_markups(self.hs, INCLUDE_FILE)[0]
        for point in markups.points_from_markups(loaded, 1):
            self.add_point(self.include, point.position, point.name)
        self.hs.scene.RemoveNode(loaded)
        self.views = SliceViews(self.hs, size=(view_size, view_size))
        self.views.show_volume(self.volume)

    def add_point(self, node: vtk.vtkObject, ras: tuple[float, float, float], label: str) -> None:
        node.AddControlPoint(vtk.vtkVector3d(*ras), label)

    def prompts(self) -> list:
        return markups.points_from_markups(self.include, 1) + markups.points_from_markups(self.exclude, 0)

    def run(self, points, direction: str, seed_masks: dict | None = None) -> dict[int, np.ndarray]:
        """Segment and propagate through the session, then write the accepted slices into the segment, as
        `segment` does; returns what was written."""
        for _ in self.session.propagate(points, (), "axial", direction, seed_masks=seed_masks):
            pass
        masks = self.session.last.result.masks()
        segmentations.write_segment_slices(self.seg, self.segment, self.volume, self.geometry, masks)
        return masks

    def slice_mask(self, index: int) -> np.ndarray:
        voxels = segmentations.segment_array(self.seg, self.segment, self.volume)
        return self.geometry.extract(voxels, index).astype(bool)

    def show_slice(self, index: int, width_mm: float | None = None) -> np.ndarray:
        """The Red view on slice `index` (centred on the liver and `width_mm` across, if given), as RGB."""
        red = self.views["Red"]
        if width_mm is None:
            red.fit()
            red.jump_to(slice_center_ras(self.geometry, index))
        else:
            center = np.array(FIX_INCLUDE, float)
            center[2] = slice_center_ras(self.geometry, index)[2]
            pictures.zoom(red, center, width_mm)
        return pictures.view_rgb(red)


def propagate_from_here(demo: Demo) -> np.ndarray:
    """One include click, propagated (as `make demo`); slice 17 fixed with an include and an exclude click;
    then the walk again from the fixed slice. Three panels: the fixed slice, and slice 19 before and after."""
    demo.run(demo.prompts(), "both")
    with pictures.captions(demo.views["Red"], {"upper_left": f"slice {SHOWN_AFTER_FIX}: before"}):
        before = demo.show_slice(SHOWN_AFTER_FIX, 260)
    demo.add_point(demo.include, FIX_INCLUDE, "in")
    demo.add_point(demo.exclude, FIX_EXCLUDE, "out")
    on_fixed = [p for p in demo.prompts() if abs(p.position[2] - FIX_INCLUDE[2]) < 1e-3]
    demo.run(on_fixed, "none")  # the fixed slice only
    caption = f"slice {FIX_SLICE}: fixed with an exclude click"
    with pictures.captions(demo.views["Red"], {"upper_left": caption}):
        fixed = demo.show_slice(FIX_SLICE, 260)
    demo.run((), "both", seed_masks={FIX_SLICE: demo.slice_mask(FIX_SLICE)})
    caption = f"slice {SHOWN_AFTER_FIX}: after Propagate from here"
    with pictures.captions(demo.views["Red"], {"upper_left": caption}):
        after = demo.show_slice(SHOWN_AFTER_FIX, 260)
    return pictures.grid([fixed, before, after])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--size", type=int, default=400, help="pixels across one slice view (default 400)")
    args = p.parse_args(argv)
    if not can_render():
        print("error: no OpenGL context for offscreen rendering (EGL, OSMesa or X); nothing written",
              file=sys.stderr)  # fmt: skip
        return 1

    demo = Demo(args.size)
    written = [pictures.write_png(propagate_from_here(demo), args.out_dir / "propagate-from-here.png")]
    demo.views.close()

    demo = Demo(args.size)  # a fresh scene: one include and one exclude click on slice 10, propagated
    demo.add_point(demo.exclude, EXCLUDE_SLICE_10, "out")
    demo.run(demo.prompts(), "both")
    include_ras = demo.prompts()[0].position
    for view in demo.views:
        view.fit()
        view.jump_to(include_ras)
    for name in ("Green", "Yellow"):  # 20 slices of 2 mm: a thin band unless zoomed, as in Slicer
        pictures.zoom(demo.views[name], include_ras, 160)
    red = demo.views["Red"]
    with pictures.captions(red, {"upper_left": "Red: include, exclude, propagated liver"}):
        written.append(pictures.write_png(pictures.view_rgb(red), args.out_dir / "red-liver.png"))
    shots = []
    for view in demo.views:
        with pictures.captions(view, {"upper_left": view.name}):
            shots.append(pictures.view_rgb(view))
    written.append(pictures.write_png(pictures.grid(shots), args.out_dir / "three-views.png"))
    demo.views.close()
    for path in written:
        print(f"{path} ({path.stat().st_size // 1024} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

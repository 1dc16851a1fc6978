"""Screenshots from Slicer's own slice views (`SAMMed2DSegmentLib/mrml/pictures.py` on `offscreen_views.py`):
the images have the view's size and show the CT, and the segment's colour is drawn where the segment's
voxels project through the slice node's XYToRAS and the volume's IJKToRAS, and nowhere else."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from SAMMed2DSegmentLib.engine.geometry import SliceGeometry
from SAMMed2DSegmentLib.engine.session import slice_center_ras
from SAMMed2DSegmentLib.formats.volumes import read_volume
from SAMMed2DSegmentLib.mrml import pictures, segmentations
from SAMMed2DSegmentLib.mrml.offscreen_views import SliceViews, can_render
from SAMMed2DSegmentLib.mrml.scene import create_headless_scene
from SAMMed2DSegmentLib.mrml.volumes import add_volume_from_array, array_from_vtk_matrix

pytestmark = pytest.mark.skipif(not can_render(), reason="no OpenGL context (EGL, OSMesa or X) to render")

LABELS = Path(__file__).parent / "Data" / "totalseg-example-ct" / "labels" / "labels_on_ct_grid.nrrd"
LIVER = 5
SLICES = (9, 10, 11)  # a small segment: the reference liver on three slices
SIZE = (400, 320)  # width, height: not square, so a transposed image cannot pass
GREEN = (0.1, 0.9, 0.2)
MARGIN = 2  # pixels: the outline is drawn on the boundary, and resampling may round either way


@pytest.fixture(scope="module")
def scene(ct):
    hs = create_headless_scene()
    volume = add_volume_from_array(hs, ct.array_kji, ct.ijk_to_ras, "CT")
    pictures.set_window(volume, 40, 400)
    geometry = SliceGeometry.create(ct.array_kji.shape, ct.ijk_to_ras, "axial")
    liver = read_volume(LABELS).array_kji == LIVER
    voxels = np.zeros_like(liver)
    voxels[list(SLICES)] = liver[list(SLICES)]
    seg = segmentations.ensure_segmentation(hs, volume)
    segment = segmentations.ensure_segment(seg, "liver", GREEN)
    segmentations.write_segment_slices(seg, segment, volume, geometry,
                                       {i: geometry.extract(voxels, i) for i in SLICES})  # fmt: skip
    pictures.show_segment(seg, segment, fill=0.5, outline=1.0)
    views = SliceViews(hs, size=SIZE)
    views.show_volume(volume)
    yield hs, volume, seg, segment, geometry, voxels, views
    views.close()


def coloured(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are not grey: the CT is drawn in grey levels, a segment in its colour."""
    rgb = rgb.astype(int)
    return rgb.max(axis=2) - rgb.min(axis=2) > 12


def projection(view, voxels: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    """Which display pixels (top row first) fall in a segment voxel: each pixel centre through the slice
    node's XYToRAS, then the volume's RASToIJK, rounded to the nearest voxel."""
    width, height = view.size
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    xy = np.stack([xs.ravel(), ys.ravel(), np.zeros(xs.size), np.ones(xs.size)])
    xy_to_ras = array_from_vtk_matrix(view.slice_node.GetXYToRAS())
    i, j, k = np.rint((np.linalg.inv(ijk_to_ras) @ xy_to_ras @ xy)[:3]).astype(int)
    inside = (i >= 0) & (j >= 0) & (k >= 0)
    inside &= (i < voxels.shape[2]) & (j < voxels.shape[1]) & (k < voxels.shape[0])
    hit = np.zeros(xs.size, bool)
    hit[inside] = voxels[k[inside], j[inside], i[inside]]
    return hit.reshape(height, width)[::-1]


@pytest.mark.parametrize("name", ["Red", "Green", "Yellow"])
def test_the_segment_colour_is_where_its_voxels_project(scene, ct, name):
    hs, volume, seg, segment, geometry, voxels, views = scene
    view = views[name]
    view.fit()
    if name == "Red":
        view.jump_to(slice_center_ras(geometry, SLICES[1]))
    else:  # three 2 mm slices across: zoomed in, so that they are tens of pixels high
        kji = np.argwhere(voxels)
        pictures.zoom(view, (ct.ijk_to_ras @ [*kji[len(kji) // 2][::-1], 1.0])[:3], 120)
    rgb = pictures.view_rgb(view)
    assert rgb.shape == (SIZE[1], SIZE[0], 3)
    assert rgb.astype(float).var() > 100.0  # the CT is drawn, not a blank view
    expected = projection(view, voxels, ct.ijk_to_ras)
    assert expected.sum() > 500  # the segment crosses this view
    drawn = coloured(rgb)
    near = ndimage.binary_dilation(expected, iterations=MARGIN)
    inner = ndimage.binary_erosion(expected, iterations=MARGIN)
    assert not (drawn & ~near).any(), f"{int((drawn & ~near).sum())} coloured pixels away from the segment"
    assert drawn[inner].mean() > 0.99
    # the colour is the segment's: green dominates, blended with grey (fill) or pure (outline)
    pixels = rgb[drawn & inner].astype(int)
    assert (pixels[:, 1] > pixels[:, 0]).all() and (pixels[:, 1] > pixels[:, 2]).all()


def test_no_colour_on_a_slice_without_the_segment(scene, ct):
    hs, volume, seg, segment, geometry, voxels, views = scene
    red = views["Red"]
    red.fit()
    red.jump_to(slice_center_ras(geometry, 0))
    rgb = pictures.view_rgb(red)
    assert not projection(red, voxels, ct.ijk_to_ras).any()
    assert rgb.astype(float).var() > 100.0
    assert not coloured(rgb).any()


def test_grid_and_png_round_trip(scene, tmp_path):
    hs, volume, seg, segment, geometry, voxels, views = scene
    shots = [pictures.view_rgb(view) for view in views]
    with pictures.captions(views["Red"], {"upper_left": "Red"}):
        captioned = pictures.view_rgb(views["Red"])
    assert (captioned != shots[0]).any()  # the caption is drawn...
    assert (pictures.view_rgb(views["Red"]) == shots[0]).all()  # ...and gone after the block
    composed = pictures.grid(shots, gap=4)
    assert composed.shape == (SIZE[1], 3 * SIZE[0] + 8, 3)
    assert (composed[:, SIZE[0] + 4 : 2 * SIZE[0] + 4] == shots[1]).all()
    path = pictures.write_png(composed, tmp_path / "three.png")
    assert (pictures.read_png(path) == composed).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["three.png"]  # no temporary left
    with pytest.raises(ValueError, match="differ in size"):
        pictures.grid([shots[0], shots[0][:10]])


def load_summarize():
    """`demo/summarize.py` (a script, not a package module)."""
    path = Path(__file__).resolve().parents[1] / "demo" / "summarize.py"
    spec = importlib.util.spec_from_file_location("demo_summarize", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_overview_is_a_grid_of_slice_views_with_the_reference_outline(scene, ct):
    hs, volume, seg, segment, geometry, voxels, views = scene
    summarize = load_summarize()
    predicted = ndimage.binary_erosion(voxels, iterations=6)  # the model's outline inside the reference's
    report = {"slices": [{"index": i, "status": "propagated", "confidence": 0.5} for i in SLICES]}
    per_slice = [summarize.dice(geometry.extract(predicted, i), geometry.extract(voxels, i))
                 for i in range(geometry.num_slices)]  # fmt: skip
    grid = summarize.overview(ct, geometry, predicted, voxels, report, per_slice, columns=5)
    tile, gap = summarize.TILE, 4
    assert grid.shape == (4 * tile + 3 * gap, 5 * tile + 4 * gap, 3)  # 20 slices in rows of 5

    def tile_of(index):
        r, c = divmod(index, 5)
        return grid[r * (tile + gap) : r * (tile + gap) + tile, c * (tile + gap) : c * (tile + gap) + tile]

    def magenta(rgb):
        rgb = rgb.astype(int)
        return (rgb[..., 0] > 150) & (rgb[..., 2] > 150) & (rgb[..., 1] < 100)

    for index in range(1, geometry.num_slices):  # tile 0 carries the legend, in magenta too
        assert tile_of(index).astype(float).var() > 100.0
        if index in SLICES:
            assert magenta(tile_of(index)).sum() > 50, index
        else:
            assert not magenta(tile_of(index)).any(), index

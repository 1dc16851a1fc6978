"""A job's slice writes beside many segments (a click while correcting a segmentation that already has
organs in it), through `SliceWriter`, against the paths it took before, measured in one run.

A 300×512×512 volume; `--segments` other segments (boxes of 50 slices, in two labelmap layers) and an empty
target. Each write sets one slice of the target to a disk that covers part of another segment, with the
editor's default setting (overwrite all other segments). Printed, median milliseconds:
- start of the job: the writer now (segment IDs only) against reading every other segment whole, as it did;
- one slice write over another segment: the direct write (`erase_on_slice` + in-place write) against
  Slicer's editor logic (`write_slice_as_editor`), which writes where an editable area or intensity range
  is set, and before this benchmark existed wrote every slice over another segment;
- with the segmentation shown in 3-D (closed surfaces), a job's slice writes into a large organ (an
  ellipsoid of 120 slices): the writer now (surfaces made once, at the job's end), against making the
  changed surfaces at every write (as Slicer's editor does per stroke), and against making every surface
  at every write (what the 3-D view did after each write before: each write dropped them all).

    python benchmarks/bench_slice_writer.py [--slices 300] [--segments 10] [--writes 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMMed2DSegment"))

from SAMMed2DSegmentLib.engine.geometry import SliceGeometry  # noqa: E402
from SAMMed2DSegmentLib.mrml.editing import SliceWriter, write_slice_as_editor  # noqa: E402
from SAMMed2DSegmentLib.mrml.scene import create_headless_scene  # noqa: E402
from SAMMed2DSegmentLib.mrml.segmentations import (  # noqa: E402
    ensure_segment,
    ensure_segmentation,
    segment_array,
    write_segment_slices,
)
from SAMMed2DSegmentLib.mrml.volumes import add_volume_from_array, volume_ijk_to_world  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--writes", type=int, default=5)
    args = parser.parse_args()

    shape = (args.slices, 512, 512)
    hs = create_headless_scene()
    volume = add_volume_from_array(hs, np.zeros(shape, np.int16), np.diag([0.8, 0.8, 1.5, 1.0]), "volume")
    seg = ensure_segmentation(hs, volume)
    geometry = SliceGeometry.create(shape, volume_ijk_to_world(volume), "axial")
    rng = np.random.default_rng(0)
    for n in range(args.segments):
        box = np.zeros(geometry.slice_shape, bool)
        y, x = rng.integers(0, 400, 2)
        box[y : y + 100, x : x + 100] = True
        first = int(rng.integers(0, args.slices - 50))
        write_segment_slices(seg, ensure_segment(seg, f"organ {n}"), volume, geometry,
                             {s: box for s in range(first, first + 50)})  # fmt: skip
    target = ensure_segment(seg, "target")
    others = [i for i in seg.GetSegmentation().GetSegmentIDs() if i != target]
    editor = hs.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    layers = seg.GetSegmentation().GetNumberOfLayers()
    print(f"volume {shape[0]}×{shape[1]}×{shape[2]}, {args.segments} other segments in {layers} layers")

    def covered(index: int) -> np.ndarray:
        return np.any([geometry.extract(v, index) for v in whole], axis=0)

    t = time.perf_counter()
    whole = [segment_array(seg, other, volume) for other in others]
    before_start = time.perf_counter() - t
    t = time.perf_counter()
    writer = SliceWriter(hs.scene, hs.app_logic, editor, seg, target, volume, geometry)
    now_start = time.perf_counter() - t
    busy = [i for i in range(geometry.num_slices) if covered(i).any()][: 2 * args.writes + 1]
    yy, xx = np.mgrid[:512, :512]
    times: dict[str, list[float]] = {"direct": [], "editor logic": []}
    # The first write of the empty target makes its labelmap (not timed); then the direct writes, then the
    # editor logic's: one block each, as the editor logic leaves the labelmaps cropped to their content.
    for n, index in enumerate(busy):
        ys, xs = np.nonzero(covered(index))
        disk = (yy - ys.mean()) ** 2 + (xx - xs.mean()) ** 2 < 70**2  # over the other segment's middle
        name = "direct" if n <= args.writes else "editor logic"
        t = time.perf_counter()
        if name == "direct":
            writer.write(index, disk)
        else:
            write_slice_as_editor(hs.scene, hs.app_logic, editor, seg, target, volume, geometry, index, disk)
        if n > 0:
            times[name].append(time.perf_counter() - t)
    print(f"start of a job: {now_start * 1e3:.2f} ms now, {before_start * 1e3:.0f} ms reading every other "
          f"segment whole (before): {before_start / now_start:.0f}×")  # fmt: skip
    medians = {name: float(np.median(values)) * 1e3 for name, values in times.items()}
    for name, value in medians.items():
        print(f"one slice over another segment, {name}: median {value:.1f} ms")
    print(f"ratio editor logic / direct: {medians['editor logic'] / medians['direct']:.0f}×")
    surfaces(hs, seg, volume, geometry, editor, args.writes)
    return 0


def surfaces(hs, seg, volume, geometry: SliceGeometry, editor, writes: int) -> None:
    """The 3-D part (see the module docstring); the organ is a new segment, written before the surfaces."""
    import slicer

    from SAMMed2DSegmentLib.mrml.labelmaps import remake_representations

    organ = ensure_segment(seg, "large organ")
    centre = geometry.num_slices // 2
    rows, cols = np.ogrid[: geometry.slice_shape[0], : geometry.slice_shape[1]]

    def ellipse(index: int) -> np.ndarray:  # the organ's cross-section on a slice
        scale = max(0.0, 1 - ((index - centre) / 60) ** 2)
        return ((rows - 256) / 150) ** 2 + ((cols - 256) / 180) ** 2 < scale

    write_segment_slices(
        seg, organ, volume, geometry, {s: ellipse(s) for s in range(centre - 59, centre + 60)}
    )
    segmentation = seg.GetSegmentation()
    t = time.perf_counter()
    seg.CreateClosedSurfaceRepresentation()
    every = time.perf_counter() - t
    print(f"3-D surfaces of all {segmentation.GetNumberOfSegments()} segments: {every * 1e3:.0f} ms")
    writer = SliceWriter(hs.scene, hs.app_logic, editor, seg, organ, volume, geometry)
    indices = range(centre - 58, centre - 58 + 2 * writes)
    shrunk = {s: ellipse(s) & (rows < 300) for s in indices}  # the model's new mask: part of the organ
    times: dict[str, list[float]] = {"now": [], "remade at every write": [], "every surface": []}
    for n, index in enumerate(indices):
        t = time.perf_counter()
        if n < writes:
            writer.write(index, shrunk[index])
            times["now"].append(time.perf_counter() - t)
        else:
            write_segment_slices(seg, organ, volume, geometry, {index: shrunk[index]})  # remade at once
            times["remade at every write"].append(time.perf_counter() - t)
            t = time.perf_counter()
            remake_representations(segmentation, segmentation.GetSegmentIDs())
            times["every surface"].append(time.perf_counter() - t)
    t = time.perf_counter()
    writer.finish()
    finish = time.perf_counter() - t
    name = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    assert segmentation.GetSegment(organ).GetRepresentation(name) is not None
    medians = {key: float(np.median(values)) * 1e3 for key, values in times.items()}
    print(f"one slice of the large organ, shown in 3-D: {medians['now']:.1f} ms now "
          f"(+ {finish * 1e3:.0f} ms once at the job's end); "
          f"{medians['remade at every write']:.0f} ms remaking its surface at every write; "
          f"{medians['remade at every write'] + medians['every surface']:.0f} ms remaking every surface "
          "at every write (before)")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())

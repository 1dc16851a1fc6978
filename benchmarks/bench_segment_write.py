"""Writing one slice into a segment of a large volume (what every click in the module does): the in-place
path against the general path (whole segment read and replaced), measured in one run.

A 300×512×512 volume with two segments sharing one labelmap layer (220 slices each); each timed write
replaces one slice of segment A beside B. Printed: median milliseconds of each path and their ratio.

    python benchmarks/bench_segment_write.py [--slices 300] [--writes 8]
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
from SAMMed2DSegmentLib.mrml import segmentations  # noqa: E402
from SAMMed2DSegmentLib.mrml.scene import create_headless_scene  # noqa: E402
from SAMMed2DSegmentLib.mrml.volumes import add_volume_from_array, volume_ijk_to_world  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--writes", type=int, default=8)
    args = parser.parse_args()

    shape = (args.slices, 512, 512)
    hs = create_headless_scene()
    volume = add_volume_from_array(hs, np.zeros(shape, np.int16), np.diag([0.8, 0.8, 1.5, 1.0]), "volume")
    seg = segmentations.ensure_segmentation(hs, volume)
    a, b = segmentations.ensure_segment(seg, "A"), segmentations.ensure_segment(seg, "B")
    geometry = SliceGeometry.create(shape, volume_ijk_to_world(volume), "axial")
    yy, xx = np.mgrid[:512, :512]

    def disk(cx: int, r: int) -> np.ndarray:
        return (xx - cx) ** 2 + (yy - 250) ** 2 < r * r

    filled = range(int(args.slices * 0.15), int(args.slices * 0.85))
    segmentations.write_segment_slices(seg, a, volume, geometry, {i: disk(200, 80) for i in filled})
    segmentations.write_segment_slices(seg, b, volume, geometry, {i: disk(380, 60) for i in filled})
    print(f"volume {shape[0]}×{shape[1]}×{shape[2]}, layers: {seg.GetSegmentation().GetNumberOfLayers()}")

    in_place = segmentations._write_in_place
    times: dict[str, list[float]] = {"in place": [], "general": []}
    middle = args.slices // 2
    # Blocks of consecutive writes (in place, general, in place): a general write shrinks the labelmap to its
    # content, so the in-place write right after one pays for growing it back, which clicks in a row do not.
    for name in ("in place", "general", "in place"):
        segmentations._write_in_place = in_place if name == "in place" else (lambda *_: False)
        for n in range(args.writes):
            mask = disk(205 + (n % 3), 82 + n % 4)
            t = time.perf_counter()
            segmentations.write_segment_slices(seg, a, volume, geometry, {middle + n % 5: mask})
            times[name].append(time.perf_counter() - t)
    segmentations._write_in_place = in_place
    medians = {name: float(np.median(values)) * 1e3 for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name}: median {value:.1f} ms per one-slice write")
    print(f"ratio general / in place: {medians['general'] / medians['in place']:.0f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

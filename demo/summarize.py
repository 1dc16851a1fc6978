"""The last step of `make demo`: a PNG overview of the result and its Dice against the reference labels.

The overview shows every slice of the segmented view: the CT in the soft-tissue window, the model's outline
(green), the reference outline (magenta) and, under each slice, a bar as long as the slice's confidence
(green when accepted, orange when rejected, grey when not visited). The PNG is written with SimpleITK.

    python demo/summarize.py --volume DICOM_FOLDER --segmentation OUT.seg.nrrd --segment liver \
        --report report.json --labels labels.nrrd --label-value 5 --png overview.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SAMMed2DSegmentLib.engine.geometry import SliceGeometry
from SAMMed2DSegmentLib.engine.intensity import IntensityWindow, to_uint8
from SAMMed2DSegmentLib.engine.preprocessing import opencv_nearest_indices
from SAMMed2DSegmentLib.files import atomic_path
from SAMMed2DSegmentLib.formats.volumes import read_volume
from SAMMed2DSegmentLib.mrml.segmentations import read_segments_on_grid

TILE = 192
GREEN, MAGENTA, ORANGE, GREY = (40, 220, 60), (230, 40, 220), (250, 150, 20), (90, 90, 90)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2 * int(np.logical_and(a, b).sum()) / total if total else 1.0


def read_segment(seg_path: Path, volume, name: str) -> np.ndarray:
    """The segment on the volume's voxel grid (KJI)."""
    segments = dict(read_segments_on_grid(seg_path, volume.array_kji, volume.ijk_to_ras))
    if name not in segments:
        raise SystemExit(f"error: {seg_path} has no segment named {name!r}")
    return segments[name]


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return mask & ~inner


def _nearest(image: np.ndarray, size: int) -> np.ndarray:
    rows = opencv_nearest_indices(image.shape[0], size)
    cols = opencv_nearest_indices(image.shape[1], size)
    return image[rows[:, None], cols[None, :]]


def tile(
    gray: np.ndarray, predicted: np.ndarray, reference: np.ndarray, slice_info: dict | None
) -> np.ndarray:
    rgb = np.repeat(_nearest(gray, TILE)[:, :, None], 3, axis=2)
    rgb[_outline(_nearest(reference, TILE))] = MAGENTA
    rgb[_outline(_nearest(predicted, TILE))] = GREEN
    bar = np.zeros((12, TILE, 3), np.uint8)
    if slice_info is None:
        bar[3:9, :8] = GREY
    else:
        length = max(2, int(round(TILE * float(slice_info["confidence"]))))
        colour = GREEN if slice_info["status"] in ("prompted", "propagated") else ORANGE
        bar[3:9, :length] = colour
    return np.concatenate([rgb, bar], axis=0)


def overview(volume, geometry: SliceGeometry, predicted: np.ndarray, reference: np.ndarray,
             report: dict, columns: int = 5) -> np.ndarray:  # fmt: skip
    window = IntensityWindow.from_level_width(40, 400)
    by_index = {s["index"]: s for s in report["slices"]}
    tiles = []
    for index in range(geometry.num_slices):
        gray = to_uint8(geometry.extract(volume.array_kji, index), window)
        tiles.append(tile(gray, geometry.extract(predicted, index), geometry.extract(reference, index),
                          by_index.get(index)))  # fmt: skip
    blank = np.zeros_like(tiles[0])
    tiles += [blank] * (-len(tiles) % columns)
    rows = [np.concatenate(tiles[r : r + columns], axis=1) for r in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=0)


def write_png(rgb: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(np.ascontiguousarray(rgb), isVector=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    sitk.WriteImage(image, str(tmp))
    tmp.replace(path)


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
    write_png(overview(volume, geometry, predicted, reference, report), args.png)

    per_slice = [
        dice(geometry.extract(predicted, i), geometry.extract(reference, i))
        for i in range(geometry.num_slices)
    ]
    total = dice(predicted, reference)
    print(f"Dice against the reference {args.segment} labels: {total:.3f} (3-D)")
    print("per slice: " + " ".join(f"{i}:{d:.2f}" for i, d in enumerate(per_slice)))
    print(f"overview: {args.png}")
    summary = {"dice_3d": round(total, 4), "dice_per_slice": [round(d, 4) for d in per_slice]}
    with atomic_path(args.png.with_suffix(".dice.json")) as temporary:
        temporary.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

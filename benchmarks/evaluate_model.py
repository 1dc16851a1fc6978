"""Dice of a model on the bundled DICOM CT (the demo model's held-out patient), beside two simple baselines.

For each large organ, on every axial slice where it covers ≥ 500 voxels: one include point (deep inside the
organ), three random include points, and the organ's tight box; then propagation through the volume from
one point on the organ's largest slice, scored in 3-D. Points are followed by the engine's "keep the pieces
under the points" step. Baselines: the box filled, and a region grow of ±35 HU from the point.

    python benchmarks/evaluate_model.py [--checkpoint FILE] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMMed2DSegment"))

from SAMMed2DSegmentLib.engine.geometry import SliceGeometry  # noqa: E402
from SAMMed2DSegmentLib.engine.intensity import default_window, to_uint8  # noqa: E402
from SAMMed2DSegmentLib.engine.masks import components_touching, interior_point  # noqa: E402
from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor  # noqa: E402
from SAMMed2DSegmentLib.engine.prompts import PointPrompt  # noqa: E402
from SAMMed2DSegmentLib.engine.segmenter import segment_volume  # noqa: E402
from SAMMed2DSegmentLib.formats.volumes import read_volume  # noqa: E402
from SAMMed2DSegmentLib.weights.checkpoint import load_model  # noqa: E402

DATA = REPO / "Testing" / "Data" / "totalseg-example-ct"
DEMO_MODEL = REPO / "SAMMed2DSegment" / "Resources" / "Models" / "sammed2d_demo_small.safetensors"
ORGANS = {"liver": 5, "spleen": 1, "stomach": 6}
MIN_VOXELS = 500


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


def region_grow(image: np.ndarray, seed_xy: tuple[int, int], tolerance: float = 35.0) -> np.ndarray:
    """Connected pixels within ±tolerance HU of the seed (2-D or 3-D; seed in array order reversed)."""
    img = sitk.GetImageFromArray(image.astype(np.float32))
    value = float(image[tuple(reversed(seed_xy))])
    grown = sitk.ConnectedThreshold(img, seedList=[tuple(int(v) for v in seed_xy)],
                                    lower=value - tolerance, upper=value + tolerance)  # fmt: skip
    return sitk.GetArrayFromImage(grown).astype(bool)


def evaluate(checkpoint: Path, seed: int = 0) -> dict:
    torch.set_num_threads(2)
    volume = read_volume(DATA / "ct")
    label_volume = read_volume(DATA / "labels" / "labels_on_ct_grid.nrrd")
    if not np.allclose(label_volume.ijk_to_ras, volume.ijk_to_ras, atol=1e-3):
        raise SystemExit("the reference labels are not on the CT's voxel grid")
    labels = label_volume.array_kji
    geometry = SliceGeometry.create(volume.array_kji.shape, volume.ijk_to_ras, "axial")
    window = default_window(volume.array_kji, volume.modality)
    model, info = load_model(checkpoint)
    predictor = SamMed2DPredictor(model)
    rng = np.random.default_rng(seed)

    encode_times = []
    images, hu = {}, {}
    for index in range(geometry.num_slices):
        hu[index] = geometry.extract(volume.array_kji, index).astype(np.float32)
        images[index] = to_uint8(hu[index], window)
    embeddings = {}
    for index, image in images.items():
        t = time.perf_counter()
        predictor.set_image(image)
        encode_times.append(time.perf_counter() - t)
        embeddings[index] = predictor.get_image_embedding()
    shape = geometry.slice_shape

    def predict(index: int, points=None, box=None) -> np.ndarray:
        predictor.set_embedding(embeddings[index], shape)
        if points is not None:
            pts = np.asarray(points, dtype=np.float64)
            mask = predictor.predict(pts, np.ones(len(pts), int), box)[0][0]
            return components_touching(mask, pts)
        return predictor.predict(box=np.asarray(box, dtype=np.float64))[0][0]

    results: dict = {"checkpoint": str(checkpoint.name), "sha256": info.sha256, "build": info.build,
                     "window": [window.low, window.high], "organs": {}}  # fmt: skip
    t = time.perf_counter()
    for organ, value in ORGANS.items():
        truth_volume = np.stack([geometry.extract(labels, i) == value for i in range(geometry.num_slices)])
        scores: dict[str, list[float]] = {k: [] for k in ("point", "points3", "box", "box_filled", "grow")}
        areas = truth_volume.sum(axis=(1, 2))
        for index in np.nonzero(areas >= MIN_VOXELS)[0]:
            truth = truth_volume[index]
            x, y = interior_point(truth)
            ys, xs = np.nonzero(truth)
            pick = rng.choice(len(xs), 3, replace=False)
            box = [xs.min(), ys.min(), xs.max(), ys.max()]
            scores["point"].append(dice(predict(index, [(x, y)]), truth))
            scores["points3"].append(dice(predict(index, list(zip(xs[pick], ys[pick], strict=True))), truth))
            scores["box"].append(dice(predict(index, box=box), truth))
            filled = np.zeros_like(truth)
            filled[box[1] : box[3] + 1, box[0] : box[2] + 1] = True
            scores["box_filled"].append(dice(filled, truth))
            scores["grow"].append(dice(region_grow(hu[int(index)], (x, y)), truth))
        if not scores["point"]:
            continue
        seed_slice = int(np.argmax(areas))
        x, y = interior_point(truth_volume[seed_slice])
        ras = geometry.continuous_to_ras([[seed_slice, x, y]])[0]
        seg = segment_volume(predictor, volume.array_kji, volume.ijk_to_ras, window,
                             [PointPrompt(tuple(ras), 1)], axis="axial", direction="both")  # fmt: skip
        predicted = np.zeros_like(truth_volume)
        for index, mask in seg.result.masks().items():
            predicted[index] = mask
        grow3d = region_grow(np.stack([hu[i] for i in range(geometry.num_slices)]), (x, y, seed_slice))
        results["organs"][organ] = {
            "slices": len(scores["point"]),
            **{k: round(float(np.mean(v)), 3) for k, v in scores.items()},
            "propagation_3d": round(dice(predicted, truth_volume), 3),
            "propagation_slices": len(seg.result.masks()),
            "grow_3d": round(dice(grow3d, truth_volume), 3),
        }
    results["eval_seconds"] = round(time.perf_counter() - t, 1)
    results["encoder_s_per_slice"] = round(float(np.median(encode_times)), 4)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEMO_MODEL)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = evaluate(args.checkpoint)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

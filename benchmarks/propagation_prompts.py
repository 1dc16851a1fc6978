"""Which prompts propagation should derive from the previous slice: box + interior point (the default), or
box + point + the previous slice's mask (sigmoid of its low-resolution logits) as mask prompt.

One seed on each structure's largest slice (its deepest point, or its box), propagated both ways; 3-D Dice
against the labels. The choice is made on the training patient (NIfTI CT: axial and coronal); the unseen
DICOM CT is shown for information only.

    python benchmarks/propagation_prompts.py [--model NAME | --checkpoint FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMMed2DSegment"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor  # noqa: E402
from SAMMed2DSegmentLib.engine.propagation import PropagationSettings  # noqa: E402
from SAMMed2DSegmentLib.engine.session import SegmentationSession  # noqa: E402
from SAMMed2DSegmentLib.evaluation.protocol import first_prompt, largest_slice, propagation_dice  # noqa: E402
from SAMMed2DSegmentLib.formats.volumes import read_labels_on_grid, read_volume  # noqa: E402
from SAMMed2DSegmentLib.weights.checkpoint import load_model  # noqa: E402
from SAMMed2DSegmentLib.weights.registry import intensity_rule, resolve_model  # noqa: E402

DATA = REPO / "Testing" / "Data" / "totalseg-example-ct"
CASES = [
    ("training patient", DATA / "nifti" / "example_ct_sm.nii.gz", DATA / "nifti" / "example_seg.nii.gz",
     ("axial", "coronal")),
    ("unseen DICOM CT", DATA / "ct", DATA / "labels" / "labels_on_ct_grid.nrrd", ("axial",)),
]  # fmt: skip
ORGANS = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "stomach": 6}
VARIANTS = {
    "box + point": PropagationSettings(),
    "box + point + mask": PropagationSettings(use_mask_prompt=True),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--model", default="demo")
    group.add_argument("--checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = args.checkpoint or resolve_model(args.model)
    model, info = load_model(path)
    predictor = SamMed2DPredictor(model, precision="fp32")
    session = SegmentationSession(predictor, intensity_rule=intensity_rule(path))
    print("| case | axis | organ | seed | " + " | ".join(VARIANTS) + " |")
    print("|---|---|---|---|" + "---|" * len(VARIANTS))
    means: dict[tuple[str, str], list[float]] = {}
    for case, volume_path, label_path, axes in CASES:
        volume = read_volume(volume_path)
        labels = read_labels_on_grid(label_path, volume.array_kji.shape, volume.ijk_to_ras)
        session.set_volume(volume.array_kji, volume.ijk_to_ras, volume.modality, key=str(volume_path))
        for axis in axes:
            geometry = session.volume.geometry(axis)
            for organ, value in ORGANS.items():
                truth = labels == value
                if truth.sum() < 500:
                    continue
                seed = largest_slice(geometry, truth)
                label = np.ascontiguousarray(geometry.view(truth, seed))
                for first in ("point", "box"):
                    prompt = first_prompt(label, first, geometry.pixel_spacing)
                    scores = []
                    for name, settings in VARIANTS.items():
                        engine = session.engine(axis, settings)
                        score, _ = propagation_dice(engine, geometry, truth, seed, prompt)
                        scores.append(score)
                        means.setdefault((case, name), []).append(score)
                    cells = " | ".join(f"{v:.3f}" for v in scores)
                    print(f"| {case} | {axis} | {organ} | {first} | {cells} |", flush=True)
    for (case, name), values in means.items():
        print(f"mean over {case}, {name}: {np.mean(values):.3f} ({len(values)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How demo model candidates are compared: on patients other than the evaluation patient only.

Two validation patients, each scored by the mean of three per-slice protocols (one include point at the
label's deepest point, the label's box, and the box followed by 5 corrective clicks as `evaluate` runs them),
then averaged over the patients:

- the training patient's held-out axial band (the slices `finetune` never trains on), every labelled
  structure with ≥ 25 pixels, as `finetune` validates;
- MSD spleen 8 (`Testing/Data/msd-spleen-8`), a contrast CT with a manual label that no demo model is
  trained on, every axial slice holding ≥ 25 spleen pixels.

The DICOM CT, where the model card's targets are measured, takes no part.

    python benchmarks/select_model.py CHECKPOINT [CHECKPOINT ...]
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
from SAMMed2DSegmentLib.engine.session import SegmentationSession  # noqa: E402
from SAMMed2DSegmentLib.evaluation.protocol import engine_predict, interactive_slice  # noqa: E402
from SAMMed2DSegmentLib.finetune.data import load_training_set  # noqa: E402
from SAMMed2DSegmentLib.finetune.settings import FinetuneConfig  # noqa: E402
from SAMMed2DSegmentLib.formats.volumes import read_labels_on_grid, read_volume  # noqa: E402
from SAMMed2DSegmentLib.weights.checkpoint import load_model  # noqa: E402
from SAMMed2DSegmentLib.weights.registry import intensity_rule  # noqa: E402

DATA = REPO / "Testing" / "Data"
NIFTI = DATA / "totalseg-example-ct" / "nifti"
MSD = DATA / "msd-spleen-8"
#: (name, image, labels): the training patient, then the validation-only patient
PATIENTS = [
    ("training patient, held-out band", NIFTI / "example_ct_sm.nii.gz", NIFTI / "example_seg.nii.gz"),
    ("MSD spleen 8 (never trained on)", MSD / "spleen_8_ct.nii.gz", MSD / "spleen_8_label.nii.gz"),
]
PROTOCOLS = ("point", "box", "box + 5 clicks")


def validation_pairs() -> dict[int, list[tuple[int, int]]]:
    """Per patient, the (axial slice, label value) pairs `finetune` validates on: the training patient's
    held-out band and every labelled slice of the validation-only patient, as `load_training_set` picks them
    (no rule restated here)."""
    (_, train_image, train_labels), (_, val_image, val_labels) = PATIENTS
    data = load_training_set([(train_image, train_labels)], FinetuneConfig(), [(val_image, val_labels)])
    pairs: dict[int, list[tuple[int, int]]] = {0: [], 1: []}
    for item, value in data.validation:
        pairs[item.volume].append((item.index, value))
    return pairs


def score_patient(
    session: SegmentationSession, image: Path, labels: Path, pairs: list[tuple[int, int]]
) -> dict[str, float | int]:
    """Mean Dice per protocol over the patient's (slice, structure) pairs, and their number ("pairs"),
    scored through the engine at the slice's own resolution."""
    volume = read_volume(image)
    label_map = read_labels_on_grid(labels, volume.array_kji.shape, volume.ijk_to_ras)
    session.set_volume(volume.array_kji, volume.ijk_to_ras, volume.modality, key=str(image))
    geometry = session.volume.geometry("axial")
    engine = session.engine("axial")
    scores: dict[str, list[float]] = {name: [] for name in PROTOCOLS}
    for index, value in pairs:
        truth = np.ascontiguousarray(geometry.view(label_map, index)) == value
        predict = engine_predict(engine, index)
        scores["point"].append(interactive_slice(predict, truth, "point", 0, geometry.pixel_spacing)[0])
        curve = interactive_slice(predict, truth, "box", 5, geometry.pixel_spacing)
        scores["box"].append(curve[0])
        scores["box + 5 clicks"].append(curve[-1])
    result = {name: float(np.mean(v)) for name, v in scores.items()}
    result["pairs"] = len(scores["point"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pairs = validation_pairs()
    print("| checkpoint | patient | pairs | " + " | ".join(PROTOCOLS) + " | mean |")
    print("|---|---|---|" + "---|" * (len(PROTOCOLS) + 1))
    for path in args.checkpoints:
        model, _ = load_model(path)
        session = SegmentationSession(
            SamMed2DPredictor(model, precision="fp32"), intensity_rule=intensity_rule(path)
        )
        means = []
        for number, (name, image, labels) in enumerate(PATIENTS):
            r = score_patient(session, image, labels, pairs[number])
            means.append(float(np.mean([r[p] for p in PROTOCOLS])))
            cells = " | ".join(f"{r[p]:.3f}" for p in PROTOCOLS)
            print(f"| {Path(path).name} | {name} | {r['pairs']} | {cells} | {means[-1]:.4f} |", flush=True)
        print(f"| {Path(path).name} | **score (mean over patients)** | | | | | **{np.mean(means):.4f}** |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

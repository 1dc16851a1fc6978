"""`make evaluate`: the `evaluate` command (box + corrective clicks) for liver, spleen, kidneys and stomach on
both bundled CTs, one JSON per case and one table.

The DICOM CT is a patient the demo model never saw; the NIfTI CT is the demo model's training patient (its
figures measure fit, not generalisation). The DICOM CT's labels have no kidneys.

    python benchmarks/evaluate_all.py [--model NAME | --checkpoint FILE] [--max-clicks 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMMed2DSegment"))

import numpy as np  # noqa: E402

from SAMMed2DSegmentLib import commands  # noqa: E402
from SAMMed2DSegmentLib.formats.volumes import read_volume  # noqa: E402

DATA = REPO / "Testing" / "Data" / "totalseg-example-ct"
CASES = {
    "DICOM CT (unseen)": (DATA / "ct", DATA / "labels" / "labels_on_ct_grid.nrrd"),
    "NIfTI CT (training patient)": (
        DATA / "nifti" / "example_ct_sm.nii.gz",
        DATA / "nifti" / "example_seg.nii.gz",
    ),
}
ORGANS = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "stomach": 6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model")
    model.add_argument("--checkpoint")
    parser.add_argument("--max-clicks", type=int, default=5)
    parser.add_argument("--first", default="box", choices=["box", "point"])
    parser.add_argument("--out", default=str(REPO / "out" / "evaluate"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = ["--checkpoint", args.checkpoint] if args.checkpoint else ["--model", args.model or "demo"]
    rows = []
    for case, (volume, labels) in CASES.items():
        present = set(np.unique(read_volume(labels).array_kji).tolist())
        for organ, value in ORGANS.items():
            if value not in present:
                rows.append((case, organ, None))
                continue
            target = out / f"{case.split()[0].lower()}-{organ}.json"
            argv = ["evaluate", "--volume", str(volume), "--labels", str(labels), "--label-value", str(value),
                    "--protocol", "clicks", "--max-clicks", str(args.max_clicks), "--first", args.first,
                    "--precision", "fp32", "--json", str(target), "--quiet", *chosen]  # fmt: skip
            if target.exists():
                target.unlink()
            code = commands.main(argv)
            if code != 0:
                rows.append((case, organ, None))
                continue
            rows.append((case, organ, json.loads(target.read_text())))
    header = (f"| CT | organ | slices | {args.first} | +{args.max_clicks} clicks | AUC | propagation 3-D "
              "| region grow, slices | region grow 3-D |")  # fmt: skip
    print(header)
    print("|" + "---|" * 9)
    for case, organ, r in rows:
        if r is None:
            print(f"| {case} | {organ} | – | not in the labels | | | | | |")
            continue
        b = r["baseline"]
        first, final = r["dice_per_click"][0], r["final_dice"]
        print(f"| {case} | {organ} | {len(r['slices'])} | {first:.3f} | {final:.3f} | {r['dice_auc']:.3f} "
              f"| {r['propagation_dice']:.3f} | {b['dice']:.3f} | {b['propagation_dice']:.3f} |")  # fmt: skip
    print(f"(JSON per case in {out}; window: the model's rule; precision fp32)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

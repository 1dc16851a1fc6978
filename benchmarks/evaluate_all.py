"""`make evaluate`: the `evaluate` command for liver, spleen, kidneys and stomach on both bundled CTs, with
both protocols: `clicks` (box + corrective clicks on every slice) and `cvpr25` (the CVPR 2025 interactive
challenge: box on the middle slice, propagation, 3-D corrective clicks); one JSON per case and protocol, and
two tables (the second puts the cvpr25 scores beside the 2-D protocol's).

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
    rows, cvpr, absent = [], [], set()
    for case, (volume, labels) in CASES.items():
        present = set(np.unique(read_volume(labels).array_kji).tolist())
        for organ, value in ORGANS.items():
            if value not in present:
                rows.append((case, organ, None))
                cvpr.append((case, organ, None))
                absent.add((case, organ))
                continue
            common = ["evaluate", "--volume", str(volume), "--labels", str(labels),
                      "--label-value", str(value), "--max-clicks", str(args.max_clicks),
                      "--precision", "fp32", "--quiet", *chosen]  # fmt: skip
            name = f"{case.split()[0].lower()}-{organ}"
            rows.append((case, organ, run(common + ["--protocol", "clicks", "--first", args.first],
                                          out / f"{name}.json")))  # fmt: skip
            cvpr.append((case, organ, run(common + ["--protocol", "cvpr25"], out / f"{name}-cvpr25.json")))
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
    print()
    print_cvpr25(rows, cvpr, absent, args.max_clicks)
    return 0


def run(argv: list[str], target: Path) -> dict | None:
    """One `evaluate` run into `target` (a fresh file); its JSON, or None when it failed."""
    if target.exists():
        target.unlink()
    if commands.main([*argv, "--json", str(target)]) != 0:
        return None
    return json.loads(target.read_text())


def print_cvpr25(rows: list, cvpr: list, absent: set, clicks: int) -> None:
    """The cvpr25 table, with the 2-D protocol's box and final Dice and its one-seed propagation beside it."""
    print(f"| CT | organ | 2-D box | 2-D +{clicks} clicks | 2-D propagation 3-D | cvpr25 DSC box "
          f"| final DSC | final NSD | DSC AUC | NSD AUC | clicks fg/bg | s |")  # fmt: skip
    print("|" + "---|" * 12)
    for (case, organ, r2), (_, _, r) in zip(rows, cvpr, strict=True):
        if r is None:
            why = "not in the labels" if (case, organ) in absent else "failed"
            print(f"| {case} | {organ} | – | | | {why} | | | | | | |")
            continue
        kinds = [c["label"] for c in r["clicks"]]
        two_d = (f"{r2['dice_per_click'][0]:.3f} | {r2['final_dice']:.3f} | {r2['propagation_dice']:.3f}"
                 if r2 is not None else "– | – | –")  # fmt: skip
        print(f"| {case} | {organ} | {two_d} | {r['dsc_per_step'][0]:.3f} | {r['final_dsc']:.3f} "
              f"| {r['final_nsd']:.3f} | {r['dsc_auc']:.3f} | {r['nsd_auc']:.3f} "
              f"| {kinds.count('fg')}/{kinds.count('bg')} | {r['seconds']:.0f} |")  # fmt: skip
    print(
        f"(cvpr25: DSC/NSD at 2 mm after the box and each of {clicks} clicks; AUC over the click steps "
        f"(0..{max(clicks - 1, 0)}), as the challenge computes it; s: the protocol's time, noisy)"
    )


if __name__ == "__main__":
    raise SystemExit(main())

"""DICOM-SEG export of a 512×512×200 two-segment segmentation: time and peak memory (target ≤ 3 s, ≤ 1 GB).

The 200-slice series is the bundled 20-slice CT's headers repeated along the slice normal (new instance
UIDs and positions, 2 mm apart); the two segments are its liver and spleen labels, tiled the same way.
Peak memory is the process's maximum resident set size (`ru_maxrss`), printed before and after the export.

    python benchmarks/bench_dicom_seg.py [--runs 3] [--fractional]
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMMed2DSegment"))

from SAMMed2DSegmentLib.formats.dicom.seg_write import SegmentSpec, write_dicom_seg  # noqa: E402
from SAMMed2DSegmentLib.formats.dicom.series import read_series_datasets  # noqa: E402

CT = REPO / "Testing" / "Data" / "totalseg-example-ct"
SLICES = 200


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def series_200() -> list:
    source = read_series_datasets(CT / "ct")
    step = np.asarray(source[1].ImagePositionPatient, float) - np.asarray(
        source[0].ImagePositionPatient, float
    )
    origin = np.asarray(source[0].ImagePositionPatient, float)
    out = []
    for k in range(SLICES):
        ds = copy.deepcopy(source[k % len(source)])
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * step]
        ds.SliceLocation = f"{float(origin[2] + k * step[2]):.4f}"
        out.append(ds)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--fractional", action="store_true")
    args = parser.parse_args()

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(CT / "labels" / "labels_on_ct_grid.nrrd")))
    tiled = np.concatenate([labels] * (SLICES // len(labels)))
    datasets = series_200()
    if args.fractional:
        segments = [
            SegmentSpec(n, (tiled == v).astype(np.float32) * 0.8) for n, v in (("liver", 5), ("spleen", 1))
        ]
    else:
        segments = [SegmentSpec("liver", tiled == 5), SegmentSpec("spleen", tiled == 1)]
    before = rss_mb()
    kind = "FRACTIONAL" if args.fractional else "BINARY"
    size = f"{len(datasets)} × {datasets[0].Rows}×{datasets[0].Columns}"
    print(f"series {size}, two segments ({kind}); peak RSS before export {before:.0f} MB")
    times = []
    with tempfile.TemporaryDirectory() as folder:
        for run in range(args.runs):
            out = Path(folder) / f"seg{run}.dcm"
            t = time.perf_counter()
            write_dicom_seg(datasets, segments, out, model_hash="0" * 64, fractional=args.fractional)
            times.append(time.perf_counter() - t)
            print(f"run {run + 1}: {times[-1]:.2f} s, file {out.stat().st_size / 1e6:.1f} MB")
    after = rss_mb()
    print(f"export median {np.median(times):.2f} s (min {min(times):.2f}); process peak RSS {after:.0f} MB "
          f"(+{after - before:.0f} MB during the exports)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`batch` throughput on this machine (not a test: it prints figures, asserts nothing).

    .venv/bin/python benchmarks/bench_batch.py [--cases 6] [--workers 1 2] [--model demo]

A manifest of N cases on the bundled 20-slice DICOM CT (the demo's liver point, propagated both ways,
--precision fp32), run by `python -m SAMMed2DSegmentLib batch` on a LocalCluster with each worker count in
turn, in a fresh process each time (cluster start-up, imports and one model load per worker included, as a
user sees them). Prints wall seconds, cases per minute, the ratio to the first worker count, and the peak
resident memory (VmHWM) of each worker from the case reports. On a machine shared with other work the
figures move by tens of percent: the load average is printed beside each run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT / "Testing" / "Data" / "totalseg-example-ct" / "ct"
POINT = ROOT / "demo" / "liver-point.mrk.json"


def run(manifest: Path, out: Path, workers: int, model: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "SAMMed2DSegment")}
    command = [sys.executable, "-m", "SAMMed2DSegmentLib", "batch", "--manifest", str(manifest),
               "--out-dir", str(out), "--workers", str(workers), "--model", model, "--precision", "fp32",
               "--quiet"]  # fmt: skip
    load = os.getloadavg()[0]
    t = time.perf_counter()
    status = subprocess.run(command, env=env).returncode
    seconds = time.perf_counter() - t
    rows = json.loads((out / "summary.json").read_text())["cases"]
    peaks: dict[str, float] = {}
    for row in rows:
        if row["status"] == "done":
            record = json.loads((out / row["case"] / "report.json").read_text())["batch"]
            peaks[record["worker"]] = max(peaks.get(record["worker"], 0.0), record["peak_memory_mb"])
    return {"status": status, "seconds": seconds, "done": sum(r["status"] == "done" for r in rows),
            "peaks": sorted(peaks.values()), "load": load}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="demo")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as folder:
        root = Path(folder)
        manifest = root / "cases.csv"
        rows = [f"case{n:02d},{CT},{POINT},both" for n in range(options.cases)]
        manifest.write_text("\n".join(["case,volume,include,propagate", *rows]) + "\n", encoding="utf-8")
        first = None
        for workers in options.workers:
            result = run(manifest, root / f"out-{workers}", workers, options.model)
            rate = result["done"] / result["seconds"] * 60
            first = first or rate
            peaks = ", ".join(f"{p:.0f}" for p in result["peaks"])
            print(
                f"{workers} worker(s): {result['done']}/{options.cases} cases in {result['seconds']:.1f} s = "
                f"{rate:.2f} cases/min (×{rate / first:.2f}); peak memory per worker {peaks} MiB; "
                f"load average before {result['load']:.1f}; exit {result['status']}",
                flush=True,
            )


if __name__ == "__main__":
    main()

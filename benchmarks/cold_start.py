"""The cold-start breakdown of an engine, each start in a fresh interpreter (prints, asserts nothing):
torch import, checkpoint load (a .pth whose conversion is already in a warm cache), precision preparation
(a bf16 predictor made), first decode (a mask from a cached embedding, as with a warm embedding cache), first
encode (fp32, what `auto` picks on a CPU without bf16). Random ViT-B weights: the timings do not depend on
the values. `--compare-with FOLDER` times another checkout's `SAMMed2DSegment` folder in the same run,
alternating with this one, so both see the same load (run by `bench_engine.py --cold-start`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STAGES = ("torch import", "checkpoint load", "precision preparation", "first decode", "first encode")

ONE_START = r"""
import json, sys, time
t = time.perf_counter()
import torch
times = {"torch import": time.perf_counter() - t}
import numpy as np
from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor
from SAMMed2DSegmentLib.weights.checkpoint import load_model
ckpt, cache = sys.argv[1], sys.argv[2]
t = time.perf_counter()
model, _ = load_model(ckpt, device="cpu", cache_dir=cache)
times["checkpoint load"] = time.perf_counter() - t
t = time.perf_counter()
SamMed2DPredictor(model, precision="bf16")
times["precision preparation"] = time.perf_counter() - t
predictor = SamMed2DPredictor(model, precision="fp32")
embedding = torch.zeros(1, 256, 16, 16)
t = time.perf_counter()
predictor.set_embedding(embedding, (512, 512))
predictor.predict(np.array([[256.0, 256.0]]), np.array([1]))
times["first decode"] = time.perf_counter() - t
t = time.perf_counter()
predictor.set_image(np.zeros((512, 512), np.uint8))
times["first encode"] = time.perf_counter() - t
print(json.dumps(times))
"""


def one_start(lib: Path, ckpt: Path, cache: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(lib)}
    out = subprocess.run([sys.executable, "-c", ONE_START, str(ckpt), str(cache)], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare-with", help="another checkout's SAMMed2DSegment folder (e.g. before)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    libs = {"this checkout": ROOT / "SAMMed2DSegment"}
    if args.compare_with:
        libs = {"compared": Path(args.compare_with), **libs}
    sys.path.insert(0, str(ROOT / "SAMMed2DSegment"))
    import torch

    from SAMMed2DSegmentLib.model import build_sam_med2d

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ckpt = Path(tmp) / "vit_b.pth"
        torch.save({"model": build_sam_med2d("vit_b").state_dict()}, ckpt)
        caches = {name: Path(tmp) / f"cache-{n}" for n, name in enumerate(libs)}
        for name, lib in libs.items():  # the conversion: once, before any timed start (a warm cache)
            one_start(lib, ckpt, caches[name])
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in libs}
        for _ in range(args.repeats):
            for name, lib in libs.items():
                runs[name].append(one_start(lib, ckpt, caches[name]))
    print(f"cold start, vit_b, warm checkpoint cache, median of {args.repeats} fresh interpreters each, s:")
    print(f"  {'stage':<24}" + "".join(f"{name:>16}" for name in libs))
    for stage in STAGES:
        cells = "".join(f"{statistics.median(r[stage] for r in runs[name]):>16.2f}" for name in libs)
        print(f"  {stage:<24}{cells}")
    totals = {"start -> first mask, cached embedding": STAGES[:4], "start -> first mask, encoded": STAGES}
    for label, stages in totals.items():
        cells = "".join(f"{statistics.median(sum(r[s] for s in stages) for r in runs[name]):>16.2f}"
                        for name in libs)  # fmt: skip
        print(f"  {label}: {cells}")


if __name__ == "__main__":
    main()

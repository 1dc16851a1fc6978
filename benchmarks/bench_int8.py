"""Does a dynamic-int8 encoder earn its place on this CPU? (Not a test: it prints figures, asserts nothing.)

    .venv/bin/python benchmarks/bench_int8.py [--runs 5] [--threads 2]

The candidate is PyTorch's dynamic quantization of every `nn.Linear` of the ViT-B image encoder (weights int8
per tensor, activations quantized per call; fbgemm/oneDNN kernels, which use AVX2 or AVX-VNNI dot products).
It is timed interleaved with the fp32 encoder (synthetic weights, the golden image), so both see the same
load, and compared with fp32 by embedding cosine. `auto` would need ≥ 1.5× and cosine ≥ 0.999 (issue 27),
plus masks agreeing with fp32 on the bundled CT, before it could pick int8; this script says whether the
first two hold here.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "SAMMed2DSegment"))

from SAMMed2DSegmentLib.engine.precision import cpu_flags  # noqa: E402
from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor  # noqa: E402
from SAMMed2DSegmentLib.model import build_sam_med2d  # noqa: E402
from Testing.synthetic_weights import REFERENCE, synthetic_state_dict  # noqa: E402


class QuantizedQKV(torch.nn.Module):
    """A dynamically quantized qkv projection that still offers `.bias` as a tensor: the encoder fills
    window padding with the qkv bias (the padding tokens are zero after norm1)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.quantized = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8
        )
        self.bias = linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized(x)


def int8_encoder(encoder: torch.nn.Module) -> torch.nn.Module:
    encoder = copy.deepcopy(encoder)
    for block in encoder.blocks:
        block.attn.qkv = QuantizedQKV(block.attn.qkv)
    return torch.ao.quantization.quantize_dynamic(encoder, {torch.nn.Linear}, dtype=torch.qint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_sam_med2d("vit_b")
    model.load_state_dict(synthetic_state_dict("vit_b"), strict=True)
    model.eval()
    with np.load(REFERENCE / "golden_vit_b.npz") as golden:
        image = golden["img2_image"]
    x = SamMed2DPredictor(model).preprocess(image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        quantized = int8_encoder(model.image_encoder)
    flags = cpu_flags()
    shown = sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, quantized engine "
          f"{torch.backends.quantized.engine}; CPU flags: {' '.join(shown) or 'unknown'}")  # fmt: skip
    fp32_times, int8_times = [], []
    with torch.inference_mode():
        reference = model.image_encoder(x)
        candidate = quantized(x)
        for _ in range(args.runs):
            for encoder, times in ((model.image_encoder, fp32_times), (quantized, int8_times)):
                start = time.perf_counter()
                encoder(x)
                times.append(time.perf_counter() - start)
    cosine = torch.nn.functional.cosine_similarity(reference.flatten(), candidate.flatten(), dim=0).item()
    fp32, int8 = statistics.median(fp32_times), statistics.median(int8_times)
    print(f"fp32 encoder median {fp32:.3f} s/slice, dynamic int8 {int8:.3f} s/slice over {args.runs} "
          f"interleaved runs: {fp32 / int8:.2f}× (needs ≥ 1.5×); embedding cosine to fp32 {cosine:.5f} "
          f"(needs ≥ 0.999)")  # fmt: skip


if __name__ == "__main__":
    main()

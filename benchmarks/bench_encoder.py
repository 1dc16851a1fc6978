"""Encoder / decoder benchmark for the SAM-Med2D network (not a test: it prints figures, asserts nothing).

    make bench      # or: .venv/bin/python benchmarks/bench_encoder.py [--build vit_b] [--runs 7]

Prints, measured in one run on this machine: encoder seconds per slice (median after warm-up), decoder
milliseconds per prompt, the encoder's FLOPs (torch.utils.flop_counter) and achieved GFLOP/s, this machine's
fp32 matmul throughput (2048², same thread count, measured before and after the encoder runs) and the ratio,
and parity of the embedding against the official golden output (synthetic weights).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "SAMMed2DSegment"))

from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor  # noqa: E402
from SAMMed2DSegmentLib.model import build_sam_med2d  # noqa: E402
from Testing.synthetic_weights import REFERENCE, synthetic_state_dict  # noqa: E402


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# torch's counter has no formula for the fused CPU attention kernel; count it like the unfused q·k and attn·v.
SDPA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def timed(fn, runs: int, warmup: int = 2, sync=lambda: None) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def padding_flops(model) -> int:
    """Work the official formulation spends on window-padding tokens, which this implementation skips
    exactly: their q/k/v and output projections (the tokens are zero after norm1) and the attention of
    padding queries (whose outputs are cropped away). Added to give the official-equivalent count."""
    enc = model.image_encoder
    grid = enc.img_size // 16
    extra = 0
    for block in enc.blocks:
        ws = block.window_size
        if ws > 0:
            padded = -(-grid // ws) * ws
            tokens = padded * padded - grid * grid
            dim = block.norm1.normalized_shape[0]
            heads = block.attn.num_heads
            head_dim = dim // heads
            extra += 2 * tokens * dim * 3 * dim + 2 * tokens * dim * dim  # qkv, proj
            extra += tokens * heads * (4 * ws * ws * head_dim + 4 * ws * head_dim)  # q·k, attn·v, rel. pos.
    return extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default="vit_b", choices=["vit_b", "small"])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    model = build_sam_med2d(args.build)
    model.load_state_dict(synthetic_state_dict(args.build), strict=True)
    model = model.to(device, dtype).eval()
    with np.load(REFERENCE / "golden_vit_b.npz") as golden:
        image = golden["img2_image"]
        ref_embedding = golden[("" if args.build == "vit_b" else "small_") + "img2_embedding"]
        point = golden["c1_point_coords"] * (512 / np.array([300.0, 200.0]))

    predictor = SamMed2DPredictor(model)
    x = predictor.preprocess(image).to(device, dtype)

    print(
        f"torch {torch.__version__}, device {device}, dtype {args.dtype}, threads {torch.get_num_threads()}"
    )
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)

    with torch.inference_mode():
        counter = FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS)
        with counter:
            model.image_encoder(x)
        flops = counter.get_total_flops()
        official_flops = flops + padding_flops(model)
        timed(lambda: model.image_encoder(x), runs=0)  # warm-up
        # Interleave the reference matmul with the encoder so that both see the same load (the machine is
        # shared): each encoder run is compared with the matmul speed measured just before it.
        enc_times, mm_speeds = [], []
        for _ in range(args.runs):
            mm_time = statistics.median(timed(lambda: a @ b, runs=5, warmup=1, sync=sync))
            mm_speeds.append(2 * 2048**3 / mm_time / 1e9)
            enc_times += timed(lambda: model.image_encoder(x), runs=1, warmup=0, sync=sync)
    ratios = [flops / t / 1e9 / mm for t, mm in zip(enc_times, mm_speeds, strict=True)]
    official_ratios = [official_flops / t / 1e9 / mm for t, mm in zip(enc_times, mm_speeds, strict=True)]

    predictor.set_image(image)
    embedding = predictor.get_image_embedding().float().cpu().numpy()
    labels = np.array([1])
    dec_times = timed(lambda: predictor.predict(point, labels), runs=max(20, args.runs), warmup=3, sync=sync)

    enc = statistics.median(enc_times)
    print(
        f"matmul 2048² {args.dtype}: median {statistics.median(mm_speeds):.1f} GFLOP/s "
        f"(min {min(mm_speeds):.1f}, max {max(mm_speeds):.1f}), measured before each encoder run"
    )
    print(
        f"encoder: median {enc:.3f} s/slice over {len(enc_times)} runs (min {min(enc_times):.3f}, "
        f"max {max(enc_times):.3f})"
    )
    print(
        f"encoder FLOPs (this implementation): {flops / 1e9:.1f} GFLOP -> {flops / enc / 1e9:.1f} GFLOP/s; "
        f"ratio to matmul (median over runs): {statistics.median(ratios):.0%}"
    )
    print(
        f"official-formulation FLOPs (+ window-padding work skipped here): {official_flops / 1e9:.1f} GFLOP "
        f"-> {official_flops / enc / 1e9:.1f} GFLOP/s; ratio to matmul (median over runs): "
        f"{statistics.median(official_ratios):.0%}"
    )
    print(
        f"decoder: median {statistics.median(dec_times) * 1e3:.1f} ms per prompt "
        "(1 point, prompt encoder + decoder + upsampling to 512×512 + threshold)"
    )
    diff = float(np.abs(embedding.astype(np.float64) - ref_embedding).max())
    print(f"parity: embedding max |diff| vs official golden = {diff:.2e} (tolerance 5e-5 in fp32)")


if __name__ == "__main__":
    main()

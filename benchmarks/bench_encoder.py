"""Encoder / decoder benchmark for the SAM-Med2D network (not a test: it prints figures, asserts nothing).

    make bench      # or: .venv/bin/python benchmarks/bench_encoder.py [--build vit_b] [--runs 7]

Prints, measured in one run on this machine: for each encoder precision (fp32, bf16; fp16 too on a GPU) the
encoder seconds per slice (median after warm-up) and its ratio to this machine's matmul throughput in the same
precision (2048², same thread count, measured just before each encoder run), the speed-up over fp32, the
agreement with the official golden output (synthetic weights); the decoder milliseconds per prompt;
pre-encoding the bundled 20-slice CT from a cold and from a warm disk cache; fine-tuning samples/s of the
small build in fp32 and bf16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "SAMMed2DSegment"))

from SAMMed2DSegmentLib.engine.precision import DTYPES, cpu_bf16_capable, resolve_precision  # noqa: E402
from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor  # noqa: E402
from SAMMed2DSegmentLib.model import build_sam_med2d  # noqa: E402
from Testing.synthetic_weights import REFERENCE, synthetic_state_dict  # noqa: E402


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# torch's counter has no formula for the fused CPU attention kernel; count it like the unfused q·k and attn·v.
SDPA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def arithmetic_flags() -> list[str]:
    """The CPU flags that decide the encoder's speed (vector, matrix, FMA units), for a benchmark header."""
    from SAMMed2DSegmentLib.engine.precision import cpu_flags

    return sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))


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


def encoder_figures(model, precision: str, x, runs: int, device, sync, flops: float, official: float):
    """(seconds per run, matmul GFLOP/s measured before each run) for one precision, interleaved so both
    see the same load (the machine is shared)."""
    predictor = SamMed2DPredictor(model, precision=precision)
    dtype = DTYPES[precision]
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    if predictor.lowp_encoder is not None:  # the benchmark times the encoder alone
        encode = lambda: predictor.lowp_encoder(x)  # noqa: E731
    else:
        encode = lambda: model.image_encoder(x)  # noqa: E731
    with torch.inference_mode():
        timed(encode, runs=0)  # warm-up
        enc_times, mm_speeds = [], []
        for _ in range(runs):
            mm_time = statistics.median(timed(lambda: a @ b, runs=5, warmup=1, sync=sync))
            mm_speeds.append(2 * 2048**3 / mm_time / 1e9)
            enc_times += timed(encode, runs=1, warmup=0, sync=sync)
    enc = statistics.median(enc_times)
    ratio = statistics.median(flops / t / 1e9 / mm for t, mm in zip(enc_times, mm_speeds, strict=True))
    official_ratio = statistics.median(
        official / t / 1e9 / mm for t, mm in zip(enc_times, mm_speeds, strict=True)
    )
    print(
        f"{precision}: encoder median {enc:.3f} s/slice over {len(enc_times)} runs "
        f"(min {min(enc_times):.3f}, max {max(enc_times):.3f}); {precision} matmul 2048² median "
        f"{statistics.median(mm_speeds):.0f} GFLOP/s (min {min(mm_speeds):.0f}, "
        f"max {max(mm_speeds):.0f}); ratio to that peak: {ratio:.0%} ({flops / 1e9:.1f} GFLOP), "
        f"{official_ratio:.0%} on the official formulation's {official / 1e9:.1f} GFLOP"
    )
    return predictor, enc


def pre_encoding_figures(model, precision: str) -> None:
    """The bundled 20-slice CT encoded through the session from a cold disk cache, then by a new session
    (a restarted engine) from the warm one."""
    from SAMMed2DSegmentLib.engine.session import SegmentationSession
    from SAMMed2DSegmentLib.formats.volumes import read_volume

    volume = read_volume(ROOT / "Testing" / "Data" / "totalseg-example-ct" / "ct")
    with tempfile.TemporaryDirectory() as folder:
        figures = []
        for _ in ("cold", "warm"):
            session = SegmentationSession(SamMed2DPredictor(model, precision), disk_cache=folder,
                                          model_sha256="bench")  # fmt: skip
            start = time.perf_counter()
            session.set_volume(volume.array_kji, volume.ijk_to_ras, volume.modality)
            count = session.volume.geometry("axial").num_slices
            encoded = session.prefetch("axial", range(count))
            figures.append((time.perf_counter() - start, len(encoded), count))
        size = sum(f.stat().st_size for f in Path(folder).iterdir())
    (cold, n_cold, count), (warm, n_warm, _) = figures
    print(
        f"pre-encoding the {count}-slice CT ({precision}, content hash included): cold disk cache "
        f"{cold:.2f} s ({n_cold} encoded), warm disk cache {warm:.3f} s ({n_warm} encoded, "
        f"{cold / max(warm, 1e-9):.0f}× faster); {size / 2**20:.1f} MiB on disk"
    )


def finetune_figures(steps: int) -> None:
    """Samples/s of the small build's training loop (no validation, no saving), fp32 and bf16 autocast."""
    from SAMMed2DSegmentLib.finetune.settings import FinetuneConfig
    from SAMMed2DSegmentLib.finetune.training import finetune

    nifti = ROOT / "Testing" / "Data" / "totalseg-example-ct" / "nifti"
    pairs = [(nifti / "example_ct_sm.nii.gz", nifti / "example_seg.nii.gz")]
    rates = {}
    for precision in ("fp32", "bf16"):
        config = FinetuneConfig(steps=1000, eval_every=1000, save_every=1000, precision=precision)
        with tempfile.TemporaryDirectory() as out:
            finetune(config, pairs, out, stop_after=1)  # warm-up step (kernels, data loading)
        with tempfile.TemporaryDirectory() as out:
            result = finetune(config, pairs, out, stop_after=steps)
        rates[precision] = result.samples_per_second
    print(
        f"fine-tuning (small build, batch {config.batch_size}, {steps} steps): fp32 {rates['fp32']:.1f} "
        f"samples/s, bf16 {rates['bf16']:.1f} samples/s ({rates['bf16'] / rates['fp32']:.2f}×)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default="vit_b", choices=["vit_b", "small"])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precisions", default=None, help="comma-separated (default fp32,bf16; +fp16 on CUDA)"
    )
    parser.add_argument("--finetune-steps", type=int, default=6, help="0 skips the fine-tuning figures")
    parser.add_argument("--no-volume", action="store_true", help="skip the pre-encoding figures")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    default = "fp32,bf16,fp16" if device.type == "cuda" else "fp32,bf16"
    precisions = (args.precisions or default).split(",")

    model = build_sam_med2d(args.build)
    model.load_state_dict(synthetic_state_dict(args.build), strict=True)
    model = model.to(device).eval()
    with np.load(REFERENCE / "golden_vit_b.npz") as golden:
        image = golden["img2_image"]
        ref_embedding = golden[("" if args.build == "vit_b" else "small_") + "img2_embedding"]
        point = golden["c1_point_coords"] * (512 / np.array([300.0, 200.0]))

    x = SamMed2DPredictor(model).preprocess(image).to(device)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"CPU bf16 instructions: {cpu_bf16_capable()}; auto -> {resolve_precision('auto', device).precision}"
    )
    with torch.inference_mode():
        counter = FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS)
        with counter:
            model.image_encoder(x)
        flops = counter.get_total_flops()
    official_flops = flops + padding_flops(model)
    print("ratios count the fp32 module's FLOPs (the model's work) against each precision's own matmul peak")

    speeds = {}
    for precision in precisions:
        predictor, speeds[precision] = encoder_figures(
            model, precision, x, args.runs, device, sync, flops, official_flops
        )
        predictor.set_image(image)
        embedding = predictor.get_image_embedding().double().cpu()
        ref = torch.from_numpy(ref_embedding.astype(np.float64))
        diff = float((embedding - ref).abs().max())
        cosine = float(torch.nn.functional.cosine_similarity(embedding.flatten(), ref.flatten(), dim=0))
        note = " (tolerance 5e-5 in fp32)" if precision == "fp32" else ""
        print(f"{precision}: embedding vs official golden: max |diff| {diff:.2e}{note}, cosine {cosine:.7f}")
        if precision == "fp32":
            dec = timed(lambda p=predictor: p.predict(point, np.array([1])), runs=max(20, args.runs),
                        warmup=3, sync=sync)  # fmt: skip
            print(f"decoder: median {statistics.median(dec) * 1e3:.1f} ms per prompt "
                  "(1 point, prompt encoder + decoder + upsampling to 512×512 + threshold)")  # fmt: skip
    if "fp32" in speeds:
        for precision, seconds in speeds.items():
            if precision != "fp32":
                print(f"{precision} speed-up over fp32: {speeds['fp32'] / seconds:.2f}×")
    if not args.no_volume:
        pre_encoding_figures(model, resolve_precision("auto", device).precision)
    if args.finetune_steps > 0 and device.type == "cpu":
        finetune_figures(args.finetune_steps)


if __name__ == "__main__":
    main()

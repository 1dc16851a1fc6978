"""The encoder in every precision the device offers: one prepared run, one table (prints, asserts nothing).

    make bench         # or: python benchmarks/bench_precisions.py --device cpu   (fp32, bf16, int8)
    make bench-gpu     # or: python benchmarks/bench_precisions.py                (CUDA: fp32, bf16, fp16;
                       #     under five minutes)
    python benchmarks/bench_precisions.py --device cpu --quick                    (a dry run of every row,
                                                                                   small build)

On a CPU, bf16 runs only where the CPU has bf16 instructions (elsewhere it is emulated, a minute per slice)
and int8 where torch has dynamic int8 products; the header names the CPU and its flags. For each precision:
encoder seconds per slice (median after warm-up, CUDA synchronised), the share of the
same run's matmul peak in that precision on the official formulation's FLOP count (91.7 GFLOP for vit_b),
embedding cosine against the golden fp32 embeddings and against this device's own fp32, mask IoU against
fp32 on the bundled CT with the demo model (one include point per liver slice), decoder milliseconds per
prompt; then the cold-start breakdown of a fresh interpreter on the device. With OUT set in the environment
the table is also written to $OUT/bench_<device>.txt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = (
    "bench_precisions: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, "
    "or with `--device cpu` (`--quick` for a dry run)"
)
COLUMNS = (
    "precision",
    "encoder s/slice",
    "matmul peak TFLOP/s",
    "share of peak",
    "cosine vs golden fp32",
    "cosine vs own fp32",
    "mask IoU vs fp32 mean / min",
    "decoder ms/prompt",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument(
        "--quick", action="store_true", help="small build, few runs, two liver slices: a dry run in seconds"
    )
    return parser.parse_args(argv)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (pastes into the README as it is)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(f"{c!s:<{w}}" for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def skipped_row(precision: str, reason: str) -> list[str]:
    return [precision, f"not run: {reason}"] + [""] * (len(COLUMNS) - 2)


def offered(device, quick: bool) -> list[tuple[str, str | None]]:
    """(precision, why it is not run, or None) for each precision the device could run."""
    import torch

    from SAMMed2DSegmentLib.engine.precision import cpu_bf16_capable
    from SAMMed2DSegmentLib.model.int8_linear import int8_available

    if device.type == "cuda":
        bf16 = None if torch.cuda.is_bf16_supported() else "this GPU has no bf16"
        return [("fp32", None), ("bf16", bf16), ("fp16", None)]
    emulated = "no bf16 instructions on this CPU (emulated: about a minute per slice)"
    bf16 = None if quick or cpu_bf16_capable() else emulated
    int8 = None if int8_available() else "this PyTorch has no dynamic int8 products"
    return [("fp32", None), ("bf16", bf16), ("fp16", "fp16 runs on CUDA only"), ("int8", int8)]


def matmul_product(dtype, device, size: int) -> Callable[[], object]:
    """A size² product in `dtype`; for qint8 the dynamic int8 product the int8 encoder runs (activations
    quantized per call)."""
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.float32 if dtype == torch.qint8 else dtype)
    if dtype == torch.qint8:
        from SAMMed2DSegmentLib.model.int8_linear import Int8Linear, quantize

        product = Int8Linear(quantize(torch.randn(size, size)))
        return lambda: product(a)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return lambda: a @ b


def interleaved(encode, product, size: int, runs: int, warmup: int, sync) -> tuple[list[float], list[float]]:
    """Encoder seconds and the matmul peak (FLOP/s, median of 3 products) measured just before each encoder
    run, so each ratio compares the two under the same load (the machines are shared)."""
    from bench_encoder import timed

    timed(encode, runs=0, warmup=warmup, sync=sync)
    seconds, peaks = [], []
    for _ in range(runs):
        peaks.append(2 * size**3 / statistics.median(timed(product, runs=3, warmup=1, sync=sync)))
        seconds += timed(encode, runs=1, warmup=0, sync=sync)
    return seconds, peaks


def cosine(a, b) -> float:
    import torch

    a64 = torch.as_tensor(a).double().flatten().cpu()
    b64 = torch.as_tensor(b).double().flatten().cpu()
    return float(torch.nn.functional.cosine_similarity(a64, b64, dim=0))


def official_flops(model, x) -> float:
    """The fp32 module's counted FLOPs plus the window padding the official formulation computes."""
    import torch
    from bench_encoder import SDPA_FLOPS, padding_flops
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode():
        counter = FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS)
        with counter:
            model.image_encoder(x)
    return counter.get_total_flops() + padding_flops(model)


def precision_rows(args, device, sync) -> tuple[list[list[str]], float, str]:
    """One row per precision, the FLOP basis and the build measured."""
    import numpy as np
    import torch
    from bench_encoder import timed

    from SAMMed2DSegmentLib.engine.precision import DTYPES
    from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor
    from SAMMed2DSegmentLib.model import build_sam_med2d
    from SAMMed2DSegmentLib.weights import registry
    from SAMMed2DSegmentLib.weights.checkpoint import load_model
    from Testing.liver_agreement import liver_slice_ious
    from Testing.synthetic_weights import REFERENCE, synthetic_state_dict

    build = "small" if args.quick else "vit_b"
    if args.quick:
        runs, decoder_runs, warmup, mm_size, slices = 2, 3, 1, 256, 2
    elif device.type == "cuda":
        runs, decoder_runs, warmup, mm_size, slices = 20, 50, 3, 8192, None
    else:  # a CPU: the same table in a few minutes
        runs, decoder_runs, warmup, mm_size, slices = 7, 20, 2, 2048, None
    model = build_sam_med2d(build)
    model.load_state_dict(synthetic_state_dict(build), strict=True)
    model = model.to(device).eval()
    prefix = "" if build == "vit_b" else "small_"
    with np.load(REFERENCE / "golden_vit_b.npz") as data:
        golden = {key: data[key] for key in data.files}
    images = ("img1", "img2")
    point = golden["c1_point_coords"] * (512 / np.array([300.0, 200.0]))  # img1's point, on img2 (timed)
    x = SamMed2DPredictor(model).preprocess(golden["img2_image"]).to(device)
    flops = official_flops(model, x)
    demo, _ = load_model(registry.resolve_model("demo"), device=device)
    demo_fp32 = SamMed2DPredictor(demo)

    rows, own_fp32 = [], {}
    for precision, not_run in offered(device, args.quick):
        if not_run is not None:
            rows.append(skipped_row(precision, not_run))
            continue
        predictor = SamMed2DPredictor(model, precision=precision)
        encoder = predictor.lowp_encoder or model.image_encoder
        with torch.inference_mode():
            product = matmul_product(DTYPES[precision], device, mm_size)
            times, peaks = interleaved(lambda e=encoder: e(x), product, mm_size, runs, warmup, sync)
        seconds, peak = statistics.median(times), statistics.median(peaks)
        share = statistics.median(flops / t / p for t, p in zip(times, peaks, strict=True))
        golden_cos, own_cos = [], []
        for image in images:  # img2 last: the decoder is timed on it
            predictor.set_image(golden[f"{image}_image"])
            embedding = predictor.get_image_embedding()
            golden_cos.append(cosine(embedding, golden[f"{prefix}{image}_embedding"]))
            own_fp32.setdefault(image, embedding)
            own_cos.append(cosine(embedding, own_fp32[image]))
        decode = lambda p=predictor: p.predict(point, np.array([1]))  # noqa: E731
        decoder = timed(decode, runs=decoder_runs, warmup=warmup, sync=sync)
        if precision == "fp32":
            iou = "(reference)"
        else:
            ious = liver_slice_ious(demo_fp32, SamMed2DPredictor(demo, precision=precision), limit=slices)
            iou = f"{np.mean(ious):.4f} / {min(ious):.4f} ({len(ious)} slices)"
        rows.append([
            precision,
            f"{seconds:.4f}",
            f"{peak / 1e12:.3g} ({mm_size}²)",
            f"{share:.0%}",
            f"{min(golden_cos):.6f}",
            f"{min(own_cos):.6f}",
            iou,
            f"{statistics.median(decoder) * 1e3:.2f}",
        ])  # fmt: skip
    return rows, flops, build


def cold_start_rows(device, build: str, warm: bool) -> tuple[list[list[str]], str]:
    """The cold-start stages in a fresh interpreter on `device` (precision auto); `warm`: after a first
    start that converted the checkpoint into the cache, as on every start but the first."""
    from cold_start import STAGES, one_start, random_checkpoint

    lib = ROOT / "SAMMed2DSegment"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, cache = random_checkpoint(Path(tmp), build), Path(tmp) / "cache"
        if warm:
            one_start(lib, ckpt, cache, str(device))
        times = one_start(lib, ckpt, cache, str(device))
    return [[stage, f"{times[stage]:.2f}"] for stage in STAGES], times["precision"]


def device_name(device) -> str:
    import platform

    import torch
    from bench_encoder import arithmetic_flags

    from SAMMed2DSegmentLib.engine.precision import cpu_model

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    flags = arithmetic_flags()
    name = cpu_model() or platform.processor() or platform.machine()
    return f"{name}, {torch.get_num_threads()} threads, flags {' '.join(flags) or 'unknown'}"


def write_out(text: str, device) -> Path | None:
    """$OUT/bench_<device>.txt, written atomically, where OUT is set."""
    if not os.environ.get("OUT"):
        return None
    from SAMMed2DSegmentLib.files import atomic_path

    target = Path(os.environ["OUT"]) / f"bench_{device.type}.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    for folder in (ROOT, ROOT / "SAMMed2DSegment", ROOT / "benchmarks"):
        sys.path.insert(0, str(folder))
    device = torch.device(args.device)
    if args.quick:  # a dry run beside other work: one thread does not spin against it
        torch.set_num_threads(1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows, flops, build = precision_rows(args, device, sync)
    stages, auto = cold_start_rows(device, build, warm=not args.quick)
    cache = "cold checkpoint cache (quick)" if args.quick else "warm checkpoint cache"
    cuda = torch.version.cuda or "none"
    tf32 = torch.backends.cuda.matmul.allow_tf32
    text = "\n".join([
        f"device: {device_name(device)}; torch {torch.__version__}, CUDA {cuda}",
        f"encoder: {build} (synthetic weights), one 256×256 slice; share of peak: the official "
        f"formulation's {flops / 1e9:.1f} GFLOP per slice against the same run's matmul peak in that "
        f"precision (TF32 {'on' if tf32 else 'off'}: fp32 products {'in TF32' if tf32 else 'in full fp32'})",
        "",
        format_table(COLUMNS, rows),
        "",
        f"cold start, s: fresh interpreter on {device.type}, {build}, {cache}, precision auto -> {auto}",
        "",
        format_table(("stage", "seconds"), stages),
    ])  # fmt: skip
    print(text)
    written = write_out(text + "\n", device)
    if written is not None:
        print(f"written to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

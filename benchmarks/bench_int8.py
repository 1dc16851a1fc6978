"""Does a dynamic-int8 encoder earn its place on this CPU? (Not a test: it prints figures, asserts nothing.)

    .venv/bin/python benchmarks/bench_int8.py [--runs 5] [--threads 2]

Two candidates, timed interleaved with the fp32 encoder (synthetic weights, the golden image) so all see the
same load, and compared with fp32 by embedding cosine:

- "linear": PyTorch's dynamic quantization of every `nn.Linear` of the ViT-B image encoder (weights int8 per
  tensor, activations quantized per call; fbgemm/oneDNN kernels, which use AVX2 or AVX-VNNI dot products);
- "linear + adapter": the same, plus the adapter's two convolutions (a third of the fp32 time, written as
  products) as dynamic int8 products with per-channel weights: the most this route can give.

Both rest on torch's quantized dtypes (`torch.qint8`), which torch 2.13 deprecates for removal
(pytorch/pytorch#184982). The route torch points to instead, plain int8 tensors and `torch._int_mm`, is
timed on one encoder-sized product. `auto` would need ≥ 1.5× and cosine ≥ 0.999 (issue 27), plus masks
agreeing with fp32 on the bundled CT, before it could pick int8; this script says whether the first two hold.
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "SAMMed2DSegment"))

from bench_encoder import arithmetic_flags  # noqa: E402

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


class Int8Adapter(torch.nn.Module):
    """The adapter with its two convolution products in dynamic int8 (same arithmetic as `image_encoder`'s
    `_conv3x3_s2` / `_conv_transpose4x4_s2`, products quantized)."""

    def __init__(self, adapter: torch.nn.Module) -> None:
        super().__init__()
        self.adapter = adapter
        conv, deconv = adapter.spatial[0].weight.detach(), adapter.spatial[2].weight.detach()
        self.down = _dynamic_linear(conv.reshape(conv.shape[0], -1))  # rows C_out, columns (C_in, ky, kx)
        self.up = _dynamic_linear(deconv.reshape(deconv.shape[0], -1).t())  # rows (C_out, ky, kx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.adapter
        batch, height, width, _ = x.shape
        gate = a.channel(x.mean(dim=(1, 2)))
        cols = F.unfold((gate[:, None, None, :] * x).permute(0, 3, 1, 2), kernel_size=3, padding=1, stride=2)
        dh, dw = (height + 1) // 2, (width + 1) // 2
        down = F.relu(self.down(cols.transpose(1, 2).reshape(-1, cols.shape[1])))  # B·L × C
        taps = self.up(down).reshape(batch, dh * dw, -1).transpose(1, 2)  # B × C_out·16 × L
        up = F.fold(taps, (2 * dh, 2 * dw), kernel_size=4, stride=2, padding=1)[:, :, :height, :width]
        return a.norm(x + F.relu(up).permute(0, 2, 3, 1))


def _dynamic_linear(weight: torch.Tensor) -> torch.nn.Module:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.contiguous()
    linear.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    return torch.ao.nn.quantized.dynamic.Linear.from_float(linear)


def int8_with_adapters(encoder: torch.nn.Module) -> torch.nn.Module:
    encoder = int8_encoder(encoder)
    for block in encoder.blocks:
        block.Adapter = Int8Adapter(block.Adapter)
    return encoder


def int_mm_ratio(repeats: int = 5) -> float:
    """fp32 time / `torch._int_mm` time for the qkv product (256 tokens × 768 → 2304), operands in int8."""
    x, w = torch.randn(256, 768), torch.randn(768, 2304)
    xq = torch.randint(-127, 127, (256, 768), dtype=torch.int8)
    wq = torch.randint(-127, 127, (768, 2304), dtype=torch.int8)
    times = []
    for fn in (lambda: x @ w, lambda: torch._int_mm(xq, wq)):
        fn()
        times.append(min(_seconds(fn) for _ in range(repeats)))
    return times[0] / times[1]


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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
        warnings.simplefilter("ignore")  # torch's deprecation notices for the quantized dtypes
        candidates = {"linear": int8_encoder(model.image_encoder),
                      "linear + adapter": int8_with_adapters(model.image_encoder)}  # fmt: skip
    shown = arithmetic_flags()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, quantized engine "
          f"{torch.backends.quantized.engine}; CPU flags: {' '.join(shown) or 'unknown'}")  # fmt: skip
    encoders = {"fp32": model.image_encoder, **candidates}
    times: dict[str, list[float]] = {name: [] for name in encoders}
    with torch.inference_mode():
        outputs = {name: encoder(x).flatten().double() for name, encoder in encoders.items()}
        for _ in range(args.runs):
            for name, encoder in encoders.items():
                times[name].append(_seconds(lambda e=encoder: e(x)))
    fp32 = statistics.median(times["fp32"])
    print(f"fp32 encoder median {fp32:.3f} s/slice over {args.runs} interleaved runs")
    for name in candidates:
        cosine = torch.nn.functional.cosine_similarity(outputs["fp32"], outputs[name], dim=0).item()
        median = statistics.median(times[name])
        print(f"dynamic int8, {name}: {median:.3f} s/slice, {fp32 / median:.2f}× fp32 (needs ≥ 1.5×); "
              f"embedding cosine to fp32 {cosine:.5f} (needs ≥ 0.999)")  # fmt: skip
    print(f"torch._int_mm (the non-deprecated int8 product) on the qkv shape: {int_mm_ratio():.2f}× fp32")


if __name__ == "__main__":
    main()

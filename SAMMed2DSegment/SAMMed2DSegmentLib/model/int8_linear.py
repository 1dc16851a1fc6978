"""One weight product in int8, for CPUs without bf16 instructions (most laptops: AVX2, some AVX-VNNI).

PyTorch's dynamic quantization (`torch.ao.nn.quantized.dynamic.Linear` with `per_channel_dynamic_qconfig`):
weights int8 per output channel, activations quantized per call, fbgemm/oneDNN kernels on the CPU's integer
dot products. `benchmarks/bench_int8.py` measured it 2-4× faster than fp32 per product on an AVX2 CPU, where
`torch._int_mm` (plain int8 tensors) ran 30× slower than fp32. torch 2.13 deprecates the quantized dtypes
this rests on for removal (pytorch/pytorch#184982): `int8_available` is False where a torch no longer has
them, and `auto` then keeps fp32.

The weight is quantized in two steps so that the slow one can be cached (`weights/int8_weights.py`):
`quantize` (torch's per-channel observer and quantizer: int8 values and one scale per output channel) and
`Int8Linear`, which packs the values for the kernels. Packing is made cheap, since it is paid on every start:
- the values are packed as one tensor of scale 1 and the per-channel scales applied to the product's
  output: fbgemm packs per channel at about 3.5 µs per output channel, and the result matches the
  per-channel module packed for the same kernels to fp32 rounding (`Testing/test_int8_weights.py`);
- with oneDNN's kernels where this torch has them: on an AVX2 CPU they packed the ViT-B encoder's values
  7× faster than fbgemm's (0.17 s against 1.25 s) and ran the encoder as fast (within 2 %, one
  interleaved run); the embedding's cosine to fp32 and the masks' IoU were unchanged to the digits the
  README quotes. oneDNN keeps a copy of the int8 values beside the packed ones: about 262 MB more
  for ViT-B. Packing follows torch's process-wide quantized engine, so it is set to oneDNN (nothing else
  in the engine uses it; every thread sets the same value).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

_ENGINES = ("onednn", "x86", "fbgemm")  # the packing engine: the first this torch supports

_NOTICE = r"torch\.quantize_per_tensor, torch\.quantize_per_channel"


def _hide_deprecation_notice() -> None:
    """torch 2.13 announces the quantized dtypes' removal on first use (module docstring); the engine and
    the command line would print it on every start. Only that notice is silenced, for the whole process (a
    `catch_warnings` per weight, run on several threads, left every warning ignored). Called again before
    each quantization: a filter set up later (the command line's own, at its start) goes in front of it.
    The filters are only touched when ours is not first (each change resets "once per place" warnings)."""
    first = warnings.filters[0] if warnings.filters else None
    if first is not None and first[0] == "ignore" and getattr(first[1], "pattern", None) == _NOTICE:
        return
    warnings.filterwarnings("ignore", message=_NOTICE, category=UserWarning)


_hide_deprecation_notice()


def int8_available() -> bool:
    """Whether this torch has dynamic int8 products with a CPU engine that uses the integer units."""
    try:
        from torch.ao.nn.quantized.dynamic import Linear  # noqa: F401
        from torch.ao.quantization import per_channel_dynamic_qconfig  # noqa: F401
    except ImportError:
        return False
    return _engine() is not None


def _engine() -> str | None:
    supported = torch.backends.quantized.supported_engines
    return next((engine for engine in _ENGINES if engine in supported), None)


@dataclass(frozen=True)
class QuantizedWeight:
    """A Linear weight (out × in) as int8 `values` and one float32 `scale` per output channel (symmetric:
    weight ≈ values × scale[row])."""

    values: torch.Tensor
    scales: torch.Tensor

    def matches(self, shape: tuple[int, int]) -> bool:
        """Whether this can stand for a weight of `shape`: int8 values of that shape, and positive, finite
        scales, one per row (a cached copy is checked so before use)."""
        values, scales = self.values, self.scales
        if values.dtype != torch.int8 or values.layout != torch.strided or tuple(values.shape) != shape:
            return False
        if scales.dtype != torch.float32 or tuple(scales.shape) != (shape[0],):
            return False
        return bool(torch.isfinite(scales).all()) and bool((scales > 0).all())


def quantize(weight: torch.Tensor) -> QuantizedWeight:
    """`weight` (out × in) quantized as `per_channel_dynamic_qconfig` does: torch's per-channel symmetric
    observer and quantizer."""
    from torch.ao.quantization.observer import default_per_channel_weight_observer

    _hide_deprecation_notice()
    weight = weight.detach().float().contiguous()
    observer = default_per_channel_weight_observer()
    observer(weight)
    scales, zero_points = observer.calculate_qparams()
    quantized = torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8)
    return QuantizedWeight(quantized.int_repr(), quantized.q_per_channel_scales().float())


class Int8Linear:
    """x (N × in, float32) → x @ Wᵀ + b (N × out, float32), the product in int8."""

    def __init__(self, weight: QuantizedWeight) -> None:
        engine = _engine()
        if engine is not None and torch.backends.quantized.engine != engine:
            torch.backends.quantized.engine = engine  # the product runs with the kernels it was packed for
        unit = torch._make_per_tensor_quantized_tensor(weight.values.contiguous(), 1.0, 0)
        self.packed = torch.ops.quantized.linear_prepack(unit, None)
        self.scales = weight.scales.clone()  # not a view into a memory-mapped cache file

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # 7-bit activations (reduce_range), as the module runs them: AVX2's 8-bit dot products saturate.
        out = torch.ops.quantized.linear_dynamic(x, self.packed, reduce_range=True)
        return out.mul_(self.scales) if bias is None else torch.addcmul(bias, out, self.scales)

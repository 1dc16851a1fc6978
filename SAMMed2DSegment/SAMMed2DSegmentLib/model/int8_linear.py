"""One weight product in int8, for CPUs without bf16 instructions (most laptops: AVX2, some AVX-VNNI).

PyTorch's dynamic quantization (`torch.ao.nn.quantized.dynamic.Linear`): weights int8 per output channel,
activations quantized per call, fbgemm/oneDNN kernels on the CPU's integer dot products. `benchmarks/
bench_int8.py` measured it 2-4× faster than fp32 per product on an AVX2 CPU, where `torch._int_mm` (plain
int8 tensors) ran 30× slower than fp32. torch 2.13 deprecates the quantized dtypes this rests on for
removal (pytorch/pytorch#184982): `int8_available` is False where a torch no longer has them, and `auto`
then keeps fp32.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

_ENGINES = ("x86", "fbgemm", "onednn")


def int8_available() -> bool:
    """Whether this torch has dynamic int8 products with a CPU engine that uses the integer units."""
    try:
        from torch.ao.nn.quantized.dynamic import Linear  # noqa: F401
        from torch.ao.quantization import per_channel_dynamic_qconfig  # noqa: F401
    except ImportError:
        return False
    return any(engine in torch.backends.quantized.supported_engines for engine in _ENGINES)


class Int8Linear:
    """x (N × in, float32) → x @ Wᵀ + b (N × out, float32), the product in int8."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        from torch.ao.nn.quantized.dynamic import Linear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        out_features, in_features = weight.shape
        with torch.random.fork_rng(devices=[]):  # its random initial values, overwritten below, draw nothing
            linear = nn.Linear(in_features, out_features, bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        linear.qconfig = per_channel_dynamic_qconfig
        with warnings.catch_warnings():  # the deprecation notice of the quantized dtypes (module docstring)
            warnings.simplefilter("ignore")
            self.module = Linear.from_float(linear)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

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

_ENGINES = ("x86", "fbgemm", "onednn")

# torch 2.13 announces the quantized dtypes' removal on first use (module docstring); the engine and the
# command line would print it on every start. Only that notice is silenced, once, for the whole process:
# a `catch_warnings` per weight, run on several threads, left every warning ignored.
warnings.filterwarnings(
    "ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel", category=UserWarning
)


def int8_available() -> bool:
    """Whether this torch has dynamic int8 products with a CPU engine that uses the integer units."""
    try:
        from torch.ao.nn.quantized.dynamic import Linear  # noqa: F401
        from torch.ao.quantization import per_channel_dynamic_qconfig  # noqa: F401
    except ImportError:
        return False
    return any(engine in torch.backends.quantized.supported_engines for engine in _ENGINES)


class Int8Linear:
    """x (N × in, float32) → x @ Wᵀ + b (N × out, float32), the product in int8.

    What `torch.ao.nn.quantized.dynamic.Linear` does with `per_channel_dynamic_qconfig`, without building a
    float `nn.Linear` first: its random initialisation and the module's repeated packing were two thirds
    of the preparation time.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        from torch.ao.quantization.observer import default_per_channel_weight_observer

        weight = weight.detach().float().contiguous()
        observer = default_per_channel_weight_observer()
        observer(weight)
        scales, zero_points = observer.calculate_qparams()
        quantized = torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(quantized, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # 7-bit activations (reduce_range), as the module runs them: AVX2's 8-bit dot products saturate.
        return torch.ops.quantized.linear_dynamic(x, self.packed, reduce_range=True)

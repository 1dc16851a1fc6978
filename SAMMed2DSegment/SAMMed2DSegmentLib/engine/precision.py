"""Which precision the image encoder runs in: "fp32" (exact, parity-tested), "bf16", "fp16", "int8", or
"auto".

`auto` picks bf16 on a CPU only where the processor has bf16 matrix instructions (AMX or AVX512-BF16) *and* a
one-time calibration (cached per machine, torch version and thread count) shows bf16 both faster here and
in agreement with fp32: without those instructions bf16 is emulated and slower than fp32, and a machine
whose bf16 kernels give other numbers than fp32 (a library fault) must not get them silently. On a CPU
without bf16, `auto` picks int8 (dynamic int8 products, `model.int8_linear`) only where its own calibration
shows it at least 1.5× faster than fp32 and agreeing with it (cosine ≥ 0.999); else fp32. On CUDA it picks
bf16 where the GPU supports it, else fp16; elsewhere (MPS included) fp32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..choices import PRECISIONS
from ..files import atomic_path
from ..weights.cache_dir import default_cache_dir

log = logging.getLogger("SAMMed2D.precision")

#: The encoder's format per precision (`LowPrecisionEncoder` takes all but fp32, which runs the module).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.qint8}
CALIBRATION_FILE = "precision-calibration.json"
#: bf16 must beat fp32 by this factor in the calibration before `auto` takes it (margin for timing noise).
MIN_SPEEDUP = 1.3
#: The low-precision encoder's output must reach this cosine with the fp32 module's in the calibration (the
#: threshold the bf16 path is held to on the golden images).
MIN_COSINE = 0.9999
#: int8's thresholds (issue 27): at least this much faster than fp32 in its calibration, and this cosine.
MIN_SPEEDUP_INT8 = 1.5
MIN_COSINE_INT8 = 0.999
#: (minimum speed-up, minimum cosine) per calibrated path.
THRESHOLDS = {"bf16": (MIN_SPEEDUP, MIN_COSINE), "int8": (MIN_SPEEDUP_INT8, MIN_COSINE_INT8)}
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


def cpu_flags(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags Linux reports (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_bf16_capable(flags: set[str] | None = None) -> bool:
    """Whether the CPU has bf16 matrix instructions: AMX-BF16 or AVX512-BF16 in the Linux flags, else
    (macOS, Windows) torch's own report of an AMX-capable CPU."""
    flags = cpu_flags() if flags is None else flags
    if flags:
        return any(flag in flags for flag in _CPU_BF16_FLAGS)
    return "AMX" in torch.backends.cpu.get_cpu_capability().upper()


#: Raised when what a calibration measures changes (2: int8 packed for oneDNN's kernels), so that older
#: records are measured again.
CALIBRATION_VERSION = 2


def _machine_key() -> str:
    """What the calibration depends on: its version, processor, flags, torch version and thread count."""
    flags = " ".join(sorted(cpu_flags()))
    text = "|".join([str(CALIBRATION_VERSION), platform.machine(), platform.processor(), cpu_model(), flags,
                     torch.__version__, str(torch.get_num_threads())])  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def measure_bf16_speedup(repeats: int = 5) -> float:
    """fp32 time / bf16 time of an encoder-sized product (256 tokens × 768 → 768), best of `repeats`:
    about 2 ms of work on a modern CPU."""
    a = torch.randn(256, 768)
    b = torch.randn(768, 768)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up (the first call picks kernels)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            best = min(best, time.perf_counter() - start)
        times[dtype] = best
    return times[torch.float32] / max(times[torch.bfloat16], 1e-9)


def measure_bf16_agreement() -> float:
    """Cosine between the bf16 encoder's output and the fp32 module's, on a 2-block encoder with seeded
    random weights and image: every kind of kernel the bf16 path runs, in about 0.1 s (0.5 s emulated).
    The global random state is left as it was."""
    from ..model.image_encoder import ImageEncoderViT
    from ..model.lowp_encoder import LowPrecisionEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = ImageEncoderViT(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,)).eval()
        with torch.no_grad():  # zero at construction; random here so the relative-position path is checked
            for block in encoder.blocks:
                block.attn.rel_pos_h.normal_(0, 0.1)
                block.attn.rel_pos_w.normal_(0, 0.1)
            encoder.pos_embed.normal_(0, 0.1)
        image = torch.randn(1, 3, encoder.img_size, encoder.img_size)
    with torch.inference_mode():
        exact = encoder(image).double().flatten()
        low = LowPrecisionEncoder(encoder, torch.bfloat16)(image).double().flatten()
    return float(torch.nn.functional.cosine_similarity(exact, low, dim=0))


@dataclass(frozen=True)
class Calibration:
    """What `auto` decides a path by on a CPU: its speed-up over fp32 and its agreement with fp32."""

    speedup: float
    cosine: float

    def verdict(self, path: str = "bf16") -> str | None:
        """Why `path` ("bf16" or "int8") must not be picked here, or None where it may."""
        min_speedup, min_cosine = THRESHOLDS[path]
        if not self.cosine >= min_cosine:  # NaN included
            return f"{path} disagreed with fp32 in this machine's calibration (cosine {self.cosine:.6f})"
        if not self.speedup >= min_speedup:
            return f"{path} measured only {self.speedup:.2f}× fp32 on this CPU (needs {min_speedup}×)"
        return None


def measure_int8_calibration(repeats: int = 6) -> Calibration:
    """int8 against fp32 on one ViT-B-sized windowed block with its adapter (seeded random weights): the
    encoder's own mix of products, attention and element-wise passes, timed interleaved, and the cosine
    of the two outputs. The best of 6 runs each: with 3, another process's load moved the ratio between
    1.44 and 1.99 on a 2-core machine, and the record decides for good. About 2 s, once per machine."""
    from ..model.image_encoder import ImageEncoderViT
    from ..model.lowp_encoder import LowPrecisionEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = ImageEncoderViT(depth=1, global_attn_indexes=()).eval()
        image = torch.randn(1, 3, encoder.img_size, encoder.img_size)
    int8 = LowPrecisionEncoder(encoder, torch.qint8)
    forwards = {"fp32": encoder, "int8": int8}
    times = {name: float("inf") for name in forwards}
    outputs = {}
    with torch.inference_mode():
        for round_ in range(repeats + 1):  # round 0 warms both up
            for name, forward in forwards.items():
                start = time.perf_counter()
                outputs[name] = forward(image)
                if round_ > 0:
                    times[name] = min(times[name], time.perf_counter() - start)
    cosine = torch.nn.functional.cosine_similarity(
        outputs["fp32"].double().flatten(), outputs["int8"].double().flatten(), dim=0
    )
    return Calibration(speedup=times["fp32"] / max(times["int8"], 1e-9), cosine=float(cosine))


def measure_bf16_calibration() -> Calibration:
    return Calibration(speedup=measure_bf16_speedup(), cosine=measure_bf16_agreement())


MEASURES: dict[str, Callable[[], Calibration]] = {
    "bf16": measure_bf16_calibration,
    "int8": measure_int8_calibration,
}


def calibrated(
    path: str,
    cache_dir: str | os.PathLike[str] | None = None,
    measure: Callable[[], Calibration] | None = None,
) -> Calibration:
    """The calibration of `path` ("bf16" or "int8") on this machine, measured once and remembered in the
    cache folder. A record that is missing, damaged or from an older version is measured again."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    file = folder / CALIBRATION_FILE
    key = _machine_key()
    try:
        known = json.loads(file.read_text())
        record = known[key][path]
        return Calibration(speedup=float(record["speedup"]), cosine=float(record["cosine"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    calibration = (measure or MEASURES[path])()
    try:
        known = json.loads(file.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    entry = known.get(key) if isinstance(known.get(key), dict) else {}
    entry[path] = {"speedup": calibration.speedup, "cosine": calibration.cosine}
    known[key] = entry
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(file) as tmp:
            tmp.write_text(json.dumps(known, indent=1))
    except OSError as exc:  # a read-only cache only costs a re-measurement next time
        log.warning("could not record the precision calibration in %s: %s", file, exc)
    return calibration


def resolve_precision(
    requested: str,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    bf16_capable: Callable[[], bool] = cpu_bf16_capable,
    calibration: Callable[[str], Calibration] | None = None,
    int8_capable: Callable[[], bool] | None = None,
) -> PrecisionChoice:
    """The precision to run in for `requested` on `device`; ValueError for a combination that cannot run.
    `bf16_capable`, `int8_capable` and `calibration` (path → its calibration) are the capability queries
    and the calibration (replaceable in tests)."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}: use {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if int8_capable is None:
        from ..model.int8_linear import int8_available as int8_capable
    if requested == "fp16" and device.type == "cpu":
        raise ValueError("fp16 runs on CUDA and MPS only; on a CPU use bf16 or fp32")
    if requested == "int8" and device.type != "cpu":
        raise ValueError("int8 runs on the CPU only; on a GPU use fp16 or bf16")
    if requested == "int8" and not int8_capable():
        raise ValueError("this PyTorch has no dynamic int8 products for the CPU; use fp32")
    if requested != "auto":
        if requested == "bf16" and device.type == "cpu" and not bf16_capable():
            emulated = "this CPU has no bf16 instructions (AMX or AVX512-BF16): emulated, many times slower"
            return PrecisionChoice("bf16", f"requested; {emulated} than fp32")
        return PrecisionChoice(requested, "requested")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", "auto: the GPU supports bf16")
        return PrecisionChoice("fp16", "auto: the GPU has no bf16, fp16 instead")
    if device.type != "cpu":
        return PrecisionChoice("fp32", f"auto: fp32 on {device.type}")
    measure = calibration or (lambda path: calibrated(path, cache_dir))
    refusals = []
    paths = (("bf16", bf16_capable, "the CPU reports neither AMX-BF16 nor AVX512-BF16"),
             ("int8", int8_capable, "this PyTorch has no dynamic int8 products"))  # fmt: skip
    for path, capable, missing in paths:  # bf16 first: where it passes it is the faster
        if not capable():
            refusals.append(missing)
            continue
        measured = measure(path)
        refusal = measured.verdict(path)
        if refusal is None:
            reason = f"auto: {path} measured {measured.speedup:.1f}× fp32 on this CPU and agreeing with it"
            return PrecisionChoice(path, reason)
        refusals.append(refusal)
    return PrecisionChoice("fp32", "auto: " + "; ".join(refusals))


__all__ = [
    "DTYPES",
    "PRECISIONS",
    "Calibration",
    "PrecisionChoice",
    "calibrated",
    "cpu_bf16_capable",
    "cpu_flags",
    "cpu_model",
    "measure_bf16_agreement",
    "measure_bf16_speedup",
    "measure_bf16_calibration",
    "measure_int8_calibration",
    "resolve_precision",
]

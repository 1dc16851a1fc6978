"""The reference folder's deterministic synthetic-weight rule (no real weights can be shared).

Each tensor comes from its own CPU generator seeded with the crc32 of its key, so the order of keys does not
matter. Used by the parity tests and by the benchmarks' parity check.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch

REFERENCE = Path(__file__).parent / "Data" / "reference"


def synth_tensor(key: str, shape: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    t = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    if key.endswith("positional_encoding_gaussian_matrix"):
        return t
    if key.endswith(".weight"):
        if len(shape) == 1:
            return 1.0 + 0.1 * t
        return t / math.sqrt(math.prod(shape[1:]))
    return 0.02 * t


def synthetic_state_dict(build: str) -> dict[str, torch.Tensor]:
    layout = json.loads((REFERENCE / f"sammed2d_{build}_state_dict.json").read_text())
    return {key: synth_tensor(key, shape) for key, shape in layout}

"""A model's int8 encoder weights, quantized once and kept in the cache folder beside its conversion.

Why: quantizing the encoder's weights (torch's per-channel observer and quantizer, `model/int8_linear.py`)
took about 1.5 s of the 3 s an int8 start spent preparing on a 2-core CPU, before the first click could be
answered; packing the kept values is the rest. The file is keyed by the model's SHA-256 and records the torch
version that quantized it: another torch may round differently, and a start must give the same masks whether
the file was there or not. A file that is missing, damaged, of another model or another torch counts as
none; an entry that does not fit its weight is quantized again (`lowp_encoder`), and the file rewritten.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..files import atomic_path
from ..model.int8_linear import QuantizedWeight
from .cache_dir import default_cache_dir

log = logging.getLogger("SAMMed2D.weights")

FORMAT_TAG = "sammed2d-int8-weights/1"
_VALUES, _SCALES = ".values", ".scales"


class Int8WeightsFile:
    """The int8 weights of the model whose SHA-256 is `model_sha256`, in the file `path`."""

    def __init__(self, path: str | os.PathLike[str], model_sha256: str) -> None:
        self.path = Path(path)
        self.model_sha256 = model_sha256

    @classmethod
    def in_cache(cls, model_sha256: str, cache_dir: str | os.PathLike[str] | None = None) -> Int8WeightsFile:
        """The model's file in the cache folder (`SAMMED2D_CACHE_DIR` by default)."""
        base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        return cls(base / f"int8-{model_sha256[:32]}.safetensors", model_sha256)

    def _expected(self) -> dict[str, str]:
        return {"format": FORMAT_TAG, "model_sha256": self.model_sha256, "torch": torch.__version__}

    def _metadata(self) -> dict[str, str] | None:
        """The file's metadata; None where there is no readable safetensors file."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as fh:
                return dict(fh.metadata() or {})
        except (OSError, SafetensorError, ValueError):
            return None

    def read(self) -> dict[str, QuantizedWeight]:
        """The weights kept for this model and this torch, by name; empty where there are none to trust
        (each is still checked against its weight before use)."""
        from safetensors import SafetensorError, safe_open

        if not self.path.is_file():
            return {}
        try:
            with safe_open(str(self.path), framework="pt") as fh:
                if (fh.metadata() or {}) != self._expected():
                    log.info("%s is not this model's or this torch's: quantizing anew", self.path.name)
                    return {}
                names = {key[: -len(_VALUES)] for key in fh.keys() if key.endswith(_VALUES)}
                return {
                    name: QuantizedWeight(fh.get_tensor(name + _VALUES), fh.get_tensor(name + _SCALES))
                    for name in names
                }
        except (OSError, SafetensorError, ValueError) as exc:  # a missing scale is a SafetensorError
            log.warning("cannot read the int8 weights in %s (%s): quantizing anew", self.path, exc)
            return {}

    def write(self, weights: Mapping[str, QuantizedWeight]) -> bool:
        """Keep `weights` (atomically). A file already at the path that is not one of ours is left alone; a
        cache that cannot be written only costs the quantization next time. Returns whether it was written."""
        from safetensors.torch import save_file

        if self.path.exists() and (self._metadata() or {}).get("format") != FORMAT_TAG:
            log.warning("%s exists and is not SAMMed2D's: the int8 weights are not kept", self.path)
            return False
        tensors = {}
        for name, weight in weights.items():
            tensors[name + _VALUES] = weight.values.contiguous()
            tensors[name + _SCALES] = weight.scales.contiguous()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                save_file(tensors, str(tmp), metadata=self._expected())
        except OSError as exc:
            log.warning("cannot keep the int8 weights in %s: %s", self.path, exc)
            return False
        return True

    def remove(self) -> None:
        """Delete the file, only when it is one we wrote for this model (its model's conversion is stale)."""
        metadata = self._metadata() or {}
        if metadata.get("format") == FORMAT_TAG and metadata.get("model_sha256") == self.model_sha256:
            self.path.unlink(missing_ok=True)

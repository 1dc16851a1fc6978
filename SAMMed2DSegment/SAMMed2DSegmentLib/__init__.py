"""SAM-Med2D segmentation engine for 3D Slicer, importable without the Slicer application.

Layers (DESIGN §1): `model/`, `weights/`, `engine/`, `formats/`, `finetune/` and `service/` need no Slicer;
`mrml/` needs Slicer's MRML classes; `commands/` sits on top. The public names below are imported on first use
(PEP 562), so importing the package never imports torch: the Slicer process imports it while torch lives
only in the engine process.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "build_sam_med2d": "model",
    "load_model": "weights.checkpoint",
    "resolve_model": "weights.registry",
    "SamMed2DPredictor": "engine.predictor",
    "SegmentationSession": "engine.session",
    "PropagationSettings": "engine.propagation",
    "IntensityWindow": "engine.intensity",
    "PointPrompt": "engine.prompts",
    "RoiPrompt": "engine.prompts",
    "read_volume": "formats.volumes",
    "EngineClient": "service.client",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

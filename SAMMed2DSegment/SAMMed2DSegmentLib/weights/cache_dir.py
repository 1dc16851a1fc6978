"""The per-user cache folder, in a module without torch: the Slicer module asks where weights are (and
whether they are downloaded) before the PyTorch extension has installed torch."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SAMMED2D_CACHE_DIR"


def default_cache_dir() -> Path:
    """`$SAMMED2D_CACHE_DIR`, else `~/.cache/sammed2d`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sammed2d"


__all__ = ["CACHE_ENV", "default_cache_dir"]

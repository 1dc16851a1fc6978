"""Shared fixtures: the golden reference data and models carrying the synthetic weights it was made with."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

from SAMMed2DSegmentLib.model import SamMed2D, build_sam_med2d

from .synthetic_weights import REFERENCE, synthetic_state_dict

DATA = REFERENCE.parent

# The tests never write into the user's cache folder (converted checkpoints, embeddings, the precision
# calibration): one throw-away folder for the whole run, unless a test sets its own.
os.environ.setdefault("SAMMED2D_CACHE_DIR", tempfile.mkdtemp(prefix="sammed2d-test-cache-"))


def synthetic_model(build: str) -> SamMed2D:
    model = build_sam_med2d(build)
    model.load_state_dict(synthetic_state_dict(build), strict=True)
    return model.eval()


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    with np.load(REFERENCE / "golden_vit_b.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def small_model() -> SamMed2D:
    return synthetic_model("small")


@pytest.fixture(scope="session")
def vit_b_model() -> SamMed2D:
    return synthetic_model("vit_b")

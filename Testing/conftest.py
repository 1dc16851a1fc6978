"""Shared fixtures: the golden reference data and models carrying the synthetic weights it was made with, the
bundled 20-slice CT, and a real engine process for the tests of the Slicer side."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from SAMMed2DSegmentLib.formats.volumes import Volume, read_volume
from SAMMed2DSegmentLib.model import SamMed2D, build_sam_med2d
from SAMMed2DSegmentLib.service.client import EngineClient

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


#: The bundled CT (DICOM, 20 slices): the liver point of demo/liver-point.mrk.json lies on slice 10.
CT = Path(__file__).parent / "Data" / "totalseg-example-ct" / "ct"


@pytest.fixture(scope="module")
def ct() -> Volume:
    return read_volume(CT)


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[EngineClient]:
    """One engine process per test module (a test that kills it gets the next one from the next request);
    its cache folder, embeddings on disk included, is this run's own, not the user's."""
    client = EngineClient(extra_env={"SAMMED2D_CACHE_DIR": str(tmp_path_factory.mktemp("engine-cache"))})
    yield client
    client.close()

"""Embeddings on disk: reused by a later session, never for another volume content, window, axis, model or
precision, never when damaged, and the folder stays within its bound (tier A, small synthetic model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from SAMMed2DSegmentLib.engine.disk_cache import DiskEmbeddingCache, volume_content_hash
from SAMMed2DSegmentLib.engine.intensity import IntensityWindow
from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor
from SAMMed2DSegmentLib.engine.prompts import PointPrompt
from SAMMed2DSegmentLib.engine.session import SegmentationSession

IJK_TO_RAS = np.array([[-0.8, 0, 0, 10], [0, -0.8, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1.0]])
SLICES = 5


@pytest.fixture
def volume() -> np.ndarray:
    rng = np.random.default_rng(1)
    array = rng.normal(0, 20, (SLICES, 36, 40)).astype(np.int16) - 1000
    array[:, 8:28, 10:30] += 1060
    return array


def _session(model, folder: Path, volume: np.ndarray, precision: str = "fp32", sha: str = "a" * 64,
             window: IntensityWindow | None = None) -> SegmentationSession:  # fmt: skip
    session = SegmentationSession(SamMed2DPredictor(model, precision), disk_cache=folder, model_sha256=sha)
    session.set_volume(volume, IJK_TO_RAS, window=window)
    return session


def _encode_all(session: SegmentationSession, axis: str = "axial") -> list[int]:
    count = session.volume.geometry(axis).num_slices
    return session.prefetch(axis, range(count))


def test_a_second_session_encodes_nothing_and_gets_the_same_masks(small_model, tmp_path, volume):
    point = [PointPrompt(tuple((IJK_TO_RAS @ [20, 18, 2, 1])[:3]), 1)]
    first = _session(small_model, tmp_path, volume)
    list(first.propagate(point))
    run1 = first.last
    assert run1.result.encoded_slices > 0
    assert len(list(tmp_path.glob("*.safetensors"))) == run1.result.encoded_slices

    second = _session(small_model, tmp_path, volume.copy())  # a new session, a new copy of the voxels
    list(second.propagate(point))
    run2 = second.last
    assert run2.result.encoded_slices == 0
    assert second.cache.disk.hits == run1.result.encoded_slices
    masks1, masks2 = run1.result.masks(), run2.result.masks()
    assert masks1.keys() == masks2.keys()
    assert all(np.array_equal(masks1[i], masks2[i]) for i in masks1)


def test_editing_one_voxel_invalidates_the_volume(small_model, tmp_path, volume):
    assert len(_encode_all(_session(small_model, tmp_path, volume))) == SLICES
    edited = volume.copy()
    edited[3, 5, 7] += 1
    assert volume_content_hash(edited, IJK_TO_RAS) != volume_content_hash(volume, IJK_TO_RAS)
    assert len(_encode_all(_session(small_model, tmp_path, edited))) == SLICES
    assert _encode_all(_session(small_model, tmp_path, volume)) == []  # the original is still cached


def test_another_window_axis_model_or_precision_misses(small_model, tmp_path, volume):
    assert len(_encode_all(_session(small_model, tmp_path, volume))) == SLICES
    assert _encode_all(_session(small_model, tmp_path, volume)) == []
    window = IntensityWindow.from_level_width(60, 300)  # the automatic one is 40/400 here
    assert len(_encode_all(_session(small_model, tmp_path, volume, window=window))) == SLICES
    assert len(_encode_all(_session(small_model, tmp_path, volume), axis="coronal")) == volume.shape[1]
    assert len(_encode_all(_session(small_model, tmp_path, volume, sha="b" * 64))) == SLICES
    bf16 = _session(small_model, tmp_path, volume, precision="bf16")
    assert len(_encode_all(bf16)) == SLICES
    engine = bf16.engine("axial")
    again = _session(small_model, tmp_path, volume, precision="bf16")
    assert again.cache.disk.get((engine.cache_key, 0)).dtype == torch.bfloat16  # kept as computed


def test_a_model_without_a_file_hash_is_keyed_by_its_weights(small_model, tmp_path, volume):
    session = SegmentationSession(SamMed2DPredictor(small_model), disk_cache=tmp_path)
    assert len(session.model_sha256) == 64
    session.set_volume(volume, IJK_TO_RAS)
    assert len(_encode_all(session)) == SLICES


@pytest.mark.parametrize("damage", ["truncate", "flip", "other-key"])
def test_a_damaged_or_mismatched_entry_is_discarded(small_model, tmp_path, volume, damage):
    session = _session(small_model, tmp_path, volume)
    _encode_all(session)
    engine = session.engine("axial")
    target = session.cache.disk.path_for((engine.cache_key, 2))
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) - 100])
    elif damage == "flip":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 0x40]))
    else:  # a valid file, but written for slice 3
        target.write_bytes(session.cache.disk.path_for((engine.cache_key, 3)).read_bytes())
    fresh = _session(small_model, tmp_path, volume)
    assert fresh.prefetch("axial", range(SLICES)) == [2]  # slice 2 encoded again, the others read
    assert fresh.cache.disk.discarded == 1
    fresh.predictor.set_image(fresh.engine("axial").slice_image(2))
    assert torch.equal(fresh.cache.get((engine.cache_key, 2)), fresh.predictor.get_image_embedding())


def test_the_size_bound_holds_and_the_least_recently_used_go_first(tmp_path):
    embedding = torch.randn(1, 256, 16, 16)
    probe = DiskEmbeddingCache(tmp_path / "probe")
    probe.put(("k", 0), embedding)
    entry = probe.nbytes
    cache = DiskEmbeddingCache(tmp_path / "c", max_bytes=3 * entry + entry // 2)  # room for three
    for i in range(3):
        cache.put(("k", i), embedding + i)
    assert cache.get(("k", 0)) is not None  # used: now the most recent
    cache.put(("k", 3), embedding + 3)
    cache.put(("k", 4), embedding + 4)
    sizes = sum(p.stat().st_size for p in (tmp_path / "c").iterdir())
    assert sizes <= cache.max_bytes and cache.nbytes == sizes
    assert cache.get(("k", 1)) is None and cache.get(("k", 2)) is None
    assert torch.equal(cache.get(("k", 0)), embedding)
    reopened = DiskEmbeddingCache(tmp_path / "c", max_bytes=entry + entry // 2)  # a smaller bound later
    reopened.put(("k", 5), embedding + 5)
    assert len(list((tmp_path / "c").iterdir())) == 1 and reopened.nbytes <= reopened.max_bytes


def test_the_command_line_reuses_its_embedding_cache(tmp_path):
    import json

    from SAMMed2DSegmentLib import cli

    from .test_demo_model import CT, PROMPT

    reports = []
    for run in range(2):
        report = tmp_path / f"report{run}.json"
        argv = ["segment", "--volume", str(CT / "ct"), "--include", str(PROMPT), "--precision", "fp32",
                "--embedding-cache", str(tmp_path / "embeddings"), "--out", str(tmp_path / f"{run}.seg.nrrd"),
                "--report", str(report), "--quiet"]  # fmt: skip
        assert cli.main(argv) == 0
        reports.append(json.loads(report.read_text()))
    first, second = reports
    assert first["encoded_slices"] > 0 and first["embedding_cache"]["written"] == first["encoded_slices"]
    assert second["encoded_slices"] == 0 and second["embedding_cache"]["read"] == first["encoded_slices"]
    assert first["slices"] == second["slices"]

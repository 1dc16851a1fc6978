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
    sizes = sum(p.stat().st_size for p in (tmp_path / "c").glob("*.safetensors"))
    assert sizes <= cache.max_bytes and cache.nbytes == sizes
    assert cache.get(("k", 1)) is None and cache.get(("k", 2)) is None
    assert torch.equal(cache.get(("k", 0)), embedding)
    reopened = DiskEmbeddingCache(tmp_path / "c", max_bytes=entry + entry // 2)  # a smaller bound later
    reopened.put(("k", 5), embedding + 5)
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 1 and reopened.nbytes <= reopened.max_bytes


def test_the_command_line_reuses_its_embedding_cache(tmp_path):
    import json

    from SAMMed2DSegmentLib import commands

    from .test_demo_model import CT, PROMPT

    reports = []
    for run in range(2):
        report = tmp_path / f"report{run}.json"
        argv = ["segment", "--volume", str(CT / "ct"), "--include", str(PROMPT), "--precision", "fp32",
                "--embedding-cache", str(tmp_path / "embeddings"), "--out", str(tmp_path / f"{run}.seg.nrrd"),
                "--report", str(report), "--quiet"]  # fmt: skip
        assert commands.main(argv) == 0
        reports.append(json.loads(report.read_text()))
    first, second = reports
    assert first["encoded_slices"] > 0 and first["embedding_cache"]["written"] == first["encoded_slices"]
    assert second["encoded_slices"] == 0 and second["embedding_cache"]["read"] == first["encoded_slices"]
    assert first["slices"] == second["slices"]


# ----------------------------------------------------------------------------------------------------
# The cache owns only what it made (issue 24, item 3)

EMBEDDING = (1, 256, 16, 16)  # the small build's embedding


def _entry_bytes(key, tensor: torch.Tensor) -> bytes:
    """A well-formed entry for `key` (right name, right key, right checksum) holding any tensor."""
    import hashlib

    from safetensors.torch import save as save_safetensors

    from SAMMed2DSegmentLib.engine import disk_cache

    tensor = tensor.contiguous()
    digest = hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy()).hexdigest()
    meta = {"format": disk_cache.FORMAT, "key": disk_cache._key_text(key), "sha256": digest}
    return save_safetensors({"embedding": tensor}, metadata=meta)


def test_a_folder_of_user_files_is_never_emptied(small_model, tmp_path, volume):
    """The run's own checkpoint and other files in the named folder survive any bound."""
    from safetensors.torch import save_file

    from SAMMed2DSegmentLib.weights.checkpoint import load_model

    user = tmp_path / "models"
    user.mkdir()
    checkpoint = user / "model.safetensors"
    save_file({k: v.contiguous() for k, v in small_model.state_dict().items()}, str(checkpoint))
    named_like_ours = user / ("0" * 64 + ".safetensors")
    named_like_ours.write_bytes(b"mine")
    (user / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in user.iterdir()}
    model, info = load_model(checkpoint)
    cache = DiskEmbeddingCache(user, max_bytes=300_000)  # about one entry: every put evicts
    session = SegmentationSession(SamMed2DPredictor(model), disk_cache=cache, model_sha256=info.sha256)
    session.set_volume(volume, IJK_TO_RAS)
    assert len(_encode_all(session)) == SLICES
    assert {p.name: p.read_bytes() for p in user.iterdir() if p.is_file()} == before
    assert cache.folder.parent == user and (cache.folder / "CACHEDIR.TAG").is_file()
    assert 0 < cache.nbytes <= cache.max_bytes


def test_only_entries_named_by_the_cache_are_evicted_in_its_own_folder(tmp_path):
    cache = DiskEmbeddingCache(tmp_path / "c", max_bytes=300_000)
    cache.put(("k", 0), torch.zeros(EMBEDDING))
    stray = cache.folder / "dropped-here.safetensors"
    stray.write_bytes(b"x" * 400_000)  # over the bound on its own
    cache = DiskEmbeddingCache(tmp_path / "c", max_bytes=300_000)  # a later run finds it there
    for i in range(1, 4):
        cache.put(("k", i), torch.full(EMBEDDING, float(i)))
    assert stray.read_bytes() == b"x" * 400_000
    assert cache.get(("k", 3)) is not None and cache.nbytes <= cache.max_bytes


def test_a_new_or_empty_folder_is_used_and_marked(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (tmp_path / "new" / "deep", empty):
        cache = DiskEmbeddingCache(folder)
        assert cache.folder == folder and "SAMMed2D" in (folder / "CACHEDIR.TAG").read_text()
        cache.put(("k", 0), torch.zeros(EMBEDDING))
        assert DiskEmbeddingCache(folder).folder == folder  # marked: used as it is next time


def test_a_file_named_as_the_cache_folder_is_refused_with_one_warning(tmp_path, caplog):
    target = tmp_path / "not-a-folder"
    target.write_bytes(b"mine")
    cache = DiskEmbeddingCache(target)
    for i in range(3):
        cache.put(("k", i), torch.zeros(EMBEDDING))
        assert cache.get(("k", i)) is None
    assert target.read_bytes() == b"mine"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"embedding cache off: {target} is not a folder"
    ]


@pytest.mark.parametrize("problem", ["shape", "nan", "dtype", "size"])
def test_an_invalid_entry_is_discarded_and_recomputed(small_model, tmp_path, volume, problem):
    session = _session(small_model, tmp_path, volume)
    _encode_all(session)
    key = (session.engine("axial").cache_key, 2)
    bad = {
        "shape": torch.zeros(1, 256, 8, 8),
        "nan": torch.full(EMBEDDING, float("nan")),
        "dtype": torch.zeros(EMBEDDING, dtype=torch.float64),
        "size": torch.zeros(EMBEDDING),
    }[problem]
    data = _entry_bytes(key, bad)
    session.cache.disk.path_for(key).write_bytes(data + (b"\0" * 64 if problem == "size" else b""))
    fresh = _session(small_model, tmp_path, volume)
    assert fresh.prefetch("axial", range(SLICES)) == [2]  # discarded, encoded again; never fatal
    assert fresh.cache.disk.discarded == 1
    fresh.predictor.set_image(fresh.engine("axial").slice_image(2))
    assert torch.equal(fresh.cache.get(key), fresh.predictor.get_image_embedding())
    assert _session(small_model, tmp_path, volume).prefetch("axial", range(SLICES)) == []  # rewritten


SPARSE_BYTES = 6 << 30


def _header_only(key, shape: tuple[int, ...], nbytes: int) -> bytes:
    """The header of an entry for `key` claiming an F32 tensor of `shape` and `nbytes`, without its data."""
    import json
    import struct

    from SAMMed2DSegmentLib.engine import disk_cache

    meta = {"format": disk_cache.FORMAT, "key": disk_cache._key_text(key), "sha256": "0" * 64}
    header = {
        "__metadata__": meta,
        "embedding": {"dtype": "F32", "shape": list(shape), "data_offsets": [0, nbytes]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize("claimed", ["the embedding", "6 GiB"])
def test_a_sparse_huge_entry_is_discarded_without_being_read(tmp_path, claimed):
    import os
    import tracemalloc

    cache = DiskEmbeddingCache(tmp_path)
    key = ("k", 0)
    path = cache.path_for(key)
    if claimed == "the embedding":  # a right header, then gigabytes more than it says
        header = _header_only(key, EMBEDDING, 4 * 256 * 16 * 16)
    else:  # a header that says what the file holds: 6 GiB, beyond the folder's bound
        header = _header_only(key, (1, 256, 16, SPARSE_BYTES // (4 * 256 * 16)), SPARSE_BYTES)
    path.write_bytes(header)
    os.truncate(path, len(header) + SPARSE_BYTES)  # sparse: no disk used
    tracemalloc.start()
    try:
        assert cache.get(key) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20 and not path.exists() and cache.discarded == 1


def test_the_bound_holds_for_two_processes_sharing_the_folder(tmp_path):
    """Two caches on one folder (as two processes have): each sees the other's entries when it evicts."""
    first = DiskEmbeddingCache(tmp_path, max_bytes=3 * 270_000)
    second = DiskEmbeddingCache(tmp_path, max_bytes=3 * 270_000)
    for i in range(6):
        (first if i % 2 else second).put(("k", i), torch.full(EMBEDDING, float(i)))
        total = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
        assert total <= first.max_bytes
    assert first.nbytes == second.nbytes == total


def test_the_bound_holds_for_two_real_processes(tmp_path):
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from SAMMed2DSegmentLib.engine.disk_cache import DiskEmbeddingCache\n"
        "cache = DiskEmbeddingCache(sys.argv[1], max_bytes=4 * 270_000)\n"
        "for i in range(12):\n"
        "    cache.put((sys.argv[2], i), torch.full((1, 256, 16, 16), float(i)))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), name]) for name in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert sum(p.stat().st_size for p in tmp_path.glob("*.safetensors")) <= 4 * 270_000


@pytest.mark.parametrize("problem", ["full", "not-a-folder"])
def test_an_unwritable_cache_warns_once_per_run(small_model, tmp_path, volume, caplog, monkeypatch, problem):
    import errno

    from SAMMed2DSegmentLib.engine import disk_cache

    folder = tmp_path / "cache"
    if problem == "full":

        def full(*_args, **_kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(disk_cache, "atomic_path", full)
    else:
        (tmp_path / "file").write_bytes(b"")
        folder = tmp_path / "file" / "cache"
    session = _session(small_model, folder, volume)
    assert len(_encode_all(session)) == SLICES
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()


def test_a_checkpoint_claiming_another_models_hash_gets_its_own_embeddings(tmp_path, volume):
    """The key names the file actually loaded: a claim in its metadata is not its identity."""
    from safetensors.torch import save_file

    from SAMMed2DSegmentLib.weights.checkpoint import FORMAT_TAG, load_model

    from .synthetic_weights import synthetic_state_dict

    sd = synthetic_state_dict("small")
    claim = {"format": FORMAT_TAG, "build": "small", "source_sha256": "c" * 64}
    save_file(sd, str(tmp_path / "a.safetensors"), metadata=claim)
    save_file({k: v * 1.5 for k, v in sd.items()}, str(tmp_path / "b.safetensors"), metadata=claim)
    runs = []
    for name in "ab":
        model, info = load_model(tmp_path / f"{name}.safetensors", cache_dir=tmp_path / "weights")
        session = SegmentationSession(SamMed2DPredictor(model), disk_cache=tmp_path / "emb",
                                      model_sha256=info.sha256)  # fmt: skip
        session.set_volume(volume, IJK_TO_RAS)
        runs.append((info.sha256, _encode_all(session)))
    (sha_a, encoded_a), (sha_b, encoded_b) = runs
    assert sha_a != sha_b and "c" * 64 not in (sha_a, sha_b)
    assert len(encoded_a) == len(encoded_b) == SLICES


def test_a_short_ledger_left_by_a_killed_run_is_measured_again(tmp_path):
    from SAMMed2DSegmentLib.engine.disk_cache import LEDGER

    cache = DiskEmbeddingCache(tmp_path, max_bytes=3 * 270_000)
    for i in range(3):
        cache.put(("k", i), torch.full(EMBEDDING, float(i)))
    (tmp_path / LEDGER).write_text("0")  # as if entries had been written without being counted
    DiskEmbeddingCache(tmp_path, max_bytes=3 * 270_000).put(("k", 3), torch.zeros(EMBEDDING))
    assert cache.nbytes <= cache.max_bytes and len(list(tmp_path.glob("*.safetensors"))) == 2


@pytest.mark.parametrize("kind", ["fifo", "deep-json", "link"])
def test_an_entry_that_is_not_a_plain_file_or_header_is_a_miss_that_never_blocks(tmp_path, kind):
    import os
    import struct

    cache = DiskEmbeddingCache(tmp_path / "c")
    key = ("k", 0)
    path = cache.path_for(key)
    outside, theirs = tmp_path / "outside.safetensors", _entry_bytes(key, torch.zeros(EMBEDDING))
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "deep-json":
        path.write_bytes(struct.pack("<Q", 60_000) + b"[" * 60_000)
    else:
        outside.write_bytes(theirs)
        path.symlink_to(outside)
    assert cache.get(key) is None
    cache.put(key, torch.ones(EMBEDDING))  # replaced by a real entry; a link's target is left alone
    assert torch.equal(cache.get(key), torch.ones(EMBEDDING))
    if kind == "link":
        assert outside.read_bytes() == theirs


def test_a_killed_writers_temporary_file_is_removed_by_a_later_run(tmp_path):
    import os
    import time

    cache = DiskEmbeddingCache(tmp_path)
    name = cache.path_for(("k", 0)).name
    stale, live = tmp_path / f".{name}.0a1b2c.part", tmp_path / f".{name}.3d4e5f.part"
    users = tmp_path / f".{name}.mine.tmp"  # not a name the cache gives its temporary files
    for path in (stale, live, users):
        path.write_bytes(b"half an entry")
    old = time.time() - 2 * 3600
    for path in (stale, users):
        os.utime(path, (old, old))
    DiskEmbeddingCache(tmp_path).put(("k", 1), torch.zeros(EMBEDDING))
    assert not stale.exists() and live.exists() and users.exists()

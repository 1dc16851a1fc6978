"""Slice embeddings on disk, so a volume opened again (another session, a restarted engine) is not re-encoded.

An entry's key names everything the embedding depends on: the volume's voxel content and geometry (a hash of
the array bytes and ijk_to_ras, not a node name or a time stamp), the axis, the intensity window, the model's
SHA-256 and the encoder precision, and the slice index. Each entry is one safetensors file (no pickle) holding
the embedding in the precision it was computed in, with its full key and a SHA-256 of the tensor bytes in the
header: an entry that is truncated, damaged, or written for another key is deleted and never used. Files are
written atomically, and the folder is bounded in bytes, least recently used entries evicted first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..files import atomic_path

log = logging.getLogger("SAMMed2D.disk_cache")

DEFAULT_DISK_BYTES = 2 << 30  # ≈ 16,000 vit_b slices in bf16, 8,000 in fp32
FORMAT = "sammed2d-embedding-v1"
SUFFIX = ".safetensors"


def volume_content_hash(array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> str:
    """SHA-256 of the voxels (dtype, shape, bytes) and the 4×4 geometry: equal only for the same volume."""
    array = np.ascontiguousarray(array_kji)
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}|{array.shape}|".encode())
    digest.update(memoryview(array).cast("B"))
    digest.update(np.ascontiguousarray(ijk_to_ras, dtype="<f8").tobytes())
    return digest.hexdigest()


def content_key(array_kji: np.ndarray, ijk_to_ras: np.ndarray, model_sha256: str, precision: str) -> tuple:
    """The volume's part of every embedding key on disk (the engine adds axis, window and slice index)."""
    return (FORMAT, volume_content_hash(array_kji, ijk_to_ras), str(model_sha256), str(precision))


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes, bytes), for a model without a file hash."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(_tensor_bytes(t))
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def _key_text(key: Hashable) -> str:
    """The key as canonical JSON (tuples become lists): the file name is its hash, the header holds it."""
    return json.dumps(key, separators=(",", ":"), allow_nan=False, default=lambda v: v.item())


class DiskEmbeddingCache:
    """A folder of embedding files bounded to `max_bytes`; safe against damaged files, not against two
    processes evicting at once (the worst case is a miss)."""

    def __init__(self, folder: str | os.PathLike[str], max_bytes: int = DEFAULT_DISK_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"disk cache size must be ≥ 0 bytes, got {max_bytes}")
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self._index: dict[Path, tuple[float, int]] | None = None  # path → (last use, size), read lazily
        self._lock = threading.Lock()
        self.hits = self.misses = self.writes = self.discarded = 0

    def path_for(self, key: Hashable) -> Path:
        return self.folder / (hashlib.sha256(_key_text(key).encode()).hexdigest() + SUFFIX)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._entries().values())

    def _entries(self) -> dict[Path, tuple[float, int]]:
        if self._index is None:
            self._index = {}
            if self.folder.is_dir():
                for path in self.folder.glob("*" + SUFFIX):
                    try:
                        st = path.stat()
                    except OSError:
                        continue
                    self._index[path] = (st.st_mtime, st.st_size)
        return self._index

    def get(self, key: Hashable) -> torch.Tensor | None:
        """The embedding stored under `key`, or None (a damaged or mismatched file is deleted)."""
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except OSError:
            self.misses += 1
            return None
        tensor = self._decode(data, _key_text(key))
        with self._lock:
            if tensor is None:
                self.discarded += 1
                self.misses += 1
                path.unlink(missing_ok=True)
                self._entries().pop(path, None)
                log.warning("discarded a damaged or mismatched embedding file %s", path.name)
                return None
            self.hits += 1
            try:
                os.utime(path)  # its last use, for the LRU order (atime is often off)
                self._entries()[path] = (path.stat().st_mtime, len(data))
            except OSError:
                pass
        return tensor

    @staticmethod
    def _decode(data: bytes, key_text: str) -> torch.Tensor | None:
        try:
            (header_len,) = struct.unpack("<Q", data[:8])
            meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
            if meta.get("format") != FORMAT or meta.get("key") != key_text:
                return None
            tensor = load_safetensors(data)["embedding"]
        except (struct.error, ValueError, KeyError, SafetensorError):
            return None
        if hashlib.sha256(_tensor_bytes(tensor)).hexdigest() != meta.get("sha256"):
            return None
        return tensor

    def put(self, key: Hashable, tensor: torch.Tensor) -> None:
        """Store `tensor` under `key` (atomically), then evict the least recently used beyond the bound.
        A write error (full or read-only disk) is logged, never raised: the cache is an optimisation."""
        tensor = tensor.detach().cpu().contiguous()
        meta = {
            "format": FORMAT,
            "key": _key_text(key),
            "sha256": hashlib.sha256(_tensor_bytes(tensor)).hexdigest(),
        }
        data = save_safetensors({"embedding": tensor}, metadata=meta)
        if len(data) > self.max_bytes:
            return
        path = self.path_for(key)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            mtime = path.stat().st_mtime
        except OSError as exc:
            log.warning("could not write an embedding to %s: %s", self.folder, exc)
            return
        with self._lock:
            entries = self._entries()
            entries[path] = (mtime, len(data))
            self.writes += 1
            self._evict(entries)

    def _evict(self, entries: dict[Path, tuple[float, int]]) -> None:
        total = sum(size for _, size in entries.values())
        if total <= self.max_bytes:
            return
        for path, (_, size) in sorted(entries.items(), key=lambda item: item[1][0]):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            del entries[path]
            total -= size

    def clear(self) -> None:
        with self._lock:
            for path in list(self._entries()):
                path.unlink(missing_ok=True)
            self._index = {}


__all__ = ["DEFAULT_DISK_BYTES", "DiskEmbeddingCache", "content_key", "volume_content_hash", "weights_hash"]

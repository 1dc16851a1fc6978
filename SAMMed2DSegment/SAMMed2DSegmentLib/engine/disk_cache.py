"""Slice embeddings on disk, so a volume opened again (another session, a restarted engine) is not re-encoded.

An entry's key names everything the embedding depends on: the volume's voxel content and geometry (a hash of
the array bytes and ijk_to_ras, not a node name or a time stamp), the axis, the intensity window, the model's
SHA-256 (of the checkpoint file actually loaded, never a claim written inside it) and the encoder precision,
and the slice index. Each entry is one safetensors file (no pickle) named by the hash of its key, holding the
embedding in the precision it was computed in, with its full key and a SHA-256 of the tensor bytes in the
header.

The cache is an optimisation, so nothing in its folder may cost the user data or a run:
* it works only in a folder it made and marked (`weights.cache_dir.owned_folder`): a named folder that holds
  other files gets a marked `sammed2d-embeddings` subfolder, and only files named like its entries are ever
  deleted;
* an entry is checked from its header (key, dtype, shape, byte size against the file's size, the folder's
  bound) before any data is read, then its checksum and finiteness: anything else is deleted and encoded
  again, never fatal, and a huge or sparse file is never read;
* the bound is the folder's total, kept in a ledger and evicted under a lock file, so processes sharing it
  hold one bound between them, and a killed writer's temporary file is removed by a later run;
* a folder that cannot be used or written is one warning per cache object (one per run), not one per slice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import stat
import struct
import threading
import time
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from ..files import atomic_path
from ..weights.cache_dir import folder_lock, owned_folder

log = logging.getLogger("SAMMed2D.disk_cache")

DEFAULT_DISK_BYTES = 2 << 30  # ≈ 16,000 vit_b slices in bf16, 8,000 in fp32
FORMAT = "sammed2d-embedding-v1"
SUFFIX = ".safetensors"
PURPOSE = "slice-embedding cache"
SUBFOLDER = "sammed2d-embeddings"
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}" + re.escape(SUFFIX))
PART = ".part"  # the end of an entry's temporary name while it is written (beside it, hidden)
_PART_NAME = re.compile(r"\.[0-9a-f]{64}" + re.escape(SUFFIX) + r"\..+" + re.escape(PART))
STALE_PART_SECONDS = 3600  # a write takes milliseconds: a part this old is a killed run's
_MAX_HEADER = 1 << 16  # a real header is ≈ 500 bytes
LEDGER = ".sammed2d-total"  # the folder's total bytes, shared by the processes using it
LOW_WATER = 0.9  # an eviction frees a tenth of the bound, so the folder is not measured on every write
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


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
    """A folder of embedding files bounded to `max_bytes`, shared safely by several processes; see the module
    docstring for what it promises about the folder."""

    def __init__(self, folder: str | os.PathLike[str], max_bytes: int = DEFAULT_DISK_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"disk cache size must be ≥ 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.folder = Path(folder).expanduser()
        self._lock = threading.Lock()
        self._usable = self._writable = True
        self._measured = False  # the ledger is checked against the folder once per object
        self._shape: tuple[int, ...] | None = None
        self._dtype: torch.dtype | None = None
        self.hits = self.misses = self.writes = self.discarded = 0
        try:
            self.folder = owned_folder(self.folder, PURPOSE, SUBFOLDER)
        except OSError as exc:
            self._off(f"embedding cache off: {_reason(exc)}")

    def _off(self, message: str) -> None:
        """Stop using the folder, saying so once: a run must not print a line per slice."""
        if self._usable:
            log.warning("%s", message)
        self._usable = self._writable = False

    def expect(self, shape: Sequence[int], dtype: torch.dtype) -> None:
        """The shape and dtype the model's embeddings have: an entry holding anything else is discarded."""
        self._shape, self._dtype = tuple(int(n) for n in shape), dtype

    def path_for(self, key: Hashable) -> Path:
        return self.folder / (hashlib.sha256(_key_text(key).encode()).hexdigest() + SUFFIX)

    def _entries(self) -> dict[Path, tuple[int, int]]:
        """The folder's entries as they are now (other processes' too): path → (last use in ns, size).
        Only plain files named like an entry count; nothing else in the folder is ours."""
        found: dict[Path, tuple[int, int]] = {}
        if not self._usable:
            return found
        try:
            with os.scandir(self.folder) as it:
                for item in it:
                    if _ENTRY_NAME.fullmatch(item.name) and item.is_file(follow_symlinks=False):
                        try:
                            st = item.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        found[Path(item.path)] = (st.st_mtime_ns, st.st_size)
        except OSError:
            pass
        return found

    @property
    def nbytes(self) -> int:
        """Bytes the folder's entries take now, whichever process wrote them."""
        return sum(size for _, size in self._entries().values())

    def get(self, key: Hashable) -> torch.Tensor | None:
        """The embedding stored under `key`, or None. An invalid entry (damaged, written for another key,
        shape, dtype or size, holding NaN) is deleted so it is encoded and written again."""
        path = self.path_for(key)
        if not self._usable:
            self.misses += 1
            return None
        try:
            # no link followed, and a FIFO named like an entry must not block the open
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
            fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
        except OSError:
            self.misses += 1
            return None
        with os.fdopen(fd, "rb") as fh:
            tensor = self._read(fh, _key_text(key))
        with self._lock:
            if tensor is None:
                self.discarded += 1
                self.misses += 1
                self._discard(path)
                return None
            self.hits += 1
        try:
            os.utime(path)  # its last use, for the LRU order (atime is often off)
        except OSError:
            pass
        return tensor

    def _discard(self, path: Path) -> None:
        log.info("discarded an invalid embedding file %s", path.name)
        try:
            if stat.S_ISREG(path.lstat().st_mode):
                path.unlink()
        except OSError:
            pass

    def _read(self, fh: BinaryIO, key_text: str) -> torch.Tensor | None:
        """The entry's tensor, or None when it is invalid; the data is read only after its header passed."""
        try:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size < 8:
                return None
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > _MAX_HEADER or 8 + header_len > st.st_size:
                return None
            header = json.loads(fh.read(header_len))
            spec = self._valid_header(header, key_text)
            if spec is None:
                return None
            dtype, shape, nbytes = spec
            if 8 + header_len + nbytes != st.st_size or nbytes > self.max_bytes:
                return None
            data = bytearray(nbytes)
            if fh.readinto(data) != nbytes:
                return None
        except (OSError, ValueError, struct.error, RecursionError):
            return None
        tensor = torch.frombuffer(data, dtype=dtype).reshape(shape)
        if hashlib.sha256(data).hexdigest() != header["__metadata__"].get("sha256"):
            return None
        if not bool(torch.isfinite(tensor).all()):
            return None
        return tensor

    def _valid_header(self, header: object, key_text: str) -> tuple[torch.dtype, tuple[int, ...], int] | None:
        """(dtype, shape, byte size) the header announces, when it is an entry for `key_text` of the
        expected kind; else None."""
        if not isinstance(header, dict) or set(header) != {"__metadata__", "embedding"}:
            return None
        meta, entry = header["__metadata__"], header["embedding"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("key") != key_text:
            return None
        if not isinstance(entry, dict):
            return None
        dtype = _DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if dtype is None or not _ints(shape) or not _ints(offsets) or len(offsets) != 2:
            return None
        shape = tuple(shape)
        if self._shape is not None and (shape != self._shape or dtype != self._dtype):
            return None
        nbytes = math.prod(shape) * dtype.itemsize
        if any(n < 1 for n in shape) or offsets != [0, nbytes]:
            return None
        return dtype, shape, nbytes

    def put(self, key: Hashable, tensor: torch.Tensor) -> None:
        """Store `tensor` under `key` (atomically), then evict the least recently used beyond the bound.
        A write error (full or read-only disk) is one warning, after which this cache only reads."""
        if not self._writable:
            return
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
            if path.is_symlink():  # an entry's name is ours; a link there must not carry the write outside
                path.unlink()
            with atomic_path(path, suffix=PART) as tmp:
                tmp.write_bytes(data)
        except OSError as exc:
            log.warning("embedding cache: cannot write (%s); not writing more in this run", _reason(exc))
            self._writable = False
            return
        with self._lock:
            self.writes += 1
        self._account(len(data))

    def _account(self, added: int) -> None:
        """Add `added` bytes to the folder's shared total and evict when it passes the bound, under the
        folder's lock, so processes sharing the folder keep one bound between them, not one each.

        The total lives in a small ledger file beside the entries, because measuring the folder on every
        write costs ≈0.4 s at 16,000 entries. The ledger is measured again on this object's first write
        (a killed run may have left it short), whenever it is missing or unreadable, and at every eviction;
        it can only err high otherwise (a rewritten or discarded entry), which evicts early, never late.
        """
        with folder_lock(self.folder):
            total = None if not self._measured else _read_total(self.folder / LEDGER)
            if total is None:
                self._remove_stale_parts()
                total = self.nbytes
                self._measured = True
            else:
                total += added
            if total > self.max_bytes:
                total = self._evict(int(self.max_bytes * LOW_WATER))
            with contextlib.suppress(OSError):
                (self.folder / LEDGER).write_text(str(total), encoding="ascii")

    def _remove_stale_parts(self) -> None:
        """Delete the temporary files of entries whose writer was killed (named after an entry, ending in
        `PART`, older than an hour): they hold disk space outside the bound and nobody else removes them."""
        cutoff = time.time() - STALE_PART_SECONDS
        with contextlib.suppress(OSError), os.scandir(self.folder) as it:
            for item in it:
                if _PART_NAME.fullmatch(item.name) and item.is_file(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        if item.stat(follow_symlinks=False).st_mtime < cutoff:
                            os.unlink(item.path)

    def _evict(self, target: int) -> int:
        """Delete the least recently used entries (files named like ours, nothing else) until the folder's
        measured total is at most `target`; returns the total left. The caller holds the folder's lock."""
        entries = self._entries()
        total = sum(size for _, size in entries.values())
        for path, (_, size) in sorted(entries.items(), key=lambda item: item[1][0]):
            if total <= target:
                break
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                continue
            total -= size
        return total

    def clear(self) -> None:
        """Delete every entry (and nothing else) in the folder."""
        with folder_lock(self.folder):
            for path in self._entries():
                path.unlink(missing_ok=True)
            (self.folder / LEDGER).unlink(missing_ok=True)


def _read_total(ledger: Path) -> int | None:
    """The byte total a ledger file records, or None when it is missing or unreadable."""
    try:
        text = ledger.read_text(encoding="ascii")
    except (OSError, ValueError):
        return None
    return int(text) if text.isdigit() else None


def _ints(value: object) -> bool:
    return isinstance(value, list) and all(type(n) is int for n in value)


def _reason(exc: OSError) -> str:
    """An OSError as one short line naming the path, not a repr."""
    if exc.strerror is None:
        return str(exc)
    return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror


__all__ = ["DEFAULT_DISK_BYTES", "DiskEmbeddingCache", "content_key", "volume_content_hash", "weights_hash"]

"""A model's int8 encoder weights, quantized once and kept in the cache folder.

Why: quantizing the encoder's weights (torch's per-channel observer and quantizer, `model/int8_linear.py`)
took about 1.5 s of the 3 s an int8 start spent preparing on a 2-core CPU, before the first click could be
answered; packing the kept values is the rest. The files live in their own subfolder, `int8/`, one per model
(by SHA-256) and torch version: another torch may round differently, and a start must give the same masks
whether the file was there or not (two torch versions sharing a cache each keep their own). A file that is
missing, damaged or of another model or torch counts as none; an entry that does not fit its weight is
quantized again (`lowp_encoder` also re-quantizes two rows of each and compares), and the file rewritten.
A model keeps the files of its two most recently used torch versions: an upgraded torch does not leave
262 MB (ViT-B) behind each time.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from ..files import atomic_path, remove_stale_temporaries
from ..model.int8_linear import QuantizedWeight
from .cache_dir import default_cache_dir

log = logging.getLogger("SAMMed2D.weights")

FORMAT_TAG = "sammed2d-int8-weights/1"
FOLDER = "int8"
_VALUES, _SCALES = ".values", ".scales"
#: Torch versions whose files a model keeps (the one in use and the last other one: Slicer's and a virtual
#: environment's torch sharing one cache each keep theirs).
TORCH_VERSIONS_KEPT = 2
_NOT_READ = object()
#: One write at a time in a process: a batch worker's threads each quantize on their first case, and each
#: write holds the file's bytes (262 MB for ViT-B); the later ones find the file kept and skip theirs.
_WRITING = threading.Lock()


def _torch_tag(version: str) -> str:
    return re.sub(r"[^\w.]", "_", version)


class Int8WeightsFile:
    """The int8 weights of the model whose SHA-256 is `model_sha256`, in the file `path`."""

    def __init__(self, path: str | os.PathLike[str], model_sha256: str) -> None:
        self.path = Path(path)
        self.model_sha256 = model_sha256
        self._read_identity: object = _NOT_READ  # the file as `read` found it (None: absent)

    @classmethod
    def in_cache(cls, model_sha256: str, cache_dir: str | os.PathLike[str] | None = None) -> Int8WeightsFile:
        """The model's file for this torch in the cache folder (`SAMMED2D_CACHE_DIR` by default)."""
        base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        name = f"{model_sha256[:32]}-torch{_torch_tag(torch.__version__)}.safetensors"
        return cls(base / FOLDER / name, model_sha256)

    @classmethod
    def remove_all(cls, model_sha256: str, cache_dir: str | os.PathLike[str] | None = None) -> None:
        """Delete the model's files of every torch version, only those we wrote for it (its conversion is
        stale: a new version of the checkpoint replaced it)."""
        with _WRITING:  # a write of this model still under way lands first, then goes too
            cls._remove(cls.in_cache(model_sha256, cache_dir)._versions(), "stale")

    def _versions(self) -> list[Int8WeightsFile]:
        """The files named for this model in this folder, whatever their torch version."""
        try:
            paths = sorted(self.path.parent.glob(f"{self.model_sha256[:32]}-torch*.safetensors"))
        except OSError:
            return []
        return [Int8WeightsFile(path, self.model_sha256) for path in paths]

    @staticmethod
    def _remove(files: list[Int8WeightsFile], why: str) -> None:
        for file in files:
            try:
                file.remove()
            except OSError as exc:  # the others still go
                log.warning("cannot delete the %s int8 weights %s: %s", why, file.path, exc)

    def _remove_unused_versions(self) -> None:
        """Delete this model's files of all but the most recently used other torch versions (`read` marks a
        use by the file's modification time)."""

        def last_used(file: Int8WeightsFile) -> int:
            try:
                return file.path.stat().st_mtime_ns
            except OSError:
                return 0

        others = [f for f in self._versions() if f.path != self.path and f._is_ours()]
        others.sort(key=last_used, reverse=True)
        self._remove(others[TORCH_VERSIONS_KEPT - 1 :], "unused")

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

        remove_stale_temporaries(self.path.parent)  # what a start killed while writing left
        self._read_identity = self._identity()
        if not self.path.is_file():
            return {}
        try:
            with safe_open(str(self.path), framework="pt") as fh:
                if (fh.metadata() or {}) != self._expected():
                    log.info("%s is not this model's or this torch's: quantizing anew", self.path.name)
                    return {}
                names = {key[: -len(_VALUES)] for key in fh.keys() if key.endswith(_VALUES)}
                weights = {
                    name: QuantizedWeight(fh.get_tensor(name + _VALUES), fh.get_tensor(name + _SCALES))
                    for name in names
                }
        except (OSError, SafetensorError, ValueError) as exc:  # a missing scale is a SafetensorError
            log.warning("cannot read the int8 weights in %s (%s): quantizing anew", self.path, exc)
            return {}
        self._mark_used()
        return weights

    def _identity(self) -> tuple[int, int] | None:
        """The file's inode and device: our writes replace the file (a new inode); a read's use mark does
        not."""
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_dev

    def _mark_used(self) -> None:
        """The modification time says when the file was last used (which versions `write` keeps); a cache
        that cannot be written keeps its times."""
        try:
            os.utime(self.path)
        except OSError:
            return

    def _kept_since_read(self) -> bool:
        """Whether another writer kept this model's weights for this torch since `read` (a thread of the
        same batch worker, another engine): the same values, so this write is not needed. A file of another
        model or torch put there meanwhile is not (it is replaced as usual)."""
        if self._read_identity is _NOT_READ or self._identity() == self._read_identity:
            return False
        return self._metadata() == self._expected()

    def write(self, weights: Mapping[str, QuantizedWeight]) -> bool:
        """Keep `weights` (atomically). A file already at the path that is not one of ours is left alone; a
        cache that cannot be written (read-only, full) only costs the quantization next time. Returns whether
        it was written."""
        with _WRITING:
            if self._kept_since_read():
                log.info("%s was kept meanwhile: not written again", self.path.name)
                return False
            if not self._write(weights):
                return False
        self._remove_unused_versions()
        return True

    def _write(self, weights: Mapping[str, QuantizedWeight]) -> bool:
        from safetensors import SafetensorError
        from safetensors.torch import save

        if self.path.exists() and (self._metadata() or {}).get("format") != FORMAT_TAG:
            log.warning("%s exists and cannot be read as SAMMed2D's int8 weights: it is left as it is, and "
                        "the weights are not kept (delete it to keep them)", self.path)  # fmt: skip
            return False
        tensors = {}
        for name, weight in weights.items():
            tensors[name + _VALUES] = weight.values.contiguous()
            tensors[name + _SCALES] = weight.scales.contiguous()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.path.parent)
            # Bytes into our own temporary file (locked while written, umask applied), not save_file's own.
            data = save(tensors, metadata=self._expected())
            with atomic_path(self.path) as tmp:
                tmp.write_bytes(data)
        except (OSError, SafetensorError) as exc:
            log.warning("cannot keep the int8 weights in %s: %s", self.path, exc)
            return False
        if self._read_identity is not _NOT_READ:
            self._read_identity = self._identity()  # our own write: a later one of ours is not skipped
        return True

    def _is_ours(self) -> bool:
        """Whether the file is one we wrote for this model (of any torch)."""
        metadata = self._metadata() or {}
        return metadata.get("format") == FORMAT_TAG and metadata.get("model_sha256") == self.model_sha256

    def remove(self) -> None:
        """Delete the file, only when it is one we wrote for this model."""
        if self._is_ours():
            self.path.unlink(missing_ok=True)

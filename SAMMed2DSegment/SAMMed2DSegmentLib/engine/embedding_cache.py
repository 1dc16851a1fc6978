"""A bounded least-recently-used cache of slice embeddings.

The encoder is the expensive step (≈0.6 s per slice on a 2-core CPU, against ≈10 ms per click), so each slice
is encoded at most once while it stays in the cache. The bound is in bytes (default 1 GB ≈ 4000 slices of
vit_b embeddings), so memory stays predictable whatever the volume size. With a `disk` cache behind it
(`disk_cache.py`), a miss in memory is looked up on disk before the encoder runs, and every new embedding is
also written there.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .disk_cache import DiskEmbeddingCache

DEFAULT_MAX_BYTES = 1 << 30


class EmbeddingCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, disk: DiskEmbeddingCache | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"cache size must be ≥ 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.disk = disk
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.peak_bytes = 0

    @staticmethod
    def _size(value: torch.Tensor) -> int:
        return value.element_size() * value.nelement()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self.hits += 1
                self._items.move_to_end(key)
                return value
        value = self.disk.get(key) if self.disk is not None else None
        with self._lock:
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
        if value is not None:
            self._remember(key, value)
        return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        self._remember(key, value)
        if self.disk is not None:
            self.disk.put(key, value)

    def _remember(self, key: Hashable, value: torch.Tensor) -> None:
        size = self._size(value)
        with self._lock:
            if key in self._items:
                self._bytes -= self._size(self._items.pop(key))
            if size > self.max_bytes:
                return  # larger than the whole budget: not kept
            while self._items and self._bytes + size > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= self._size(evicted)
            self._items[key] = value
            self._bytes += size
            self.peak_bytes = max(self.peak_bytes, self._bytes)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

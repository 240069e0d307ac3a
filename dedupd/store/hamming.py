"""Placeholder brute-force index; replaced by the multi-index hashing implementation."""

from __future__ import annotations

import threading

import numpy as np


class HammingIndex:
    """Near-duplicate lookup over fixed-width hashes held in memory."""

    def __init__(self, bits: int = 64) -> None:
        self.words = bits // 64
        self._ids: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, id: int, hash: int) -> None:
        with self._lock:
            self._ids[id] = hash

    def add_many(self, ids: np.ndarray, hashes: np.ndarray) -> None:
        with self._lock:
            for i, row in zip(ids.tolist(), hashes.reshape(len(ids), -1), strict=True):
                self._ids[i] = int.from_bytes(row.tobytes(), "little")

    def remove(self, id: int) -> None:
        with self._lock:
            self._ids.pop(id, None)

    def query(self, hash: int, max_distance: int, limit: int | None = None
              ) -> list[tuple[int, int]]:
        with self._lock:
            hits = [(i, (h ^ hash).bit_count()) for i, h in self._ids.items()]
        hits = sorted((d, i) for i, d in hits if d <= max_distance)
        out = [(i, d) for d, i in hits]
        return out[:limit] if limit is not None else out

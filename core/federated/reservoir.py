"""Weighted random sampling without replacement over a stream, in O(k) memory.

Efraimidis & Spirakis (2006), algorithm A-Res: give row i the key log(u_i) / w_i with u_i uniform
in (0, 1) and keep the k largest keys. The kept rows are distributed exactly as k successive
weighted draws without replacement, whatever order the rows arrive in, so a server can sample
from uploads chunk by chunk as they arrive.
"""

from __future__ import annotations

import numpy as np

__all__ = ["WeightedReservoir"]


class WeightedReservoir:
    """Keep a weighted sample of k rows of a stream of [n, D] batches.

    Args:
        k: sample size.
        seed: seeds the keys (numpy Generator); same seed and same stream -> same sample.
    """

    def __init__(self, k: int, *, seed: int = 0) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self._rng = np.random.default_rng(seed)
        self._keys = np.empty(0, dtype=np.float64)
        self._rows: np.ndarray | None = None
        self.num_seen = 0

    def add(self, rows: np.ndarray, weight: float | np.ndarray = 1.0) -> None:
        """Offer ``rows`` [n, D]; ``weight`` (> 0) is one per-row weight or an [n] array."""
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 2:
            raise ValueError(f"rows must be [n, D], got shape {rows.shape}")
        n = rows.shape[0]
        if n == 0:
            return
        weights = np.broadcast_to(np.asarray(weight, dtype=np.float64), (n,))
        if not np.isfinite(weights).all() or (weights <= 0).any():
            raise ValueError("row weights must be finite and > 0")
        if self._rows is not None and rows.shape[1] != self._rows.shape[1]:
            raise ValueError(f"feature dim changed: {self._rows.shape[1]} -> {rows.shape[1]}")
        keys = np.log(self._rng.random(n)) / weights  # log u / w: larger is better
        self.num_seen += n
        all_keys = np.concatenate([self._keys, keys])
        all_rows = rows if self._rows is None else np.concatenate([self._rows, rows])
        if all_keys.size > self.k:
            keep = np.argpartition(-all_keys, self.k - 1)[: self.k]
            keep.sort()  # stable order: earlier-arrived rows first
            all_keys, all_rows = all_keys[keep], all_rows[keep]
        self._keys, self._rows = all_keys, all_rows

    def sample(self) -> np.ndarray:
        """The current sample [min(k, seen), D] float32 (a copy)."""
        if self._rows is None:
            raise ValueError("no rows were added; nothing to sample")
        return self._rows.copy()

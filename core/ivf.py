"""An inverted-file (IVF) nearest-neighbour index over a memory bank, for fast inspection.

Why it exists: scoring one 224 px image against a bank of 100,000 rows of D = 1,024 is
784 x 100,000 x 1,024 multiply-adds (160 GFLOP), about ten times the WRN-50 backbone's work.
On a 2-core CPU the exact search took 1.05 s per image against about 0.1-0.3 s for the backbone
(benchmarks/inspect_latency.py). An IVF index splits the bank into ``C`` k-means cells and
compares each patch only with the rows of the ``nprobe`` cells whose centroids are nearest to
it (:func:`default_nprobe`: 8, or 4 from 50k rows; at 100k rows, C = 512 and nprobe = 4 read
0.8 % of the bank). The scan goes cell by cell, each cell's rows against all the patches that
probe it in one GEMM, so a row is read once per image, not once per patch.

What it costs in accuracy: a row outside the probed cells is never seen, so a patch distance
can only come out *too large*, never too small (the found row is a real bank row). On random-
weight WRN-50 features of generated images (benchmarks/inspect_latency.py records it per run)
image scores (the largest patch distance) differed from the exact ones by less than 1e-5
(relative), 99.9 % of patch distances by less than 2.5 %, and a rare single patch by up to
half (its nearest rows were all in unprobed cells; default_nprobe gives the figures).
Thresholds must come from the same search as the decisions; core.sitemodel stores which
search (and nprobe) a model was calibrated with and ``core.inference`` always uses it.

Layout: the bank is stored sorted by cell, so cell ``c`` is rows ``offsets[c]:offsets[c+1]``
and a saved model stores no row twice; ``centroids`` [C, D] and ``offsets`` [C + 1] are what it
adds (core.sitemodel keeps them beside the bank, no pickle). In memory the index also keeps a
copy of the rows centred on their mean. Building is seeded k-means (Lloyd) on at most
``TRAIN_ROWS_PER_CELL x C`` sampled rows, then one assignment of every row: 5-7 s for
100,000 x 1,024 on the shared 2-core machine.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["IVFIndex", "default_cells", "default_nprobe"]

#: k-means is trained on at most this many sampled rows per cell (faiss uses 256).
TRAIN_ROWS_PER_CELL = 64
#: Lloyd iterations of the k-means.
KMEANS_ITERATIONS = 8
#: Query / bank rows per distance tile while building (memory: tile x C floats).
_BLOCK = 8192


def default_cells(rows: int) -> int:
    """Cells for a bank of ``rows``: about 1.6 sqrt(rows), a power of two, 16 .. 4,096.

    Fewer, larger cells mean fewer (slow, per-cell) steps in :meth:`IVFIndex.search`; more
    cells mean fewer rows read per probe. 512 for 100k rows and 256 for 16k measured fastest
    at nprobe 8 on 2 cores.
    """
    target = 1.6 * math.sqrt(max(rows, 1))
    return int(min(4096, max(16, 2 ** round(math.log2(target)))))


#: From this many bank rows the default search probes 4 cells instead of 8 (default_nprobe).
LARGE_BANK_ROWS = 50_000


def default_nprobe(rows: int) -> int:
    """Cells searched per patch by default: 8, and 4 from LARGE_BANK_ROWS rows.

    Measured at 1 torch thread on 784 patches of random-weight WRN-50 features of generated
    images (one 224 px image) against coresets of the same features:

    * 16k rows, 256 cells: 8 cells 30 ms, image scores within 1e-6 of exact, largest patch
      error 1 %; 4 cells 15 ms but one image score 1 % too high;
    * 100k rows, 512 cells: 8 cells 71 ms (largest patch error 6 %), 4 cells 54 ms (image
      scores within 1e-6, 99.9 % of patch distances within 2.4 %, the largest 52 % too high),
      against about 1,050 ms exact and about 250 ms for the backbone. The scan's cost hardly
      falls below ~35 ms whatever the cells (an image's patches visit a few hundred of them),
      so 4 cells is what keeps the search near a fifth of the image's time at 100k rows.
    """
    return 4 if rows >= LARGE_BANK_ROWS else 8


def _sq_distances(queries: torch.Tensor, rows: torch.Tensor, rows_sq: torch.Tensor) -> torch.Tensor:
    """[q, D], [n, D], [n] -> [q, n] squared Euclidean distances less |q|^2 (argmin-safe)."""
    return torch.addmm(rows_sq[None, :], queries, rows.T, alpha=-2.0)


@dataclass
class IVFIndex:
    """Bank rows grouped by k-means cell.

    Attributes:
        rows: [N, D] float32 bank rows sorted by cell (the bank itself, reordered).
        centroids: [C, D] float32 cell centres (no empty cell).
        offsets: [C + 1] int64; cell c holds rows offsets[c]:offsets[c + 1].
        order: [N] int64, the bank index of each sorted row (rows == bank[order]).
    """

    rows: np.ndarray
    centroids: np.ndarray
    offsets: np.ndarray
    order: np.ndarray

    def __post_init__(self) -> None:
        n, d = self.rows.shape
        c = self.centroids.shape[0]
        if self.centroids.shape != (c, d) or c < 1:
            raise ValueError(f"centroids must be [C>=1, {d}], got {self.centroids.shape}")
        if self.offsets.shape != (c + 1,) or self.offsets[0] != 0 or self.offsets[-1] != n:
            raise ValueError(f"offsets must be [C + 1] from 0 to {n}, got {self.offsets[:3]}...")
        if np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must be non-decreasing")
        if self.order.shape != (n,):
            raise ValueError(f"order must be [{n}], got {self.order.shape}")
        # The search's tensors: centred on the bank mean (float64 accumulation) for the same
        # reason as core.knn (|q|^2 - 2 q.b + |b|^2 cancels catastrophically far from 0).
        origin = self.rows.mean(axis=0, dtype=np.float64).astype(np.float32)
        self._origin = torch.from_numpy(origin)
        self._rows = torch.from_numpy(np.ascontiguousarray(self.rows, dtype=np.float32) - origin)
        self._rows_sq = (self._rows * self._rows).sum(1)
        self._cent = torch.from_numpy(np.ascontiguousarray(self.centroids, np.float32) - origin)
        self._cent_sq = (self._cent * self._cent).sum(1)
        self._offsets = self.offsets.astype(np.int64).tolist()

    @property
    def cells(self) -> int:
        return int(self.centroids.shape[0])

    @classmethod
    def build(cls, bank: np.ndarray, cells: int | None = None, *, seed: int = 0) -> IVFIndex:
        """Seeded k-means of ``bank`` [N, D] into ``cells`` (default :func:`default_cells`)."""
        array = np.ascontiguousarray(bank, dtype=np.float32)
        if array.ndim != 2 or array.shape[0] == 0:
            raise ValueError(f"bank must be a non-empty [N, D] array, got {array.shape}")
        n = array.shape[0]
        c = min(n, cells if cells is not None else default_cells(n))
        if c < 1:
            raise ValueError(f"cells must be >= 1, got {cells}")
        generator = torch.Generator().manual_seed(seed)
        origin = array.mean(axis=0, dtype=np.float64).astype(np.float32)
        x = torch.from_numpy(array - origin)
        sample = x
        if n > TRAIN_ROWS_PER_CELL * c:
            sample = x[torch.randperm(n, generator=generator)[: TRAIN_ROWS_PER_CELL * c]]
        centroids = sample[torch.randperm(sample.shape[0], generator=generator)[:c]].clone()
        with torch.inference_mode():
            for _ in range(KMEANS_ITERATIONS):
                assign = _assign(sample, centroids)
                sums = torch.zeros_like(centroids).index_add_(0, assign, sample)
                counts = torch.bincount(assign, minlength=c)
                filled = counts > 0  # an empty cell keeps its centre (dropped below if still empty)
                centroids[filled] = sums[filled] / counts[filled, None].to(sums.dtype)
            assign = _assign(x, centroids)
        counts = torch.bincount(assign, minlength=c)
        keep = counts > 0
        remap = torch.cumsum(keep.long(), 0) - 1
        assign = remap[assign]
        centroids = centroids[keep]
        order = torch.argsort(assign, stable=True).numpy()
        offsets = np.concatenate([[0], np.cumsum(counts[keep].numpy())]).astype(np.int64)
        logger.info("IVF index: %d rows in %d cells (largest %d rows)", n, centroids.shape[0],
                    int(counts.max()))
        return cls(rows=array[order], centroids=(centroids.numpy() + origin).astype(np.float32),
                   offsets=offsets, order=order.astype(np.int64))

    @torch.inference_mode()
    def search(self, queries: torch.Tensor | np.ndarray, nprobe: int) -> np.ndarray:
        """Distance of each query [Q, D] to its nearest row in its ``nprobe`` nearest cells.

        Returns [Q] float32 Euclidean distances, each >= the exact nearest-row distance (equal
        with nprobe >= cells). Work: a [Q, C] centroid GEMM, then per probed cell one small
        GEMM of the queries that probe it against its rows.
        """
        q = torch.as_tensor(queries, dtype=torch.float32).reshape(-1, self._rows.shape[1])
        q = q - self._origin
        nprobe = max(1, min(nprobe, self.cells))
        probe = _sq_distances(q, self._cent, self._cent_sq).topk(
            nprobe, dim=1, largest=False, sorted=False
        ).indices.reshape(-1)
        # (query, cell) pairs sorted by cell: each cell's queries are one contiguous run.
        cell_of_pair, order = torch.sort(probe, stable=True)
        query_of_pair = torch.div(order, nprobe, rounding_mode="floor")
        pair_queries = q.index_select(0, query_of_pair)
        counts = torch.bincount(cell_of_pair, minlength=self.cells).tolist()
        pair_best = self._scan(pair_queries, counts)
        best = torch.full((q.shape[0],), float("inf"))
        best.scatter_reduce_(0, query_of_pair, pair_best, reduce="amin")
        return best.clamp_min_(0.0).sqrt_().numpy()

    def _scan(self, pair_queries: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Squared distance of each (query, cell) pair's query to the cell's nearest row."""
        pair_best = torch.empty(pair_queries.shape[0])
        start = 0
        for cell, count in enumerate(counts):
            if count == 0:
                continue
            lo, hi = self._offsets[cell], self._offsets[cell + 1]
            block = pair_queries[start : start + count]
            pair_best[start : start + count] = _sq_distances(
                block, self._rows[lo:hi], self._rows_sq[lo:hi]
            ).amin(1)
            start += count
        return pair_best + (pair_queries * pair_queries).sum(1)


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of each row of ``x``, in tiles of _BLOCK rows."""
    cent_sq = (centroids * centroids).sum(1)
    return torch.cat([
        _sq_distances(x[lo : lo + _BLOCK], centroids, cent_sq).argmin(1)
        for lo in range(0, x.shape[0], _BLOCK)
    ])

"""Nearest-neighbour search over a memory bank.

Distances are **Euclidean (not squared)** everywhere in this module, although faiss's IndexFlatL2
returns squared L2 (which the original PatchCore then reports as its scores): we take the square
root so that scores, radii and certificates share one unit.

Backends:
* ``faiss``: exact ``IndexFlatL2``; on a GPU index when faiss-gpu and CUDA are both present.
* ``torch``: exact blocked search (CPU or CUDA) for machines without faiss-gpu; memory is one
  [query_block, bank_block] distance tile, never [Q, N].
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["NearestNeighbourIndex", "faiss_available"]

Backend = Literal["auto", "faiss", "torch"]

#: Bank rows centred and handed to faiss at a time (16 MiB at D = 1,024).
_ADD_BLOCK = 4096


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_gpu_available() -> bool:
    if not torch.cuda.is_available() or not faiss_available():
        return False
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class NearestNeighbourIndex:
    """Exact k-NN over a fixed bank [N, D].

    Args:
        bank: [N, D] float features.
        backend: "faiss", "torch", or "auto". "auto" takes faiss on CPU; on CUDA it takes
            faiss-gpu when installed and torch otherwise (the lent GPUs cannot install faiss-gpu).
        device: "cpu" or "cuda[:i]" (torch backend; faiss GPU when ``device`` is CUDA).
        block: rows per query/bank tile of the torch backend (memory ~ block^2 floats).
    """

    def __init__(
        self,
        bank: np.ndarray | torch.Tensor,
        *,
        backend: Backend = "auto",
        device: str | torch.device = "cpu",
        block: int = 4096,
    ) -> None:
        array = (
            bank.detach().cpu().numpy() if isinstance(bank, torch.Tensor) else np.asarray(bank)
        )
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim != 2 or array.shape[0] == 0:
            raise ValueError(f"bank must be a non-empty [N, D] array, got shape {array.shape}")
        self.device = torch.device(device)
        if backend == "auto":
            if self.device.type == "cuda":
                backend = "faiss" if _faiss_gpu_available() else "torch"
            else:
                backend = "faiss" if faiss_available() else "torch"
        if backend == "faiss" and not faiss_available():
            raise ValueError("backend='faiss' but faiss is not installed (pip install faiss-cpu)")
        if backend not in ("faiss", "torch"):
            raise ValueError(f"unknown backend {backend!r}; use 'auto', 'faiss' or 'torch'")
        self.backend: Literal["faiss", "torch"] = backend
        self.block = block
        self.size, self.dim = array.shape
        # Both backends compute |q|^2 - 2 q.b + |b|^2, which cancels catastrophically for rows
        # far from the origin compared with their distances (float32 keeps no correct digit of
        # d^2 ~ 1 at an offset of 1000). Distances do not change under translation: bank and
        # queries are shifted by the bank's mean (accumulated in float64).
        self._origin = array.mean(axis=0, dtype=np.float64).astype(np.float32)
        if backend == "faiss":
            import faiss

            index: Any = faiss.IndexFlatL2(self.dim)
            if self.device.type == "cuda" and _faiss_gpu_available():
                self._gpu_resources = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._gpu_resources, self.device.index or 0, index)
            # faiss keeps its own copy of the rows: centre them block by block, so no centred
            # [N, D] copy exists beside the caller's bank and faiss's (306 MiB at N = 78,400,
            # D = 1,024: the peak of a 1,000-image fit, benchmarks/fit_memory.py).
            for lo in range(0, self.size, _ADD_BLOCK):
                index.add(array[lo : lo + _ADD_BLOCK] - self._origin)
            self._index = index
        else:
            self._bank = torch.from_numpy(array - self._origin).to(self.device)
            self._bank_sq = (self._bank * self._bank).sum(1)

    def search(
        self, queries: np.ndarray | torch.Tensor, k: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest ``k`` bank rows of each query.

        Args:
            queries: [Q, D] float features.
            k: neighbours per query, 1 <= k <= N.

        Returns:
            (distances [Q, k] float32 Euclidean ascending, indices [Q, k] int64).
        """
        q = (
            queries.detach().cpu().numpy()
            if isinstance(queries, torch.Tensor)
            else np.asarray(queries)
        )
        q = np.ascontiguousarray(q, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got shape {q.shape}")
        if not 1 <= k <= self.size:
            raise ValueError(f"k must be in [1, {self.size}], got {k}")
        q = q - self._origin  # the bank's frame (see __init__); a new array, inputs untouched
        if self.backend == "faiss":
            d2, idx = self._index.search(q, k)
            return np.sqrt(np.maximum(d2, 0.0)).astype(np.float32), idx.astype(np.int64)
        return self._search_torch(torch.from_numpy(q).to(self.device), k)

    @torch.no_grad()
    def _search_torch(self, q: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        out_d = torch.empty(q.shape[0], k)
        out_i = torch.empty(q.shape[0], k, dtype=torch.long)
        for lo in range(0, q.shape[0], self.block):
            qb = q[lo : lo + self.block]
            q_sq = (qb * qb).sum(1, keepdim=True)
            best_d = torch.full((qb.shape[0], k), float("inf"), device=self.device)
            best_i = torch.zeros((qb.shape[0], k), dtype=torch.long, device=self.device)
            # Merge per-bank-block top-k: memory stays [block, block] however large N is.
            for blo in range(0, self.size, self.block):
                bank = self._bank[blo : blo + self.block]
                d2 = q_sq - 2.0 * qb @ bank.T + self._bank_sq[blo : blo + self.block][None, :]
                kk = min(k, bank.shape[0])
                d, i = torch.topk(d2, kk, dim=1, largest=False)
                cand_d = torch.cat([best_d, d], dim=1)
                cand_i = torch.cat([best_i, i + blo], dim=1)
                best_d, order = torch.topk(cand_d, k, dim=1, largest=False)
                best_i = torch.gather(cand_i, 1, order)
            out_d[lo : lo + self.block] = best_d.clamp_min(0.0).sqrt().cpu()
            out_i[lo : lo + self.block] = best_i.cpu()
        return out_d.numpy(), out_i.numpy()

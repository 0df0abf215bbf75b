from __future__ import annotations

import numpy as np
import pytest
import torch

from core.knn import NearestNeighbourIndex


def brute(queries: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.linalg.norm(
        queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64), axis=2
    )
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, axis=1), idx


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("k", [1, 4])
def test_exact_euclidean_neighbours(backend: str, k: int) -> None:
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((700, 32)).astype(np.float32)
    queries = rng.standard_normal((300, 32)).astype(np.float32)
    index = NearestNeighbourIndex(bank, backend=backend, block=128)  # several tiles each way
    dist, idx = index.search(queries, k)
    ref_d, ref_i = brute(queries, bank, k)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-4)  # Euclidean, not squared
    np.testing.assert_array_equal(idx, ref_i)


def test_query_on_bank_row_gives_zero() -> None:
    bank = np.arange(12, dtype=np.float32).reshape(4, 3)
    dist, idx = NearestNeighbourIndex(bank, backend="torch").search(bank[[2]] + 0.0, 1)
    assert idx[0, 0] == 2 and dist[0, 0] == pytest.approx(0.0, abs=1e-3)
    dist, _ = NearestNeighbourIndex(bank, backend="faiss").search(
        np.array([[0, 0, 3.0]], np.float32), 1
    )
    assert dist[0, 0] == pytest.approx(np.sqrt(1 + 1 + 4 - 4 + 0), rel=1e-5)  # |(0,0,3)-(0,1,2)|


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        NearestNeighbourIndex(np.zeros((0, 3), np.float32))
    index = NearestNeighbourIndex(np.zeros((5, 3), np.float32), backend="torch")
    with pytest.raises(ValueError, match=r"\[Q, 3\]"):
        index.search(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="k must be"):
        index.search(np.zeros((2, 3), np.float32), 6)
    with pytest.raises(ValueError, match="unknown backend"):
        NearestNeighbourIndex(np.zeros((5, 3), np.float32), backend="annoy")  # type: ignore[arg-type]


def test_gpu_torch_backend_matches_cpu(cuda_device: torch.device) -> None:
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((5000, 64)).astype(np.float32)
    queries = rng.standard_normal((2000, 64)).astype(np.float32)
    cpu_d, cpu_i = NearestNeighbourIndex(bank, backend="faiss").search(queries, 3)
    gpu_d, gpu_i = NearestNeighbourIndex(bank, backend="torch", device=cuda_device).search(
        queries, 3
    )
    np.testing.assert_allclose(gpu_d, cpu_d, rtol=1e-3, atol=1e-3)
    assert np.mean(gpu_i == cpu_i) > 0.999


def test_faiss_bank_added_in_centred_blocks_is_the_whole_bank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("faiss")
    import core.knn

    monkeypatch.setattr(core.knn, "_ADD_BLOCK", 7)  # 100 rows: 15 blocks, the last one short
    rng = np.random.default_rng(5)
    bank = (rng.standard_normal((100, 16)) + 300.0).astype(np.float32)
    queries = (rng.standard_normal((40, 16)) + 300.0).astype(np.float32)
    index = NearestNeighbourIndex(bank, backend="faiss")
    assert index._index.ntotal == 100
    d = np.linalg.norm(queries[:, None, :].astype(np.float64) - bank[None], axis=2)
    dist, idx = index.search(queries, 3)
    np.testing.assert_array_equal(idx, np.argsort(d, axis=1)[:, :3])
    np.testing.assert_allclose(dist, np.sort(d, axis=1)[:, :3], rtol=1e-4)

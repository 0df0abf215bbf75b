"""Selection, radii and k-NN stay exact for rows far from the origin (an offset of 1000).

Squared distances computed as |x|^2 - 2 x.c + |c|^2 in float32 lose every digit there; the
code works in a centred frame. References here are float64 with direct differences.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.coreset import (
    IncrementalCoreset,
    _farthest_first_torch,
    coverage_radius,
    farthest_first,
    greedy_coreset,
)
from core.knn import NearestNeighbourIndex

OFFSET = 1000.0


def _data(seed: int, n: int = 400, dim: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((8, dim)) * 4
    rows = centers[rng.integers(0, 8, n)] + rng.standard_normal((n, dim))
    return (rows + OFFSET).astype(np.float32)


def _check_farthest_first(points: np.ndarray, picks: np.ndarray, start: int) -> None:
    """Each pick is a farthest row from the ones before it (float64, ties within 1e-5)."""
    exact = points.astype(np.float64)
    assert picks[0] == start and len(set(picks.tolist())) == len(picks)
    dist = np.linalg.norm(exact - exact[start], axis=1)
    for t, pick in enumerate(picks[1:], start=1):
        assert dist[pick] >= dist.max() * (1 - 1e-5), f"pick {t}: {dist[pick]} < {dist.max()}"
        dist = np.minimum(dist, np.linalg.norm(exact - exact[pick], axis=1))


def _true_radius(points: np.ndarray, bank: np.ndarray) -> float:
    p, b = points.astype(np.float64), bank.astype(np.float64)
    return float(np.sqrt(((p[:, None, :] - b[None]) ** 2).sum(-1).min(axis=1)).max())


@pytest.mark.parametrize("seed", range(3))
def test_farthest_first_is_exact_far_from_the_origin(seed: int) -> None:
    points = _data(seed)
    picks, assignment = farthest_first(points, 120, start=seed)
    _check_farthest_first(points, picks, seed)
    torch_picks, _ = _farthest_first_torch(torch.from_numpy(points), 120, seed)
    _check_farthest_first(points, torch_picks, seed)
    # the assignment names each row's nearest pick
    d = np.linalg.norm(
        points.astype(np.float64)[:, None] - points.astype(np.float64)[picks][None], axis=2
    )
    np.testing.assert_allclose(d[np.arange(len(points)), assignment], d.min(axis=1), atol=1e-4)


@pytest.mark.parametrize("projection_dim", [None, 6])
def test_radii_and_nearest_neighbours_are_exact_far_from_the_origin(
    projection_dim: int | None,
) -> None:
    points = _data(7, n=1500, dim=24)
    result = greedy_coreset(points, 100, projection_dim=projection_dim, seed=1)
    bank = points[result.indices]
    true = _true_radius(points, bank)
    assert result.radius == pytest.approx(true, rel=1e-5)
    assert coverage_radius(points, bank) == pytest.approx(true, rel=1e-5)
    for backend in ("torch", "faiss"):
        try:
            index = NearestNeighbourIndex(bank, backend=backend)  # type: ignore[arg-type]
        except ValueError:  # faiss not installed
            continue
        assert float(index.search(points, 1)[0].max()) == pytest.approx(true, rel=1e-5)
    # the streaming selector's certified bound never falls below the truth
    selector = IncrementalCoreset(100, capacity=400, projection_dim=projection_dim, seed=2)
    for lo in range(0, 1500, 150):
        selector.add(points[lo : lo + 150])
    selection = selector.select()
    assert selection.radius_bound >= _true_radius(points, selection.features) * (1 - 1e-5)


def test_exact_radius_centres_a_large_bank_block_by_block() -> None:
    """A bank larger than one centring block (4,096 rows) far from the origin: the radius still
    equals the float64 truth (the blocks' minima are combined, not the last block's)."""
    points = _data(7, n=9000, dim=6)
    result = greedy_coreset(points, 5000, projection_dim=None, seed=0)
    bank = points[result.indices].astype(np.float64)
    truth = 0.0
    for lo in range(0, points.shape[0], 500):
        block = points[lo : lo + 500].astype(np.float64)
        d2 = ((block[:, None, :] - bank[None]) ** 2).sum(-1).min(axis=1)
        truth = max(truth, float(np.sqrt(d2.max())))
    assert result.radius == pytest.approx(truth, rel=1e-4)

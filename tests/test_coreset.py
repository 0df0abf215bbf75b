from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from core.coreset import (
    IncrementalCoreset,
    _farthest_first_torch,
    coverage_radius,
    farthest_first,
    fit_projection,
    greedy_coreset,
    projection_matrix,
)


def naive_farthest_first(points: np.ndarray, k: int, start: int) -> np.ndarray:
    """Textbook Gonzalez in float64 with direct norms: the reference order."""
    chosen = [start]
    dist = np.linalg.norm(points - points[start], axis=1)
    for _ in range(k - 1):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(points - points[nxt], axis=1))
    return np.array(chosen)


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int = 12) -> np.ndarray:
    centers = rng.standard_normal((clusters, dim)) * 6
    return (centers[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim))).astype(
        np.float32
    )


def assert_is_farthest_first(
    points: np.ndarray, got: np.ndarray, assignment: np.ndarray, radii: np.ndarray | None = None
) -> None:
    """``got`` (picks) and ``assignment`` are farthest-first's on ``points``: without radii the
    exact float64 reference order; with radii each pick has the highest priority
    dist-to-chosen + radius given the picks before it, up to float32 rounding (relative 1e-5:
    weighted priorities have near-ties, relative gaps of 1e-6 here, that float32 distances
    cannot order). Each row is assigned to its nearest pick."""
    assert np.unique(got).size == got.size
    if radii is None:
        expected = naive_farthest_first(points.astype(np.float64), got.size, int(got[0]))
        np.testing.assert_array_equal(got, expected)
    else:
        dist = np.linalg.norm(points - points[got[0]], axis=1).astype(np.float64)
        for step, pick in enumerate(got[1:], start=1):
            priority = dist + radii
            priority[got[:step]] = -np.inf
            assert priority[pick] >= priority.max() * (1 - 1e-5), f"pick {step} is not farthest"
            dist = np.minimum(dist, np.linalg.norm(points - points[pick], axis=1))
    d = np.linalg.norm(points[:, None, :] - points[got][None], axis=2)
    np.testing.assert_allclose(d[np.arange(points.shape[0]), assignment], d.min(axis=1),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_order_matches_naive_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, dim = int(rng.integers(60, 500)), int(rng.integers(2, 24))
    points = clustered(rng, n, dim) if seed % 2 else rng.standard_normal((n, dim)).astype(
        np.float32
    )
    k = int(rng.integers(2, n))
    start = int(rng.integers(n))
    expected = naive_farthest_first(points.astype(np.float64), k, start)
    got, assignment = farthest_first(points, k, start=start)
    np.testing.assert_array_equal(got, expected)
    # assignment: each row's nearest chosen row
    d = np.linalg.norm(points[:, None, :] - points[got][None], axis=2)
    np.testing.assert_allclose(d[np.arange(n), assignment], d.min(axis=1), rtol=1e-4, atol=1e-4)


def test_torch_path_gives_same_order() -> None:
    rng = np.random.default_rng(7)
    points = clustered(rng, 400, 16)
    got, _ = _farthest_first_torch(torch.from_numpy(points), 90, 5)
    np.testing.assert_array_equal(got, naive_farthest_first(points.astype(np.float64), 90, 5))


@pytest.mark.parametrize("weighted", [False, True])
def test_torch_path_is_exact_in_batches(weighted: bool) -> None:
    """The torch (GPU) path proves batches of picks among 512 candidates and applies them with
    one GEMM: over many batches, with a finite candidate bound, it must still make plain
    farthest-first's picks (run here on a CPU tensor)."""
    rng = np.random.default_rng(9)
    n, k, start = 3000, 700, 13
    points = clustered(rng, n, 12, clusters=40)
    radii = (rng.random(n) * 20).astype(np.float32) if weighted else None
    got, assignment = _farthest_first_torch(torch.from_numpy(points), k, start, radii)
    assert got[0] == start
    assert_is_farthest_first(points, got, assignment, radii)


def test_start_point_is_in_coreset_and_indices_unique_with_duplicates() -> None:
    points = np.repeat(np.eye(3, dtype=np.float32), 5, axis=0)  # 3 distinct rows, 5 copies each
    result = greedy_coreset(points, 7, projection_dim=None, seed=3)
    start = int(torch.randint(15, (1,), generator=torch.Generator().manual_seed(3)))
    assert result.indices[0] == start
    assert len(set(result.indices.tolist())) == 7
    # the three distinct rows are all covered after 3 picks
    assert {tuple(points[i]) for i in result.indices[:3]} == {tuple(r) for r in np.eye(3)}
    assert result.radius == 0.0


def test_seeded_and_reproducible() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 256)).astype(np.float32)
    a = greedy_coreset(x, 100, seed=11)
    b = greedy_coreset(x, 100, seed=11)
    c = greedy_coreset(x, 100, seed=12)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)
    np.testing.assert_array_equal(projection_matrix(256, 32, 5), projection_matrix(256, 32, 5))


def test_radius_is_exact_in_original_space() -> None:
    rng = np.random.default_rng(1)
    x = clustered(rng, 4000, 200, clusters=40)
    result = greedy_coreset(x, 150, projection_dim=32, seed=0)
    exact = coverage_radius(x, x[result.indices])
    assert result.radius == pytest.approx(exact, rel=1e-5)
    # brute force in float64 as an independent check of coverage_radius itself
    bank = x[result.indices].astype(np.float64)
    brute = max(np.linalg.norm(bank - row, axis=1).min() for row in x[:500].astype(np.float64))
    assert coverage_radius(x[:500], x[result.indices]) == pytest.approx(brute, rel=1e-5)


@pytest.mark.parametrize("kind", ["pca", "gaussian", "pca_jl"])
def test_projection_keeps_quality(kind: str) -> None:
    rng = np.random.default_rng(2)
    x = clustered(rng, 5000, 512, clusters=60)
    projected = greedy_coreset(x, 200, projection_dim=128, projection=kind, seed=0).radius  # type: ignore[arg-type]
    full = greedy_coreset(x, 200, projection_dim=None, seed=0).radius
    assert projected is not None and full is not None
    assert projected <= 1.15 * full


def test_pca_projection_is_seeded_and_preserves_scale() -> None:
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3000, 16)) @ rng.standard_normal((16, 256))).astype(np.float32)
    a = fit_projection(x, 32, seed=5)
    b = fit_projection(x, 32, seed=5)
    assert a is not None and b is not None
    np.testing.assert_array_equal(a.matrix, b.matrix)
    # rank-16 data: 32 principal directions keep every distance (up to float error)
    pairs = rng.integers(0, 3000, size=(200, 2))
    original = np.linalg.norm(x[pairs[:, 0]] - x[pairs[:, 1]], axis=1)
    p = a.apply(x)
    projected = np.linalg.norm(p[pairs[:, 0]] - p[pairs[:, 1]], axis=1)
    np.testing.assert_allclose(projected, original, rtol=1e-3, atol=1e-3)
    assert fit_projection(x, None, seed=0) is None
    with pytest.raises(ValueError, match="projection must be"):
        fit_projection(x, 8, seed=0, kind="sparse")  # type: ignore[arg-type]


def test_rejects_bad_input() -> None:
    x = np.zeros((10, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="k must be in"):
        greedy_coreset(x, 0)
    with pytest.raises(ValueError, match="k must be in"):
        greedy_coreset(x, 11)
    with pytest.raises(ValueError, match="2-D"):
        greedy_coreset(np.zeros(10, dtype=np.float32), 2)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        greedy_coreset(x, 2)


def test_incremental_equals_offline_when_everything_fits() -> None:
    rng = np.random.default_rng(3)
    x = clustered(rng, 2000, 64)
    offline = greedy_coreset(x, 100, seed=4)
    selector = IncrementalCoreset(100, capacity=5000, seed=4)
    for lo in range(0, 2000, 300):
        selector.add(x[lo : lo + 300])
    selection = selector.select()
    np.testing.assert_array_equal(selection.features, x[offline.indices])
    assert selection.radius_bound == pytest.approx(offline.radius, rel=1e-5)
    assert selector.num_reduces == 0 and selection.num_seen == 2000


@pytest.mark.parametrize("batch", [97, 600])
def test_incremental_bound_is_certified_and_close_to_offline(batch: int) -> None:
    rng = np.random.default_rng(5)
    x = clustered(rng, 6000, 96, clusters=80)
    selector = IncrementalCoreset(300, capacity=900, seed=0)
    for lo in range(0, len(x), batch):
        selector.add(x[lo : lo + batch])
    selection = selector.select()
    assert selector.num_reduces >= 5
    assert selector.num_buffered <= 900
    realised = coverage_radius(x, selection.features)
    assert realised <= selection.radius_bound * (1 + 1e-5)  # the bound holds for every row seen
    offline = greedy_coreset(x, 300, seed=0).radius
    assert realised <= 1.25 * offline
    # select() does not consume the buffer and is repeatable
    again = selector.select()
    np.testing.assert_array_equal(again.features, selection.features)


def test_incremental_rejects_dimension_change_and_empty_select() -> None:
    selector = IncrementalCoreset(5)
    with pytest.raises(ValueError, match="no features"):
        selector.select()
    selector.add(np.ones((3, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="feature dim changed"):
        selector.add(np.ones((3, 9), dtype=np.float32))
    with pytest.raises(ValueError, match="capacity must exceed"):
        IncrementalCoreset(10, capacity=10)
    small = selector.select()  # fewer rows than k: all of them, bound 0
    assert small.features.shape == (3, 8) and small.radius_bound == 0.0


def test_gpu_selection_matches_cpu(cuda_device: torch.device) -> None:
    rng = np.random.default_rng(9)
    x = clustered(rng, 3000, 256)
    cpu = greedy_coreset(x, 200, seed=1)
    gpu = greedy_coreset(x, 200, seed=1, device=cuda_device)
    agree = np.mean(cpu.indices == gpu.indices)
    assert agree > 0.95  # float rounding may reorder near-ties late in the sequence
    assert gpu.radius == pytest.approx(cpu.radius, rel=0.02)


@pytest.mark.parametrize("radius_scale", [2.0, 50.0])
def test_radius_weighted_order_matches_naive_reference(radius_scale: float) -> None:
    """farthest_first(radii=r) picks by dist-to-chosen + r among unchosen rows (radii far
    above the distances: a chosen row must not win again on its radius alone)."""
    rng = np.random.default_rng(11)
    points = clustered(rng, 300, 8)
    radii = rng.random(300).astype(np.float32) * np.float32(radius_scale)
    k, start = 150, 4  # more than one batch of picks (_MAX_BATCH = 64)
    chosen = [start]
    dist = np.linalg.norm(points - points[start], axis=1).astype(np.float64)
    for _ in range(k - 1):
        priority = dist + radii
        priority[chosen] = -np.inf
        nxt = int(priority.argmax())
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(points - points[nxt], axis=1))
    got, _ = farthest_first(points, k, start=start, radii=radii)
    np.testing.assert_array_equal(got, chosen)


def test_release_select_gives_the_same_bank_in_selection_order_free() -> None:
    rng = np.random.default_rng(8)
    x = clustered(rng, 3000, 32)
    kept = IncrementalCoreset(100, capacity=800, seed=2)
    released = IncrementalCoreset(100, capacity=800, seed=2)
    for lo in range(0, 3000, 250):
        kept.add(x[lo : lo + 250])
        released.add(x[lo : lo + 250])
    a = kept.select()
    b = released.select(release=True)
    assert b.features.shape == (100, 32) and b.radius_bound == a.radius_bound
    # same rows, compacted in buffer order rather than pick order
    assert {r.tobytes() for r in a.features} == {r.tobytes() for r in b.features}
    with pytest.raises(RuntimeError, match="release=True"):
        released.select()
    with pytest.raises(RuntimeError, match="release=True"):
        released.add(x[:5])


def test_released_selection_keeps_pick_order_after_reduces() -> None:
    """select(release=True) compacts the buffer in place; the rows must still come out in pick
    order, equal to the non-releasing select (the federated prefix merge reads them as a
    nested farthest-first family), also after streaming reduces reordered the buffer."""
    rng = np.random.default_rng(3)
    features = rng.normal(size=(3000, 24)).astype(np.float32)

    def fed() -> IncrementalCoreset:
        selector = IncrementalCoreset(200, capacity=900, projection_dim=None, seed=5)
        for lo in range(0, 3000, 250):
            selector.add(features[lo : lo + 250])
        return selector

    streamed = fed()
    reference = streamed.select()
    assert streamed.num_reduces >= 2
    released = fed().select(release=True)
    np.testing.assert_array_equal(released.features, reference.features)
    # Without reduces and projection the order is exactly greedy_coreset's pick order.
    offline = IncrementalCoreset(200, capacity=3000, projection_dim=None, seed=5)
    offline.add(features)
    picks = greedy_coreset(features, 200, projection_dim=None, seed=5).indices
    np.testing.assert_array_equal(offline.select(release=True).features, features[picks])


@pytest.mark.parametrize("seed", range(3))
def test_order_matches_naive_reference_far_from_origin(seed: int) -> None:
    # float32 |x|^2 - 2 x.c + |c|^2 cancels badly at an offset of 1000: farthest_first centres.
    rng = np.random.default_rng(100 + seed)
    points = clustered(rng, 400, 8) + np.float32(1000.0)
    expected = naive_farthest_first(points.astype(np.float64), 60, 3)
    got, _ = farthest_first(points, 60, start=3)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("n", "k", "dim"), [(3000, 900, 12), (5000, 400, 40)])
def test_batched_order_matches_naive_reference_on_large_inputs(n: int, k: int, dim: int) -> None:
    # Large enough that picks come in batches of up to 64 from 512 candidates, with the pair
    # pruning, both the GEMM and the pair path of a batch, and (dim > 16) the leading-coordinate
    # bound on center distances in use.
    rng = np.random.default_rng(n)
    points = clustered(rng, n, dim, clusters=40)
    expected = naive_farthest_first(points.astype(np.float64), k, 11)
    got, assignment = farthest_first(points, k, start=11)
    np.testing.assert_array_equal(got, expected)
    d = np.linalg.norm(points[:, None, :] - points[got][None], axis=2)
    np.testing.assert_allclose(d[np.arange(n), assignment], d.min(axis=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weighted", [False, True])
def test_order_stays_exact_when_rows_are_laid_out_by_cluster(
    monkeypatch: pytest.MonkeyPatch, weighted: bool
) -> None:
    """Large inputs are re-laid out by cluster during the selection (core.coreset
    _RELAYOUT_*); picks and assignments must still come back in input numbering, in plain
    farthest-first order. Forced here on a small input, re-laid out every few batches."""
    import core.coreset as coreset

    monkeypatch.setattr(coreset, "_RELAYOUT_MIN_ROWS", 0)
    monkeypatch.setattr(coreset, "_RELAYOUT_FIRST", 8)
    monkeypatch.setattr(coreset, "_RELAYOUT_GROWTH", 2)
    rng = np.random.default_rng(21)
    n, k, start = 3000, 700, 17
    points = clustered(rng, n, 20, clusters=40)
    radii = rng.random(n).astype(np.float32) if weighted else None
    got, assignment = farthest_first(points, k, start=start, radii=radii)
    assert got[0] == start
    assert_is_farthest_first(points, got, assignment, radii)


def test_guided_exact_radius_equals_brute_force() -> None:
    rng = np.random.default_rng(3)
    x = np.maximum(clustered(rng, 6000, 96, clusters=30), 0.0)
    result = greedy_coreset(x, 300, projection_dim=16, seed=1)
    assert result.radius == pytest.approx(coverage_radius(x, x[result.indices]), rel=1e-5)


def test_partition_in_place_keeps_every_row() -> None:
    from core.coreset import _partition_in_place

    rng = np.random.default_rng(4)
    buffer = rng.standard_normal((50, 3)).astype(np.float32)
    original = buffer.copy()
    keep = rng.choice(40, size=15, replace=False)
    perm = _partition_in_place(buffer, 40, keep)
    np.testing.assert_array_equal(buffer[:40], original[perm])
    assert set(perm[:15].tolist()) == set(keep.tolist())
    np.testing.assert_array_equal(buffer[40:], original[40:])


def test_selection_runs_single_threaded_and_restores_thread_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng = np.random.default_rng(9)
        greedy_coreset(clustered(rng, 800, 32), 40, projection_dim=8, seed=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("projection", ["pca", "gaussian"])
def test_guided_exact_radius_is_exact_when_guesses_miss(projection: str) -> None:
    # Unstructured rows far from the origin with a tiny projection: the projected guesses are
    # often wrong and a Gaussian projection is not centred, so the dense check must decide.
    rng = np.random.default_rng(12)
    x = rng.standard_normal((3000, 48)).astype(np.float32) + np.float32(50.0)
    result = greedy_coreset(x, 200, projection_dim=4, projection=projection, seed=3)  # type: ignore[arg-type]
    bank = x[result.indices].astype(np.float64)
    d2 = ((x.astype(np.float64)[:, None, :] - bank[None]) ** 2).sum(-1).min(axis=1)
    assert result.radius == pytest.approx(float(np.sqrt(d2.max())), rel=1e-5)


def test_pca_jl_is_pca_plus_a_projection_of_the_residual() -> None:
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((3000, 16)) @ rng.standard_normal((16, 256))).astype(np.float32)
    x += 0.1 * rng.standard_normal(x.shape).astype(np.float32)
    fitted = fit_projection(x, 32, seed=5, kind="pca_jl")
    assert fitted is not None and fitted.matrix.shape == (256, 32)
    basis, residual = fitted.matrix[:, :16].astype(np.float64), fitted.matrix[:, 16:]
    np.testing.assert_allclose(basis.T @ basis, np.eye(16), atol=1e-4)  # unscaled PCA half
    np.testing.assert_allclose(basis.T @ residual, 0.0, atol=1e-4)  # JL half sees the rest
    # expected squared distances are kept (the incremental selector adds the two scales)
    pairs = rng.integers(0, 3000, size=(2000, 2))
    p = fitted.apply(x)
    ratio = (np.sum((p[pairs[:, 0]] - p[pairs[:, 1]]) ** 2)
             / np.sum((x[pairs[:, 0]] - x[pairs[:, 1]]).astype(np.float64) ** 2))
    assert ratio == pytest.approx(1.0, rel=0.05)


def test_pca_jl_covers_rows_that_differ_outside_the_principal_directions() -> None:
    # A rank-8 cloud plus 40 rows pushed far along 40 different low-variance directions: PCA-16
    # keeps the cloud's 8 directions and only some of the outliers', so farthest-first never
    # sees the others; the JL half of pca_jl does, and picks them.
    rng = np.random.default_rng(3)
    cloud = rng.standard_normal((3000, 8)) @ rng.standard_normal((8, 64)) * 0.1
    cloud += 0.01 * rng.standard_normal(cloud.shape)
    directions = np.linalg.qr(rng.standard_normal((64, 64)))[0][:, 24:]  # [64, 40]
    cloud[:40] += 20.0 * directions.T
    x = cloud.astype(np.float32)
    pca = greedy_coreset(x, 100, projection_dim=16, projection="pca", seed=0).radius
    pca_jl = greedy_coreset(x, 100, projection_dim=16, projection="pca_jl", seed=0).radius
    full = greedy_coreset(x, 100, projection_dim=None, seed=0).radius
    assert pca is not None and pca_jl is not None and full is not None
    assert pca > 15.0  # an outlier left uncovered (measured: 19.8)
    assert pca_jl < 1.2 * full  # measured: 2.75 against 2.70 without a projection


def test_cluster_layout_replaces_a_projection_nothing_else_holds() -> None:
    """The fit's reduces hand farthest-first a projection made for it alone: laying its rows
    out by cluster must then replace that array, not copy it beside it (one [N, d] matrix
    less at the fit's memory peak). numpy reports its buffers to tracemalloc."""
    import tracemalloc

    from core.coreset import _farthest_first_made

    rng = np.random.default_rng(0)
    base = rng.standard_normal((40_000, 32)).astype(np.float32)  # >= _RELAYOUT_MIN_ROWS

    def made() -> np.ndarray:
        return base * np.float32(1.0)  # a fresh array each call

    def peak(run: Callable[[], object]) -> int:
        tracemalloc.start()
        try:
            run()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    held = peak(lambda: farthest_first(made(), 2_100, start=0))  # the caller keeps the array
    owned = peak(lambda: _farthest_first_made(made, 2_100, 0, None, None))
    assert held - owned >= 0.9 * base.nbytes

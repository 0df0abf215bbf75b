"""Greedy k-center (farthest-first) coreset selection, offline and incremental.

PatchCore keeps a *coreset* of the training patch features: a subset S such that every
training patch lies close to some member of S. Farthest-first traversal (Gonzalez) picks, at
each step, the point farthest from everything picked so far; it is a 2-approximation of the
optimal k-center radius.

Why this module looks the way it does:

* **Seeded, data-aware projection.** Distances are compared after projecting to
  ``projection_dim`` (default 128) dimensions, which makes each pick ~8x cheaper for D=1024.
  The default projection is PCA, fitted by a seeded randomized SVD on 2,048 sampled rows: CNN
  patch features are strongly correlated, so their top principal directions keep distances far
  better than a random Johnson-Lindenstrauss projection of the same size (on 20,000 PatchCore
  embeddings, the coverage radius was 9 % smaller with PCA-128 than with Gaussian-128, and 4 %
  smaller than anomalib's 244-dim sparse projection). That depends on the data: on the 20,000
  random-init WRN-50 embeddings of ``benchmarks/coreset_speed.py`` (30 images) PCA-128 gave a
  radius 0.231-0.243 against anomalib's 0.221-0.223. There PCA drops a residual with a heavy
  tail (a few rows differ from the rest mostly outside the leading directions), so the default
  ``projection="auto"`` checks the PCA sample's residual norms and, where their tail is heavy,
  keeps 64 principal directions plus a JL projection of the residual to 64 more ("pca_jl":
  radius 0.218-0.222 there at the same cost); where the residual is even noise it keeps plain
  PCA-128, whose selection is 2.5x cheaper on clustered rows (see ``fit_projection``).
  ``projection="gaussian"`` gives the classic JL projection. All are scaled to preserve the
  mean squared distance and come from a ``torch.Generator`` seeded by ``seed``, so the same
  input and seed give the same coreset (patchcore-inspection builds an unseeded ``nn.Linear``
  on every call).
* **The start point is part of the coreset**, as farthest-first defines it (anomalib long left it
  out; its 2.7 KCenterGreedy includes it).
* **Memory O(N), never N x N.** We keep one running min-distance per point.
* **Batched, exact picks.** Plain farthest-first streams the whole projected matrix once per
  pick, so it is memory-bandwidth bound. Here the next picks are proven among the 512 rows of
  highest priority (every other row's priority is bounded by the 513th and only decreases), up
  to 64 per batch, and then applied to the matrix together: one read per batch, not per pick.
* **Triangle-inequality pruning.** Each row remembers its nearest center c_a and squared
  distance m. A new pick p can move it only if |p - c_a|^2 < 4 m; cluster radii rule out whole
  clusters (their rows are never read), a bound from the leading 16 PCA coordinates rules out
  most centers before the exact center-to-pick GEMM (where it rules out too few, as on
  isotropic clusters, it is retried ever more rarely), and within a reached cluster only the
  (row, pick) pairs passing the test are evaluated, one matrix-vector product per pick.
* **Rows laid out by cluster.** On large projected inputs (>= 32,768 rows of <= 256 columns)
  the working copy of the rows is re-sorted by nearest center after 512, 2,048, 8,192, ...
  picks, so the rows a batch reads lie in contiguous runs instead of scattered over the matrix
  (the pair evaluation is bound by memory reads). On 156,800 x 128 -> 15,680 farthest-first
  took 4.5 s before, 3.6 s after. Exact ties (e.g. duplicate rows) may then break differently
  than by lowest input index. The selection order is exactly that of
  plain farthest-first (``tests/test_coreset.py`` checks it against a naive float64 reference,
  including batched sizes and data far from the origin, which is centred first).
* **Radii are reported in the original feature space**, not in the projection, because they feed
  the federated coverage certificate (a projection distorts distances by 1 +- eps). The exact
  radius visits rows by decreasing upper bound, tightens each bound with its distance to the 8
  bank rows nearest in the projection, and gives the full [rows, k] x D check to the rest in
  groups of 32, largest bound first: on 156,800 x 1024 -> 15,680, 123 rows get the full check
  (7,421 with one guess).

On CPU the loop runs in NumPy: on this kind of machine ``numpy.dot`` (OpenBLAS) computes the
[N x 128] @ [128] product about 6x faster than ``torch.mv``. On CUDA it runs in torch with the
same batches of picks and no pruning: one [N, b] GEMM per batch of up to 64 picks (its speed on
a GPU is not measured yet; see ``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from core.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = [
    "CoresetResult",
    "IncrementalCoreset",
    "IncrementalSelection",
    "Projection",
    "coverage_radius",
    "farthest_first",
    "fit_projection",
    "greedy_coreset",
    "projection_matrix",
]

# Slack on the pruning test |c - c_j|^2 < 4 R_j^2: squared distances come from the expansion
# |x|^2 - 2 x.c + |c|^2 in float32, whose rounding error is relative to |x|^2. Pruning is only
# skipped (never wrongly applied) when the slack is generous.
_PRUNE_REL_SLACK = 1e-3


@dataclass(frozen=True)
class CoresetResult:
    """The outcome of a coreset selection.

    Attributes:
        indices: [k] int64 positions of the selected rows in the input, in selection order
            (``indices[0]`` is the start point).
        radius: coverage radius in the original feature space (Euclidean): every input row lies
            within ``radius`` of some selected row. Exact for :func:`greedy_coreset`; a certified
            upper bound for :class:`IncrementalCoreset` (it has forgotten the dropped rows).
            None when the caller asked not to compute it.
    """

    indices: np.ndarray
    radius: float | None


def projection_matrix(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """A Gaussian JL projection [in_dim, out_dim] with N(0, 1/out_dim) entries.

    Scaled so that squared distances are preserved in expectation: projected and original radii are
    on the same scale (the incremental selector adds the two). Generated on the CPU from a seeded
    ``torch.Generator`` so the matrix is identical on every machine and device.
    """
    if in_dim < 1 or out_dim < 1:
        raise ValueError(f"projection dims must be >= 1, got in_dim={in_dim}, out_dim={out_dim}")
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(in_dim, out_dim, generator=generator, dtype=torch.float32)
    return matrix / math.sqrt(out_dim)


def _as_float32_numpy(features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    array = np.ascontiguousarray(features, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"features must be a 2-D [N, D] array, got shape {array.shape}")
    return array


ProjectionKind = Literal["auto", "pca", "gaussian", "pca_jl"]

#: Rows sampled to fit the PCA projection (more adds cost, not quality, on CNN features).
PCA_SAMPLE_ROWS = 2048


@dataclass(frozen=True)
class Projection:
    """x -> (x - mean) @ matrix: [N, D] -> [N, d]; fitted once, then fixed for a selection."""

    mean: np.ndarray  # [D]
    matrix: np.ndarray  # [D, d]
    kind: str = "pca"  # what fit_projection made: "pca", "pca_jl" or "gaussian" (never "auto")

    def apply(self, features: np.ndarray, *, block_rows: int = 512) -> np.ndarray:
        """[N, D] -> [N, d] float32, centring ``block_rows`` rows at a time into one reused
        buffer: at 512 x 1024 floats (2 MiB) it stays in cache, where a 16,384-row block
        (64 MiB) went to memory and back (0.88 s against 0.47 s for 156,800 x 1024 -> 128 on
        one core). Centring first, not (x @ M) - (mean @ M): the latter cancels badly for
        rows far from the origin."""
        n, d_in = features.shape
        out = np.empty((n, self.matrix.shape[1]), dtype=np.float32)
        centred = np.empty((min(block_rows, n), d_in), dtype=np.float32)
        for lo in range(0, n, block_rows):
            block = features[lo : lo + block_rows]
            buffer = centred[: block.shape[0]]
            np.subtract(block, self.mean, out=buffer)
            np.matmul(buffer, self.matrix, out=out[lo : lo + block_rows])
        return out


#: "auto" projects with "pca_jl" when the 99th percentile of the sampled rows' residual norms
#: (what PCA-d leaves out) exceeds this multiple of their median, else with "pca". Measured
#: p99 / median at d = 128, seeds 0-2: random-init WRN-50 embeddings 2.20-2.25, clustered ReLU
#: rows 1.44-1.52, i.i.d. Gaussian rows 1.04-1.05 (see fit_projection for why a heavy residual
#: tail matters). A threshold calibrated on these inputs, not a law: pass "pca" or "pca_jl" to
#: choose.
_RESIDUAL_TAIL = 1.85


def fit_projection(
    features: np.ndarray,
    dim: int | None,
    seed: int,
    kind: ProjectionKind = "auto",
) -> Projection | None:
    """Fit the projection used to compare distances (None: compare in the original space).

    Args:
        features: [N, D] rows (a seeded sample of at most PCA_SAMPLE_ROWS is used for PCA).
        dim: target dimension; None or >= D means no projection.
        seed: seeds the row sample and the randomized SVD (PCA) and the Gaussian matrix.
        kind: "auto" (default: "pca_jl" where the PCA residual has a heavy tail, else "pca"),
            "pca", "gaussian", or "pca_jl": the leading ``dim // 2`` principal directions
            unscaled, plus a Gaussian JL projection of what they leave out (the residual) to
            the other ``dim - dim // 2`` coordinates.

    Every kind is scaled so that the expected squared distance between rows is preserved:
    projected distances then live on the scale of original-space radii, which the incremental
    selector adds to them. Why "pca_jl": plain PCA drops the residual and stretches the kept
    directions to make up for it on average, so rows that differ mostly outside the kept
    directions look close, and farthest-first leaves them coarsely covered; the JL half keeps
    residual distances in expectation. On 20,000 random-init WRN-50 embeddings -> 2,000 (seeds
    0-2) PCA-128 gave radii 0.231-0.243, PCA-64 + JL-64 0.218-0.222 (anomalib: 0.221-0.223).
    Where the residual is plain noise of about equal size in every row (clustered ReLU rows of
    coreset_speed: 156,800 -> 15,680), the JL half only blurs the clusters: same radius, 2.5x
    the selection time. "auto" tells the two apart by the residual norms of the PCA sample.
    """
    d_in = features.shape[1]
    if kind not in ("auto", "pca", "gaussian", "pca_jl"):
        raise ValueError(
            f"projection must be 'auto', 'pca', 'gaussian' or 'pca_jl', got {kind!r}"
        )
    if dim is None or dim >= d_in:
        return None
    if kind == "gaussian":
        matrix = projection_matrix(d_in, dim, seed).numpy()
        return Projection(np.zeros(d_in, dtype=np.float32), matrix, "gaussian")
    mean, basis, scale, tail = _fit_pca(features, dim, seed)
    if kind == "auto":
        kind = "pca_jl" if tail > _RESIDUAL_TAIL and dim >= 2 else "pca"
        logger.debug("projection: residual p99/median %.2f -> %s", tail, kind)
    if kind == "pca" or dim < 2:
        return Projection(mean, (basis * scale).astype(np.float32), "pca")
    kept = basis[:, : dim // 2].astype(np.float64)  # orthonormal columns (or zero padding)
    gaussian = projection_matrix(d_in, dim - dim // 2, seed + 1).numpy().astype(np.float64)
    residual = gaussian - kept @ (kept.T @ gaussian)  # JL of the part PCA leaves out
    matrix = np.concatenate([kept, residual], axis=1).astype(np.float32)
    return Projection(mean, np.ascontiguousarray(matrix), "pca_jl")


def _fit_pca(features: np.ndarray, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, float,
                                                                   float]:
    """PCA of a seeded sample of at most PCA_SAMPLE_ROWS rows.

    Returns (mean [D] float32, orthonormal basis [D, dim] float32 (zero-padded if the sample
    has fewer rows than dim), scale that makes the basis preserve the expected squared
    distance, p99 / median of the sample rows' residual norms |(x - mean) - B B^T (x - mean)|).
    """
    n, d_in = features.shape
    generator = torch.Generator().manual_seed(seed)
    take = min(n, PCA_SAMPLE_ROWS)
    rows = torch.randperm(n, generator=generator)[:take].sort().values.numpy()
    sample = torch.from_numpy(features[rows])
    mean = sample.mean(dim=0)
    centred = sample - mean
    q = min(dim, take, d_in)
    # svd_lowrank draws its test matrix from the global RNG: fork it so we stay seeded.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, singular, basis = torch.svd_lowrank(centred, q=q, niter=2)
    captured = float((singular**2).sum())
    total = float((centred**2).sum())
    scale = math.sqrt(total / captured) if captured > 0 else 1.0
    centred64 = centred.double()
    kept = centred64 @ basis.double()
    residual2 = (centred64**2).sum(dim=1) - (kept**2).sum(dim=1)
    residual = residual2.clamp_min(0.0).sqrt()
    median = float(residual.median())
    tail = float(torch.quantile(residual, 0.99)) / median if median > 0 else 1.0
    matrix = basis.contiguous().numpy().astype(np.float32)
    if matrix.shape[1] < dim:  # fewer sampled rows than dims: pad with zero directions
        matrix = np.pad(matrix, ((0, 0), (0, dim - matrix.shape[1])))
    return mean.numpy().astype(np.float32), matrix, scale, tail


def _project(projection: Projection | None, features: np.ndarray) -> np.ndarray:
    return features if projection is None else projection.apply(features)


def _frame_origin(rows: np.ndarray) -> np.ndarray | None:
    """The mean of ``rows`` [N, d] (float32) when they sit far from the origin, else None.

    Every distance here is |x|^2 - 2 x.c + |c|^2 in float32, whose error grows with |x|^2: at an
    offset of 1000 on unit-scale data it keeps no correct digit of a squared distance of about
    1. Distances do not change under translation, so callers subtract this origin first. Only
    when the squared offset exceeds half the spread (sum of variances) is it worth the copy:
    projected data is centred already, and features near the origin lose nothing.
    """
    mean = rows.mean(axis=0, dtype=np.float64)
    offset2 = float(mean @ mean)
    mean_sq = float(np.einsum("ij,ij->i", rows, rows).mean(dtype=np.float64))
    return mean.astype(np.float32) if offset2 > 0.5 * (mean_sq - offset2) else None


def farthest_first(
    points: np.ndarray,
    k: int,
    *,
    start: int = 0,
    radii: np.ndarray | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Farthest-first traversal on ``points`` [N, d] (float32), CPU: exact, batched and pruned.

    Args:
        points: [N, d] rows to choose from (usually projections).
        k: how many to choose, 1 <= k <= N.
        start: index of the first pick (included in the result).
        radii: optional [N] non-negative "already represented" radius of each row. A row that
            stands in for other, forgotten rows within ``radii[i]`` of it is picked by priority
            ``dist(i, chosen) + radii[i]``: the incremental selector's weighted merge, which keeps
            the bound dist + radius over everything ever seen as small as farthest-first can.
        on_progress: called with the number of picks made, every ``_PROGRESS_EVERY`` picks.

    Returns:
        (indices [k] int64 in pick order, assignment [N] int64: for each row, the position in
        ``indices`` of its nearest chosen row in ``points``' space).

    How it stays exact while touching the matrix rarely (plain farthest-first streams all
    N x d values once per pick, which is memory-bandwidth bound):

    * **Batches of picks.** Take the ``_CANDIDATES`` rows of highest priority; every other row's
      priority is at most the next one, ``tau``, and priorities only ever decrease. Run
      farthest-first on the candidates alone (their distances to each new pick are cheap): as
      long as the best candidate's updated priority is > ``tau`` it is exactly the pick plain
      farthest-first would make (ties: lowest index, as ``argmax``). Then all the batch's picks
      are applied to the other rows at once, so the matrix is read once per batch, not per pick.
    * **Pruning (triangle inequality).** Row x, nearest to center c_a at distance m_x, can move to
      a new pick p only if |p - c_a| < 2 m_x. Each batch computes the [t, b] center-to-pick
      distances (one GEMM) and evaluates only the (row, pick) pairs that pass this test: late in
      a selection that is a few rows per pick. Where most pairs pass (unstructured data), one
      [rows, b] GEMM is used instead. Rows of clusters no pick can reach are never read.
    * **Layout.** From _RELAYOUT_MIN_ROWS rows of at most _RELAYOUT_MAX_DIM columns on, the
      rows are copied in cluster order at _RELAYOUT_FIRST, x _RELAYOUT_GROWTH, ... picks
      (``points`` itself is not changed; the copy costs N x d floats more while it runs);
      results come back in input numbering.
    """
    return _farthest_first_made(lambda: points, k, start, radii, on_progress)


def _farthest_first_made(
    make_points: Callable[[], np.ndarray],
    k: int,
    start: int,
    radii: np.ndarray | None,
    on_progress: Callable[[int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`farthest_first` on the rows ``make_points()`` returns. Where nothing else holds
    that array (a projection made for this selection), laying the rows out by cluster replaces
    it instead of copying it beside it: one N x d matrix less at the peak of a fit's reduces."""
    points = make_points()
    del make_points
    n, dim = points.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} points, got {k}")
    if not 0 <= start < n:
        raise ValueError(f"start index {start} out of range for {n} points")
    bonus = None if radii is None else np.asarray(radii, dtype=np.float32)
    if bonus is not None and bonus.shape != (n,):
        raise ValueError(f"radii must have shape ({n},), got {bonus.shape}")
    origin = _frame_origin(points)  # far from the origin: centre a copy (see _frame_origin)
    if origin is not None:
        points = points - origin
    sq_norms = np.einsum("ij,ij->i", points, points)
    centers = np.empty((k, dim), dtype=np.float32)
    center_sq = np.empty(k, dtype=np.float32)
    # Squared-radius upper bound of each center's cluster (points only ever leave a cluster, so
    # a stale value stays an upper bound; clusters whose rows were all examined get it exact).
    cluster_r2 = np.zeros(k, dtype=np.float32)
    assignment = np.zeros(n, dtype=np.int64)
    selected = np.empty(k, dtype=np.int64)
    # min_d2: squared distance to the nearest chosen row (chosen rows: -inf, so they never pass
    # a pruning test and never win a pick). key: the pick priority (min_d2 itself, or
    # sqrt(min_d2) + radius for the radius-weighted merge), -inf for chosen rows.
    min_d2 = points @ (points[start] * -2.0)
    min_d2 += sq_norms
    min_d2 += sq_norms[start]
    np.maximum(min_d2, 0.0, out=min_d2)
    min_d2[start] = -np.inf
    key = min_d2 if bonus is None else np.sqrt(np.maximum(min_d2, 0.0)) + bonus
    key[start] = -np.inf
    selected[0], centers[0], center_sq[0] = start, points[start], sq_norms[start]
    lead = min(dim, _LEAD_DIMS)
    lead_centers = np.empty((k, lead), dtype=np.float32)  # leading coordinates of centers
    lead_centers[0] = points[start, :lead]
    lead_sq = np.empty(k, dtype=np.float32)
    lead_sq[0] = float(lead_centers[0] @ lead_centers[0])
    cluster_r2[0] = float(min_d2.max()) if n > 1 else 0.0
    t = 1
    lead_wait, lead_backoff = 0, 1  # batches until the lead bound is tried again
    layout = None  # row i of the working arrays is input row layout[i] (None: identity)
    relayout = n >= _RELAYOUT_MIN_ROWS and dim <= _RELAYOUT_MAX_DIM
    next_layout = _RELAYOUT_FIRST if relayout else k
    while t < k:
        if t >= next_layout:
            # Rows of one cluster together: a batch then reads contiguous runs, not scattered
            # rows (on 156,800 x 128 -> 15,680: 4.5 s -> 3.6 s). Stable, so within a cluster
            # rows keep their order.
            order = np.argsort(assignment, kind="stable")
            layout = order if layout is None else layout[order]
            points, sq_norms, assignment = points[order], sq_norms[order], assignment[order]
            min_d2 = min_d2[order]
            if bonus is None:
                key = min_d2
            else:
                key, bonus = key[order], bonus[order]
            next_layout *= _RELAYOUT_GROWTH
        batch = _next_batch(points, sq_norms, key, min_d2, bonus, min(k - t, _MAX_BATCH))
        b = batch.size
        selected[t : t + b] = batch if layout is None else layout[batch]
        centers[t : t + b] = points[batch]
        center_sq[t : t + b] = sq_norms[batch]
        lead_centers[t : t + b] = points[batch, :lead]
        lead_sq[t : t + b] = np.einsum("ij,ij->i", lead_centers[t : t + b],
                                       lead_centers[t : t + b])
        if _apply_batch(points, sq_norms, centers, center_sq, cluster_r2, assignment, min_d2,
                        key, bonus, batch, t, lead_centers, lead_sq, lead_wait == 0):
            lead_backoff = 1
        elif lead_wait == 0:  # tried in vain: skip it for twice as many batches as last time
            lead_backoff = min(2 * lead_backoff, _LEAD_MAX_BACKOFF)
            lead_wait = lead_backoff
        else:
            lead_wait -= 1
        if on_progress is not None and (t + b) // _PROGRESS_EVERY > t // _PROGRESS_EVERY:
            on_progress(t + b)
        t += b
    if layout is not None:
        in_input_order = np.empty_like(assignment)
        in_input_order[layout] = assignment
        assignment = in_input_order
    return selected, assignment


#: farthest_first lays rows out by cluster at t = FIRST, FIRST * GROWTH, ... picks, when the
#: input has at least MIN_ROWS rows (smaller inputs stay in cache; re-laying them costs more).
_RELAYOUT_FIRST = 512
_RELAYOUT_GROWTH = 4
_RELAYOUT_MIN_ROWS = 32768
#: ... and at most this many columns: projected rows. Unprojected ones (projection_dim=None)
#: are not copied: a second [N, D] matrix would double the selection's memory.
_RELAYOUT_MAX_DIM = 256
#: Leading projected coordinates used for the center-to-pick lower bound.
_LEAD_DIMS = 16
#: Most batches the lead bound is skipped after failing (it is retried at least this often).
_LEAD_MAX_BACKOFF = 32
#: Rows of highest priority among which a batch of picks is made.
_CANDIDATES = 512
#: Most picks per batch (the [rows, b] work per batch grows with it).
_MAX_BATCH = 64


def _top_rows(key: np.ndarray, m: int) -> tuple[np.ndarray, float]:
    """About the ``m`` rows of highest ``key`` (ascending index) and tau >= every other key.

    A threshold guessed from a strided sample keeps this to one compare over [N] (an
    argpartition of [N] per batch cost more than the batch's picks late in a selection); it
    falls back to an argpartition when the guess keeps too few or too many rows.
    """
    n = key.shape[0]
    if m >= n:
        return np.arange(n), -np.inf
    stride = max(1, n // 4096)
    sample = key[::stride]
    rank = min(sample.size, 2 * (m * sample.size) // n + 2)  # aim at about 2m rows
    theta = float(np.partition(sample, sample.size - rank)[sample.size - rank])
    cand = np.flatnonzero(key > theta)
    if m // 4 <= cand.size <= 8 * m:
        return cand, theta
    pool = cand if cand.size > 8 * m else np.arange(n)
    part = np.argpartition(key[pool], pool.size - m - 1)
    # ascending index: the argmax in _next_batch then breaks ties as plain farthest-first
    return np.sort(pool[part[pool.size - m :]]), float(key[pool[part[pool.size - m - 1]]])


def _next_batch(
    points: np.ndarray,
    sq_norms: np.ndarray,
    key: np.ndarray,
    min_d2: np.ndarray,
    bonus: np.ndarray | None,
    limit: int,
) -> np.ndarray:
    """The next picks of plain farthest-first, exactly, as many as can be proven (>= 1).

    Candidates: the m rows of highest ``key``; ``tau`` = the highest key outside them bounds
    every other row's priority for the rest of the batch (priorities only decrease).
    """
    cand, tau = _top_rows(key, min(_CANDIDATES, key.shape[0]))
    picks = _picks_among(
        points[cand], sq_norms[cand], min_d2[cand], None if bonus is None else bonus[cand],
        tau, limit,
    )
    if not picks:
        # A tie with rows outside the candidates (e.g. duplicates): plain argmax decides.
        return np.array([int(key.argmax())], dtype=np.int64)
    return cand[picks]


def _picks_among(
    cand_pts: np.ndarray,
    cand_sq: np.ndarray,
    cand_d2: np.ndarray,
    cand_bonus: np.ndarray | None,
    tau: float,
    limit: int,
) -> list[int]:
    """Farthest-first among candidate rows (positions in ``cand_pts`` [m, d], ascending input
    index) for as long as the best candidate's priority stays > ``tau``, the bound on every
    other row: those are exactly plain farthest-first's next picks. At most ``limit``; empty
    when not even the first can be proven (a tie at ``tau``). ``cand_d2`` [m] (squared distance
    to the chosen rows, -inf for chosen ones) and ``cand_bonus`` are updated in place."""
    if cand_bonus is not None:
        cand_bonus[cand_d2 == -np.inf] = -np.inf  # chosen before: never again, bonus or not
    cand_key = cand_d2 if cand_bonus is None else np.sqrt(np.maximum(cand_d2, 0.0)) + cand_bonus
    picks: list[int] = []
    while len(picks) < limit:
        i = int(cand_key.argmax())  # first maximum: lowest input index, as plain argmax
        if not float(cand_key[i]) > tau:  # also stops at -inf (every candidate chosen)
            break
        picks.append(i)
        # -inf sticks under the minimum below (and in the bonus), so a pick never wins again
        cand_d2[i] = -np.inf
        d2 = cand_pts @ (cand_pts[i] * -2.0)
        d2 += cand_sq
        d2 += cand_sq[i]
        np.maximum(d2, 0.0, out=d2)
        np.minimum(cand_d2, d2, out=cand_d2)
        if cand_bonus is not None:
            cand_bonus[i] = -np.inf
            cand_key = np.sqrt(np.maximum(cand_d2, 0.0)) + cand_bonus
    return picks


def _apply_batch(
    points: np.ndarray,
    sq_norms: np.ndarray,
    centers: np.ndarray,
    center_sq: np.ndarray,
    cluster_r2: np.ndarray,
    assignment: np.ndarray,
    min_d2: np.ndarray,
    key: np.ndarray,
    bonus: np.ndarray | None,
    batch: np.ndarray,
    t: int,
    lead_centers: np.ndarray,
    lead_sq: np.ndarray,
    try_lead: bool = True,
) -> bool:
    """Add ``batch`` (rows of ``points``) as centers t .. t+b-1, already copied to ``centers``:
    update min_d2, assignment, key and the cluster radius bounds. Returns whether the
    leading-coordinate bound (tried only if ``try_lead``) ruled out at least half the clusters.

    Row x (cluster a, squared distance m_x to c_a) can move to pick p_i only if
    |p_i - c_a|^2 < 4 m_x. So: cluster-level pairs (a, i) with |p_i - c_a| < 2 R_a come from one
    [t, b] GEMM; rows of clusters no pick reaches are never read; each remaining row is paired
    only with the picks that reach its cluster, and a pair is evaluated only if it passes the
    row's own test. Where most pairs pass (little structure), one GEMM per row block instead.
    """
    b = batch.size
    new = centers[t : t + b]
    new_sq = center_sq[t : t + b]
    reach = 4.0 * cluster_r2[:t] * (1.0 + _PRUNE_REL_SLACK) + 1e-6
    # Which old clusters can a pick reach (|p_i - c_a| < 2 R_a)? The leading coordinates alone
    # give a lower bound on center distances; with PCA they carry most of the variance, so a
    # [t, lead] GEMM rules out most clusters and the full [*, d] one runs on the rest only
    # (over a selection the center scan is O(k^2): it dominates for k in the 10^4-10^5).
    # Where the leading coordinates carry little of the spread (isotropic clusters) the bound
    # rules out nothing: the caller then stops trying it for a while (try_lead).
    lead = lead_centers.shape[1]
    lead_helped = False
    if try_lead and lead < centers.shape[1]:
        low2 = lead_centers[:t] @ (lead_centers[t : t + b].T * -2.0)
        low2 += lead_sq[:t, None]
        low2 += lead_sq[None, t : t + b]
        near = np.flatnonzero((low2 * (1.0 - _PRUNE_REL_SLACK) < reach[:, None]).any(axis=1))
        del low2
        lead_helped = 2 * near.size <= t
    if not lead_helped:
        near = np.arange(t)
        dc2 = centers[:t] @ (new.T * -2.0)  # [t, b] squared center-to-pick distances
    else:
        dc2 = centers[near] @ (new.T * -2.0)
    dc2 += center_sq[near, None]
    dc2 += new_sq[None, :]
    hit_a, pair_i = np.nonzero(dc2 < reach[near, None])  # sorted by cluster, then pick
    pair_a = near[hit_a]
    # A pair (x, i) is worth evaluating only if min_d2[x] > quarter of |p_i - c_a|^2.
    pair_q = dc2[hit_a, pair_i] * (0.25 * (1.0 - _PRUNE_REL_SLACK)) - 1e-6
    per_cluster = np.bincount(pair_a, minlength=t + b)
    first_pair = np.cumsum(per_cluster) - per_cluster
    floor = np.full(t + b, np.inf, dtype=np.float32)  # +inf: no pick reaches the cluster
    if pair_a.size:
        group = np.flatnonzero(per_cluster[:t])
        floor[group] = np.minimum.reduceat(pair_q, first_pair[group])
    rows = np.flatnonzero(min_d2 > floor[assignment])  # rows that pass at least one pair
    for lo in range(0, rows.size, _ROW_BLOCK):
        r = rows[lo : lo + _ROW_BLOCK]
        r_d2 = min_d2[r]
        counts = per_cluster[assignment[r]]
        total = int(counts.sum())
        if total * _DENSE_PAIR_COST > r.size * b:
            # Many pairs pass (little structure): one GEMM for the block is cheaper.
            d2 = points[r] @ (new.T * -2.0)
            d2 += sq_norms[r, None]
            d2 += new_sq[None, :]
            nearest = d2.argmin(axis=1)  # first minimum: the earliest pick, as plain ff
            nearest_d2 = d2[np.arange(r.size), nearest]
            at = np.flatnonzero(nearest_d2 < r_d2)
            moved, moved_d2, moved_to = r[at], nearest_d2[at], nearest[at]
        else:
            # Ragged expansion: row j of the block meets pairs first_pair[a_j] .. + counts[j].
            ends = np.cumsum(counts)
            within = np.arange(total) - np.repeat(ends - counts, counts)
            pidx = np.repeat(first_pair[assignment[r]], counts) + within
            owner = np.repeat(np.arange(r.size), counts)
            keep = r_d2[owner] > pair_q[pidx]
            owner, pidx = owner[keep], pidx[keep]
            if owner.size == 0:
                continue
            x, pi = r[owner], pair_i[pidx]
            d2 = _pair_dots(points, new, x, pi)
            d2 *= -2.0
            d2 += sq_norms[x]
            d2 += new_sq[pi]
            # Pairs are grouped by row with picks ascending: the first minimum of each group
            # is the earliest nearest pick, as plain farthest-first would assign it.
            starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
            group_min = np.minimum.reduceat(d2, starts)
            pos = np.flatnonzero(d2 == np.repeat(group_min, np.diff(np.r_[starts, owner.size])))
            first = pos[np.r_[True, owner[pos[1:]] != owner[pos[:-1]]]]
            at = first[d2[first] < r_d2[owner[first]]]
            moved, moved_d2, moved_to = x[at], d2[at], pi[at]
        np.maximum(moved_d2, 0.0, out=moved_d2)
        min_d2[moved] = moved_d2
        assignment[moved] = t + moved_to
        if bonus is not None:
            key[moved] = np.sqrt(moved_d2) + bonus[moved]
    # The picks are centers now: they never move or win a pick again.
    assignment[batch] = np.arange(t, t + b)
    min_d2[batch] = -np.inf
    key[batch] = -np.inf
    # Exact radii for the reached clusters and the new ones (every row of theirs is known
    # here); the others keep their value, still an upper bound (points only ever leave).
    touched_cluster = np.r_[per_cluster[:t] > 0, np.ones(b, dtype=bool)]
    cluster_r2[:t + b][touched_cluster] = 0.0
    touched = np.flatnonzero(touched_cluster[assignment])
    live = touched[min_d2[touched] != -np.inf]
    np.maximum.at(cluster_r2, assignment[live], min_d2[live])
    return lead_helped


def _pair_dots(points: np.ndarray, picks: np.ndarray, rows: np.ndarray,
               pick_of: np.ndarray) -> np.ndarray:
    """[P] dot products points[rows[j]] . picks[pick_of[j]] for P (row, pick) pairs.

    Grouped by pick, one matrix-vector product per pick over the gathered rows: on 156,800 x
    128 rows that costs about half of gathering both sides of every pair for a row-wise
    ``einsum`` (the pair evaluation is most of a clustered selection's time).
    """
    order = np.argsort(pick_of.astype(np.int16), kind="stable")  # radix sort: b <= _MAX_BATCH
    ends = np.cumsum(np.bincount(pick_of, minlength=picks.shape[0]))
    gathered = points[rows[order]]
    dots = np.empty(rows.size, dtype=np.float32)
    lo = 0
    for i, hi in enumerate(ends.tolist()):
        if hi > lo:
            np.matmul(gathered[lo:hi], picks[i], out=dots[lo:hi])
        lo = hi
    out = np.empty_like(dots)
    out[order] = dots
    return out


def _farthest_first_torch(
    points: torch.Tensor,
    k: int,
    start: int,
    radii: np.ndarray | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Farthest-first on a (CUDA) tensor [N, d]: exact, in batches of picks, no pruning.

    Plain farthest-first reads the whole [N, d] matrix once per pick: 1,000,000 x 128 float32
    -> 100,000 picks is 51 TB of reads, 15 s at an H100's 3.35 TB/s before any arithmetic.
    So, as on the CPU (:func:`farthest_first`), the next picks are proven among the
    ``_CANDIDATES`` rows of highest priority (:func:`_picks_among`, on the host: [512, d]) and
    then applied to all rows at once by one [N, b] GEMM, b <= ``_MAX_BATCH``: the matrix is
    read once per batch. Triangle pruning is left out: on a GPU its gathers cost more than the
    dense GEMM. Same pick rule and ``radii`` priority as :func:`farthest_first` (float32
    near-ties aside); runs on CPU tensors too (the tests check it there).
    """
    n = points.shape[0]
    device = points.device
    points = points - points.mean(dim=0, dtype=torch.float64).to(points.dtype)  # see _frame_origin
    bonus = None
    if radii is not None:
        bonus = torch.as_tensor(radii, dtype=torch.float32, device=device).clone()
    sq_norms = (points * points).sum(dim=1)
    min_d2 = torch.addmv(sq_norms, points, points[start], alpha=-2.0)
    min_d2.add_(sq_norms[start]).clamp_(min=0.0)
    min_d2[start] = -torch.inf  # chosen rows: -inf, never picked again (nor moved)
    if bonus is not None:
        bonus[start] = -torch.inf  # so that their priority is -inf too
    assignment = torch.zeros(n, dtype=torch.long, device=device)
    selected = np.empty(k, dtype=np.int64)
    selected[0] = start
    m = min(_CANDIDATES, n)
    t = 1
    while t < k:
        key = min_d2 if bonus is None else min_d2.clamp_min(0.0).sqrt() + bonus
        top = torch.topk(key, min(m + 1, n), sorted=True)
        tau = float(top.values[m]) if n > m else -np.inf
        cand = top.indices[:m].sort().values  # ascending index: ties go as plain argmax
        picks = _picks_among(
            points[cand].cpu().numpy(), sq_norms[cand].cpu().numpy(), min_d2[cand].cpu().numpy(),
            None if bonus is None else bonus[cand].cpu().numpy(), tau, min(k - t, _MAX_BATCH),
        )
        batch = cand[picks] if picks else torch.argmax(key).reshape(1)
        b = batch.numel()
        selected[t : t + b] = batch.cpu().numpy()
        new = points[batch]
        d2 = points @ (new.T * -2.0)  # [N, b]
        d2 += sq_norms[:, None]
        d2 += sq_norms[batch][None, :]
        nearest_d2, nearest = d2.clamp_(min=0.0).min(dim=1)  # first minimum: earliest pick
        del d2
        moved = nearest_d2 < min_d2
        assignment = torch.where(moved, nearest + t, assignment)
        min_d2 = torch.where(moved, nearest_d2, min_d2)
        assignment[batch] = torch.arange(t, t + b, device=device)
        min_d2[batch] = -torch.inf
        if bonus is not None:
            bonus[batch] = -torch.inf
        if on_progress is not None and (t + b) // _PROGRESS_EVERY > t // _PROGRESS_EVERY:
            on_progress(t + b)
        t += b
    return selected, assignment.cpu().numpy()


def _nearest_distance(
    queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """Euclidean distance [Q] from each query row to its nearest bank row (one [Q, k] block).

    Callers pass rows already shifted into the bank's frame (see _frame_origin): the expansion below
    cancels catastrophically far from the origin. ``bank_sq`` ([k] squared row norms) may be
    passed by callers that query one bank often; ``vector_norm`` computes it without a [k, D]
    temporary.
    """
    if bank_sq is None:
        bank_sq = torch.linalg.vector_norm(bank, dim=1) ** 2
    d2 = (
        torch.linalg.vector_norm(queries, dim=1, keepdim=True) ** 2
        - 2.0 * queries @ bank.T
        + bank_sq[None, :]
    )
    return d2.min(dim=1).values.clamp_min(0.0).sqrt()


def coverage_radius(
    features: np.ndarray | torch.Tensor,
    bank: np.ndarray | torch.Tensor,
    *,
    chunk_rows: int = 2048,
) -> float:
    """Exact coverage radius max_i min_j |features_i - bank_j| (Euclidean, original space).

    Costs N x k x D multiply-adds in chunks of ``chunk_rows`` queries (memory chunk_rows x k);
    meant for benchmarks and tests. :func:`greedy_coreset` gets the same number far cheaper.
    """
    x = torch.as_tensor(_as_float32_numpy(features))
    bank_array = _as_float32_numpy(bank)
    if x.shape[1] != bank_array.shape[1]:
        raise ValueError(
            f"feature dims differ: features {tuple(x.shape)}, bank {tuple(bank_array.shape)}"
        )
    origin = torch.from_numpy(bank_array.mean(axis=0, dtype=np.float64).astype(np.float32))
    b = torch.from_numpy(bank_array) - origin  # distances in the bank's frame: see _frame_origin
    b_sq = torch.linalg.vector_norm(b, dim=1) ** 2
    radius = 0.0
    for lo in range(0, x.shape[0], chunk_rows):
        block = x[lo : lo + chunk_rows] - origin
        radius = max(radius, float(_nearest_distance(block, b, b_sq).max()))
    return radius


#: Picks between progress-bar updates (one Python call per 256 picks: nothing next to a pick).
_PROGRESS_EVERY = 256

#: A row block takes one dense [rows, b] GEMM when more than 1 / this of its (row, pick) pairs
#: pass the pruning test: a gathered pair costs about this many GEMM pairs (4 to 32 measured
#: the same on 156,800 x 128 -> 15,680, before the cluster layout; 64 and up were 33 % slower).
_DENSE_PAIR_COST = 4
_ROW_BLOCK = 8192  # rows per block of the [block, D] temporaries below
_CACHED_ROWS = 512  # rows per block of a [block, D] buffer meant to stay in cache


def _assigned_distances(features: np.ndarray, bank: np.ndarray, assigned: np.ndarray) -> np.ndarray:
    """[N] Euclidean |features[i] - bank[assigned[i]]|, through one reused [512, D] buffer
    that stays in cache (8,192-row temporaries went to memory and back: 0.30 s against
    0.17 s on 156,800 x 1024)."""
    n = features.shape[0]
    out = np.empty(n, dtype=np.float32)
    buffer = np.empty((min(_CACHED_ROWS, n), features.shape[1]), dtype=np.float32)
    for lo in range(0, n, _CACHED_ROWS):
        diffs = buffer[: min(_CACHED_ROWS, n - lo)]
        np.take(bank, assigned[lo : lo + _CACHED_ROWS], axis=0, out=diffs)
        np.subtract(features[lo : lo + _CACHED_ROWS], diffs, out=diffs)
        out[lo : lo + _CACHED_ROWS] = np.sqrt(np.einsum("ij,ij->i", diffs, diffs))
    return out


def _compact_in_place(buffer: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Move rows ``keep`` to the front of ``buffer``; returns the permutation of ``keep`` used.

    Sources are visited in ascending order and copied in row blocks: destination row i never
    exceeds its source, so no row is overwritten before it is read, and the temporary is one
    block instead of a [k, D] copy. Row i of the result is ``buffer[keep[order[i]]]``.
    """
    order = np.argsort(keep, kind="stable")
    ordered = keep[order]
    for lo in range(0, ordered.size, _ROW_BLOCK):
        hi = min(lo + _ROW_BLOCK, ordered.size)
        buffer[lo:hi] = buffer[ordered[lo:hi]]
    return order


def _to_pick_order_in_place(buffer: np.ndarray, order: np.ndarray) -> None:
    """Permute ``buffer[:n]`` in place from :func:`_compact_in_place`'s order into pick order.

    After compaction row i holds pick ``order[i]``; afterwards row p holds pick p. Cycle by
    cycle with one row of scratch, so no [k, D] copy: a bank in pick order is a nested family
    (its first m rows are the farthest-first selection of size m), which the federated server's
    prefix merge relies on (core.federated.prefix).
    """
    n = order.size
    source = np.empty(n, dtype=np.int64)
    source[order] = np.arange(n)  # row p must receive the row now at source[p]
    done = source == np.arange(n)
    for start in np.flatnonzero(~done):
        if done[start]:
            continue
        scratch = buffer[start].copy()
        p = int(start)
        while True:
            done[p] = True
            src = int(source[p])
            if src == start:
                buffer[p] = scratch
                break
            buffer[p] = buffer[src]
            p = src


def _partition_in_place(buffer: np.ndarray, size: int, keep: np.ndarray) -> np.ndarray:
    """Swap rows so that ``keep`` (distinct rows < size) fill rows 0 .. k-1 of ``buffer``,
    every other of the first ``size`` rows staying in rows k .. size-1 (none is lost).

    Returns perm [size]: row i now holds what row perm[i] held. Each kept row beyond the front
    swaps with a dropped row inside it, in blocks: the temporary is one block, not [k, D]; so the
    bank can then be the view ``buffer[:k]`` while the dropped rows are still there to measure.
    """
    k = keep.size
    is_kept = np.zeros(size, dtype=bool)
    is_kept[keep] = True
    outside = np.flatnonzero(is_kept[k:]) + k
    holes = np.flatnonzero(~is_kept[:k])
    for lo in range(0, outside.size, _ROW_BLOCK):
        src, dst = outside[lo : lo + _ROW_BLOCK], holes[lo : lo + _ROW_BLOCK]
        moving = buffer[src]  # one block
        buffer[src] = buffer[dst]
        buffer[dst] = moving
    perm = np.arange(size)
    perm[outside], perm[holes] = holes, outside
    return perm


#: Far from the origin the exact radius centres the bank in blocks of this many rows for each
#: block of this many query rows ([1,024, 4,096] distances: 16 MiB; the bank is re-read once per
#: query block, and only a few thousand rows ever need an exact check).
_CENTRED_QUERY_BLOCK = 1024
_CENTRED_BANK_BLOCK = 4096


def _exact_radius(
    features: np.ndarray,
    bank: np.ndarray,
    assigned: np.ndarray,
    offsets: np.ndarray | None = None,
    guide: tuple[np.ndarray, np.ndarray] | None = None,
) -> float:
    """Exact max_i (min_j |features_i - bank_j| + offsets_i), touching few rows.

    Args:
        features: [N, D] rows to cover. bank: [k, D] (may be a view into ``features``).
        assigned: [N] for each row, the bank row the selection assigned it to.
        offsets: [N] radii that rows already stand in for (default 0).
        guide: optional (projected features [N, d], projected bank [k, d]) used to find each
            candidate row's nearest bank rows.

    ``upper[i] = |x_i - bank[assigned[i]]|`` bounds row i's true nearest-bank distance from
    above (the projection may have assigned it to a slightly farther member). Rows are visited
    by decreasing ``upper + offset`` in blocks; a row is settled without its exact value when
    its bound is <= the radius found so far, and the others get a full [rows, k] x D check.
    With a guide, each visited row's bound is first tightened by its exact distance to the
    ``_GUESSES`` bank rows nearest in the projection (one [rows, k] x d product, d = 128 against
    D = 1024), and the full check goes to the rows, by decreasing tightened bound, in small
    groups so that the radius they raise settles the rest.
    """
    assigned_distance = _assigned_distances(features, bank, assigned)
    upper = assigned_distance if offsets is None else assigned_distance + offsets
    order = np.argsort(-upper, kind="stable")
    nearest = _DenseNearest(features, bank)
    if guide is not None:
        return _guided_radius(features, bank, assigned_distance, offsets, upper, order, guide,
                              nearest)
    radius = 0.0
    for lo in range(0, order.size, nearest.block):
        if radius >= upper[order[lo]]:
            break
        part = order[lo : lo + nearest.block]
        exact = nearest(part)
        values = exact if offsets is None else exact + offsets[part]
        radius = max(radius, float(values.max()))
    return radius


class _DenseNearest:
    """Exact distance from chosen rows of ``features`` [N, D] to their nearest ``bank`` [k, D]
    row by a full [rows, k] x D product; ``block`` is the number of rows worth one call.

    Distances are taken in the bank's frame when the rows sit far from the origin (see
    _frame_origin; random-init CNN features do: squared offset 3.3 against a spread of 0.09).
    The bank is then centred block by block, never copied whole: a centred copy of a
    k = 78,400 bank is 306 MiB, more than a fit's whole margin below 2 GiB.
    """

    def __init__(self, features: np.ndarray, bank: np.ndarray) -> None:
        self.features, self.bank = features, bank
        self.origin = _frame_origin(bank)
        k = bank.shape[0]
        self.bank_sq: torch.Tensor | None = None
        if self.origin is None:
            self.bank_sq = torch.linalg.vector_norm(torch.from_numpy(bank), dim=1) ** 2
            self.block = max(16, min(256, (1 << 22) // max(1, k)))  # [block, k] <= 16 MiB
        else:
            self.block = _CENTRED_QUERY_BLOCK  # each call re-centres the bank: fewer, larger

    def __call__(self, part: np.ndarray) -> np.ndarray:
        """[len(part)] exact Euclidean distance from features[part] to the nearest bank row."""
        if self.origin is None:
            return _nearest_distance(
                torch.from_numpy(self.features[part]), torch.from_numpy(self.bank), self.bank_sq
            ).numpy()
        queries = torch.from_numpy(self.features[part] - self.origin)
        best: torch.Tensor | None = None
        for lo in range(0, self.bank.shape[0], _CENTRED_BANK_BLOCK):
            block = torch.from_numpy(self.bank[lo : lo + _CENTRED_BANK_BLOCK] - self.origin)
            distance = _nearest_distance(queries, block)
            best = distance if best is None else torch.minimum(best, distance)
        assert best is not None
        return best.numpy()


#: Bank rows nearest in the projection whose exact distance tightens a row's upper bound
#: (any choice is safe: a bound only has to hold, and the full check decides the rest).
_GUESSES = 8
#: Most rows per block of the guided radius (one [block, k] projected product each).
_GUIDE_BLOCK_MAX = 256
#: Rows per dense exact check once guesses are spent (few: each one may settle the rest).
_SETTLE_ROWS = 32
#: Rows collected across blocks before they get their dense checks (after the first block).
_SETTLE_BATCH = 128


def _guided_radius(
    features: np.ndarray,
    bank: np.ndarray,
    assigned_distance: np.ndarray,
    offsets: np.ndarray | None,
    upper: np.ndarray,
    order: np.ndarray,
    guide: tuple[np.ndarray, np.ndarray],
    nearest: _DenseNearest,
) -> float:
    """:func:`_exact_radius` with a projection: see there. ``assigned_distance`` [N] is each
    row's distance to its assigned bank row, ``upper`` that plus ``offsets``, ``order`` the rows
    by decreasing ``upper``."""
    k = bank.shape[0]
    guesses = min(_GUESSES, k)
    radius = 0.0
    projected, bank_projected = guide
    bank_proj_sq = np.einsum("ij,ij->i", bank_projected, bank_projected)
    block = max(16, min(_GUIDE_BLOCK_MAX, (1 << 22) // k))  # [block, k] projected: <= 16 MiB
    pending_rows: list[np.ndarray] = []  # rows waiting for the full check, and their bounds
    pending_tight: list[np.ndarray] = []
    waiting = 0
    rows_first = min(_SETTLE_ROWS, order.size)
    lo = 0
    while lo < order.size:
        if radius >= upper[order[lo]]:
            break
        rows = order[lo : lo + (_SETTLE_ROWS if lo == 0 else block)]  # a first radius, fast
        lo += rows.size
        rows = rows[upper[rows] > radius]
        x_proj = projected[rows]
        pd2 = x_proj @ (bank_projected.T * -2.0)  # [rows, k] (|x|^2 is the same along a row)
        pd2 += bank_proj_sq[None, :]
        # torch's topk: ~6x faster than numpy's argpartition, which also writes [rows, k] int64.
        guess = torch.topk(torch.from_numpy(pd2), guesses, dim=1, largest=False,
                           sorted=False).indices.numpy()
        del pd2
        tight = assigned_distance[rows].copy()
        x_rows = features[rows]  # gathered once for all guesses
        diffs = np.empty_like(x_rows)
        for g in range(guesses):
            np.take(bank, guess[:, g], axis=0, out=diffs)
            np.subtract(x_rows, diffs, out=diffs)
            np.minimum(tight, np.sqrt(np.einsum("ij,ij->i", diffs, diffs)), out=tight)
        del x_rows, diffs
        if offsets is not None:
            tight += offsets[rows]
        live = tight > radius
        pending_rows.append(rows[live])
        pending_tight.append(tight[live])
        waiting += int(live.sum())
        # The first block settles at once (an early radius settles most later rows); after it,
        # rows wait for a batch of full checks: each reads the whole bank, so a few large
        # checks cost less than many small ones (unstructured rows leave ~10 per block).
        if lo == rows_first or waiting >= _SETTLE_BATCH:
            radius = _settle(nearest, offsets, pending_rows, pending_tight, radius)
            waiting = 0
    return _settle(nearest, offsets, pending_rows, pending_tight, radius)


def _settle(
    nearest: _DenseNearest,
    offsets: np.ndarray | None,
    pending_rows: list[np.ndarray],
    pending_tight: list[np.ndarray],
    radius: float,
) -> float:
    """Give the pending rows whose bound still exceeds ``radius`` the full check, largest bound
    first, in groups of ``_SETTLE_ROWS`` (the radius each group raises may settle the rest);
    returns the raised radius and empties both lists."""
    if not pending_rows:
        return radius
    rows, tight = np.concatenate(pending_rows), np.concatenate(pending_tight)
    pending_rows.clear()
    pending_tight.clear()
    live = np.flatnonzero(tight > radius)
    live = live[np.argsort(-tight[live], kind="stable")]
    for start in range(0, live.size, _SETTLE_ROWS):
        if radius >= tight[live[start]]:
            break
        part = rows[live[start : start + _SETTLE_ROWS]]
        exact = nearest(part)
        values = exact if offsets is None else exact + offsets[part]
        radius = max(radius, float(values.max()))
    return radius


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run a CPU selection with one BLAS and one torch thread, restoring both afterwards.

    Why: the selection is hundreds of small and medium BLAS/torch calls, and this team's
    2-core machines are shared. With two threads and other work on the cores, OpenMP/OpenBLAS
    threads spin at barriers: on 156,800 x 1024 -> 15,680 at load ~3 the PCA fit took 3.8 s
    instead of 0.11 s and the whole selection 13.5 s instead of 7.4 s. Both settings are
    process-wide, so concurrent torch work in other threads also runs on one thread meanwhile.
    """
    if device.type == "cuda":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(previous)


def greedy_coreset(
    features: np.ndarray | torch.Tensor,
    k: int,
    *,
    projection_dim: int | None = 128,
    projection: ProjectionKind = "auto",
    seed: int = 0,
    device: str | torch.device | None = None,
    compute_radius: bool = True,
) -> CoresetResult:
    """Select ``k`` rows of ``features`` [N, D] by farthest-first traversal.

    Args:
        features: [N, D] float features (NumPy or torch, any device).
        k: coreset size, 1 <= k <= N.
        projection_dim: dimension of the projection used to compare distances; None (or >= D)
            compares in the original space.
        projection: "auto" (default), "pca", "pca_jl" or "gaussian" (see :func:`fit_projection`).
        seed: seeds both the projection and the start point (a uniformly drawn row).
        device: where to run the selection loop: "cuda" runs it in torch on the GPU; None or "cpu"
            runs the pruned NumPy loop. None picks CUDA when ``features`` already lives there.
        compute_radius: also compute the exact coverage radius (original space). It costs up to
            about as much as the selection on unstructured data; skip it when only indices count.

    Returns:
        :class:`CoresetResult` with the picks in order and (unless ``compute_radius`` is False)
        the exact coverage radius in the original space.
    """
    on_cuda = isinstance(features, torch.Tensor) and features.is_cuda
    run_device = torch.device(device) if device is not None else torch.device(
        "cuda" if on_cuda else "cpu"
    )
    array = _as_float32_numpy(features)
    n = array.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"coreset size k must be in [1, {n}] for {n} rows, got {k}")
    if not np.isfinite(array).all():
        raise ValueError("features contain NaN or inf; a coreset of them is meaningless")
    generator = torch.Generator().manual_seed(seed)
    start = int(torch.randint(n, (1,), generator=generator))
    with _one_thread(run_device):
        fitted = fit_projection(array, projection_dim, seed, projection)
        projected = _project(fitted, array)
        indices, assignment = _run_farthest_first(lambda: projected, n, k, start, None,
                                                  run_device)
        radius = None
        if compute_radius:
            guide = None if fitted is None else (projected, projected[indices])
            radius = _exact_radius(array, array[indices], assignment, guide=guide)
    return CoresetResult(indices=indices, radius=radius)


def _run_farthest_first(
    make_projected: Callable[[], np.ndarray],
    rows: int,
    k: int,
    start: int,
    radii: np.ndarray | None,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Farthest-first with a progress bar on ``device``, over the [rows, d] array that
    ``make_projected()`` returns (made here, so that nothing else need hold it: see
    :func:`_farthest_first_made`)."""
    with progress_bar(k, f"coreset {k:,} of {rows:,} rows", "pick") as bar:
        def advance(picks: int) -> None:
            bar.update(picks - bar.n)

        if device.type == "cuda":
            return _farthest_first_torch(
                torch.from_numpy(make_projected()).to(device), k, start, radii, advance
            )
        return _farthest_first_made(make_projected, k, start, radii, advance)


@dataclass(frozen=True)
class IncrementalSelection:
    """What :meth:`IncrementalCoreset.select` returns.

    Attributes:
        features: [k, D] float32 selected rows (original space), in pick order (with or
            without ``release``): the first m rows are the farthest-first selection of size m.
        radius_bound: certified coverage radius: every row ever passed to ``add`` lies within
            this Euclidean distance of some row of ``features``.
        num_seen: rows passed to ``add`` so far.
    """

    features: np.ndarray
    radius_bound: float
    num_seen: int


class IncrementalCoreset:
    """Streaming farthest-first selection with memory bounded by ``capacity`` rows.

    Rows arrive in batches (a client's images, a server's upload chunks). They are buffered; when
    the buffer exceeds ``capacity`` it is *reduced* to ``k`` rows by farthest-first (merge and
    reduce). Each kept row remembers the radius of the rows it now stands in for, and the reduce
    picks by ``distance + represented radius``, so the bound it reports holds for every row ever
    added, not just the buffered ones. With ``capacity >= total rows`` this is exactly the offline
    :func:`greedy_coreset` (same projection, start drawn from the same seed).

    The projection is fitted on the buffer the first time it is needed (first reduce or select)
    and then kept, so every reduce compares distances the same way. Projections are recomputed
    per reduce rather than stored: ``capacity x D`` float32 is the whole buffer memory.

    Args:
        k: rows to keep (the coreset size).
        capacity: buffer rows before a reduce; default ``max(2 k, k + 8192)``. Must be > k.
        projection_dim: as in :func:`greedy_coreset`.
        projection: as in :func:`greedy_coreset`.
        seed: seeds the projection and every reduce's start point.
        device: "cuda" to run the reduce loops on the GPU, else CPU.
    """

    def __init__(
        self,
        k: int,
        *,
        capacity: int | None = None,
        projection_dim: int | None = 128,
        projection: ProjectionKind = "auto",
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        capacity = max(2 * k, k + 8192) if capacity is None else capacity
        if capacity <= k:
            raise ValueError(f"capacity must exceed k={k}, got {capacity}")
        self.k = k
        self.capacity = capacity
        self.projection_dim = projection_dim
        self.projection_kind: ProjectionKind = projection
        self.seed = seed
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._reduce_generator = torch.Generator().manual_seed(seed + 1)
        self._features: np.ndarray | None = None  # [capacity, D]
        self._radii: np.ndarray | None = None  # [capacity] represented radius per buffered row
        self._projection: Projection | None = None
        self._projection_fitted = False
        self._size = 0
        self._released = False
        self.num_seen = 0
        self.num_reduces = 0

    def _check_usable(self) -> None:
        if self._released:
            raise RuntimeError("this selector handed its buffer to select(release=True)")

    @property
    def feature_dim(self) -> int | None:
        """D, fixed by the first batch (None before any add)."""
        return None if self._features is None else self._features.shape[1]

    @property
    def num_buffered(self) -> int:
        return self._size

    def add(self, features: np.ndarray | torch.Tensor) -> None:
        """Buffer a batch [n, D] (reducing whenever the buffer fills). n may be 0."""
        self._check_usable()
        batch = _as_float32_numpy(features)
        if self._features is None:
            self._features = np.empty((self.capacity, batch.shape[1]), dtype=np.float32)
            self._radii = np.zeros(self.capacity, dtype=np.float32)
        assert self._radii is not None
        if batch.shape[1] != self._features.shape[1]:
            raise ValueError(
                f"feature dim changed: buffer holds D={self._features.shape[1]}, "
                f"batch has D={batch.shape[1]}"
            )
        if not np.isfinite(batch).all():
            raise ValueError("features contain NaN or inf")
        offset = 0
        while offset < batch.shape[0]:
            if self._size == self.capacity:
                self._reduce()
            take = min(self.capacity - self._size, batch.shape[0] - offset)
            end = self._size + take
            self._features[self._size : end] = batch[offset : offset + take]
            self._radii[self._size : end] = 0.0
            self._size = end
            offset += take
        self.num_seen += batch.shape[0]

    def reorder(self, permutation: np.ndarray) -> None:
        """Permute the buffered rows: buffered row i becomes the old row ``permutation[i]``.

        Farthest-first depends on row order (start point, ties), so a caller whose rows arrive
        in a varying order (a server's interleaved uploads) puts them in a canonical order before
        :meth:`select`. ``permutation`` is a permutation of ``range(num_buffered)``. Costs one
        temporary copy of the buffered rows ([num_buffered, D] float32).
        """
        self._check_usable()
        order = np.asarray(permutation)
        if (
            order.shape != (self._size,)
            or not np.issubdtype(order.dtype, np.integer)
            or not np.array_equal(np.sort(order), np.arange(self._size))
        ):
            raise ValueError(
                f"permutation must be a permutation of range({self._size}), got shape "
                f"{order.shape} and dtype {order.dtype}"
            )
        if self._size == 0:
            return
        assert self._features is not None and self._radii is not None
        self._features[: self._size] = self._features[: self._size][order]
        self._radii[: self._size] = self._radii[: self._size][order]

    def _farthest_first(
        self, k: int, generator: torch.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self._features is not None and self._radii is not None
        buffered = self._features[: self._size]
        if not self._projection_fitted:
            self._projection = fit_projection(
                buffered, self.projection_dim, self.seed, self.projection_kind
            )
            self._projection_fitted = True
        start = int(torch.randint(self._size, (1,), generator=generator))
        radii = self._radii[: self._size]
        projection = self._projection
        return _run_farthest_first(
            lambda: _project(projection, buffered),  # held by the selection alone
            self._size,
            k,
            start,
            radii if radii.any() else None,
            self.device,
        )

    def _reduce(self) -> None:
        """Buffer -> k rows; kept rows absorb the radius of the rows they now represent."""
        with _one_thread(self.device):
            self._reduce_buffer()

    def _reduce_buffer(self) -> None:
        assert self._features is not None and self._radii is not None
        keep, assignment = self._farthest_first(self.k, self._reduce_generator)
        size = self._size
        features, radii = self._features[:size], self._radii[:size]
        # Original-space distance from every buffered row to the kept row it is assigned to.
        reach = _assigned_distances(features, features, keep[assignment]) + radii
        new_radii = np.zeros(self.k, dtype=np.float32)
        np.maximum.at(new_radii, assignment, reach)
        order = _compact_in_place(self._features, keep)
        _to_pick_order_in_place(self._features, order)
        self._radii[: self.k] = new_radii
        self._size = self.k
        self.num_reduces += 1
        logger.debug("reduced %d buffered rows to %d (bound %.4f)", size, self.k, new_radii.max())

    def select(self, k: int | None = None, *, release: bool = False) -> IncrementalSelection:
        """The current coreset of (at most) ``k`` rows (default: the constructor's ``k``).

        Does not change the buffer, so more rows may be added afterwards, unless ``release``:
        then the selection is compacted into the buffer's first rows and the buffer is shrunk
        to it in place (no [k, D] copy beside the full buffer: the peak of a large fit), and
        the selector cannot be used afterwards.
        """
        self._check_usable()
        with _one_thread(self.device):
            return self._select(k, release)

    def _select(self, k: int | None, release: bool) -> IncrementalSelection:
        k = self.k if k is None else k
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self._size == 0:
            raise ValueError("no features were added; nothing to select from")
        assert self._features is not None and self._radii is not None
        if self._size <= k:
            return IncrementalSelection(
                features=self._features[: self._size].copy(),
                radius_bound=float(self._radii[: self._size].max()),
                num_seen=self.num_seen,
            )
        # A fresh generator from the seed: select() is repeatable, and with no reduce so far it
        # draws the same start as greedy_coreset(seed=seed).
        keep, assignment = self._farthest_first(k, torch.Generator().manual_seed(self.seed))
        size = self._size
        features = self._features[:size]
        if not release:
            selected = features[keep]  # fancy indexing: already a copy
            bound = _exact_radius(features, selected, assignment, self._radii[:size])
            return IncrementalSelection(
                features=selected, radius_bound=bound, num_seen=self.num_seen
            )
        # Kept rows to the front by swaps, dropped ones behind them: the bank is the view
        # buffer[:k] while the radius is measured, so no [k, D] copy exists beside the buffer.
        perm = _partition_in_place(self._features, size, keep)
        position = np.empty(size, dtype=np.int64)
        position[perm] = np.arange(size)
        assigned = position[keep][assignment[perm]]
        bound = _exact_radius(features, features[:k], assigned, self._radii[:size][perm])
        # Then into pick order (a nested family: core.federated.prefix relies on it).
        rank = np.empty(size, dtype=np.int64)
        rank[keep] = np.arange(k)
        _to_pick_order_in_place(self._features, rank[perm[:k]])
        buffer, self._features, self._radii = self._features, None, None
        self._size, self._released = 0, True
        del features
        buffer.resize((k, buffer.shape[1]), refcheck=False)  # realloc: shrinks in place
        return IncrementalSelection(features=buffer, radius_bound=bound, num_seen=self.num_seen)

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
  smaller than anomalib's 244-dim sparse projection). ``projection="gaussian"`` gives the
  classic JL projection. Both are scaled to preserve the mean squared distance and come from a
  ``torch.Generator`` seeded by ``seed``, so the same input and seed give the same coreset
  (patchcore-inspection builds an unseeded ``nn.Linear`` on every call).
* **The start point is part of the coreset**, as farthest-first defines it (anomalib long left it
  out; its 2.7 KCenterGreedy includes it).
* **Memory O(N), never N x N.** We keep one running min-distance per point.
* **Triangle-inequality pruning.** Each point remembers its nearest center. A new center ``c`` can
  only move points of a cluster ``j`` whose radius ``R_j`` satisfies ``|c - c_j| < 2 R_j``; other
  clusters are skipped. Early picks touch every point (one memory-bound matrix-vector product over
  the projections), later picks only the clusters near ``c``. The selection order is exactly that of
  plain farthest-first (``tests/test_coreset.py`` checks it against a naive reference).
* **Radii are reported in the original feature space**, not in the projection, because they feed
  the federated coverage certificate (a projection distorts distances by 1 +- eps).

On CPU the loop runs in NumPy: on this kind of machine ``numpy.dot`` (OpenBLAS) computes the
[N x 128] @ [128] product about 6x faster than ``torch.mv``. On CUDA it runs in torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

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
# Recompute exact cluster radii after this many unpruned (full) passes; in between the stale radii
# are valid upper bounds (points only ever leave a cluster), so pruning stays correct.
_RADIUS_REFRESH_PERIOD = 16
# Leading projected coordinates used for the center-center lower bound.
_LEAD_DIMS = 16


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


ProjectionKind = Literal["pca", "gaussian"]

#: Rows sampled to fit the PCA projection (more adds cost, not quality, on CNN features).
PCA_SAMPLE_ROWS = 2048


@dataclass(frozen=True)
class Projection:
    """x -> (x - mean) @ matrix: [N, D] -> [N, d]; fitted once, then fixed for a selection."""

    mean: np.ndarray  # [D]
    matrix: np.ndarray  # [D, d]

    def apply(self, features: np.ndarray, *, block_rows: int = 16384) -> np.ndarray:
        """[N, D] -> [N, d] float32, in row blocks so the centred copy stays block-sized."""
        out = np.empty((features.shape[0], self.matrix.shape[1]), dtype=np.float32)
        mean = torch.from_numpy(self.mean)
        matrix = torch.from_numpy(self.matrix)
        # torch's matmul is ~2x faster than numpy's here; both are float32.
        for lo in range(0, features.shape[0], block_rows):
            block = torch.from_numpy(features[lo : lo + block_rows]) - mean
            torch.matmul(block, matrix, out=torch.from_numpy(out[lo : lo + block_rows]))
        return out


def fit_projection(
    features: np.ndarray,
    dim: int | None,
    seed: int,
    kind: ProjectionKind = "pca",
) -> Projection | None:
    """Fit the projection used to compare distances (None: compare in the original space).

    Args:
        features: [N, D] rows (a seeded sample of at most PCA_SAMPLE_ROWS is used for PCA).
        dim: target dimension; None or >= D means no projection.
        seed: seeds the row sample and the randomized SVD (PCA) or the matrix (Gaussian).
        kind: "pca" (default) or "gaussian".

    Both kinds are scaled so that the expected squared distance between rows is preserved:
    projected distances then live on the scale of original-space radii, which the incremental
    selector adds to them.
    """
    n, d_in = features.shape
    if kind not in ("pca", "gaussian"):
        raise ValueError(f"projection must be 'pca' or 'gaussian', got {kind!r}")
    if dim is None or dim >= d_in:
        return None
    if kind == "gaussian":
        matrix = projection_matrix(d_in, dim, seed).numpy()
        return Projection(np.zeros(d_in, dtype=np.float32), matrix)
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
    matrix = (basis * scale).contiguous().numpy().astype(np.float32)
    if matrix.shape[1] < dim:  # fewer sampled rows than dims: pad with zero directions
        matrix = np.pad(matrix, ((0, 0), (0, dim - matrix.shape[1])))
    return Projection(mean.numpy().astype(np.float32), matrix)


def _project(projection: Projection | None, features: np.ndarray) -> np.ndarray:
    return features if projection is None else projection.apply(features)


def _centred(rows: np.ndarray) -> np.ndarray:
    """``rows`` [N, d] float32 minus their mean (a new array; the mean accumulated in float64).

    Every distance below is |x|^2 - 2 x.c + |c|^2, which cancels catastrophically when the rows
    sit far from the origin compared with their spread: at an offset of 1000 float32 keeps no
    correct digit of a squared distance of about 1. Distances do not change under translation,
    so the rows are centred first; the cost is one copy of the (projected) rows.
    """
    return rows - rows.mean(axis=0, dtype=np.float64).astype(np.float32)


def farthest_first(
    points: np.ndarray,
    k: int,
    *,
    start: int = 0,
    radii: np.ndarray | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Farthest-first traversal on ``points`` [N, d] (float32), CPU, with exact pruning.

    Args:
        points: [N, d] rows to choose from (usually random projections).
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
    """
    n, dim = points.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} points, got {k}")
    if not 0 <= start < n:
        raise ValueError(f"start index {start} out of range for {n} points")
    points = _centred(points)
    sq_norms = np.einsum("ij,ij->i", points, points)
    centers = np.empty((k, dim), dtype=np.float32)
    center_sq = np.empty(k, dtype=np.float32)
    # The leading coordinates alone give a lower bound on center-center distances; with PCA
    # they carry most of the variance, so most far clusters are ruled out reading 16 of 128
    # values per center (the [t, d] scan per pick is O(k^2) overall: it dominates for k > 10^4).
    lead = min(dim, _LEAD_DIMS)
    lead_centers = np.empty((k, lead), dtype=np.float32)
    lead_sq = np.empty(k, dtype=np.float32)
    cluster_r2 = np.zeros(k, dtype=np.float32)  # squared radius bound of each center's cluster
    cluster_size = np.zeros(k, dtype=np.int64)
    assignment = np.zeros(n, dtype=np.int64)
    selected = np.empty(k, dtype=np.int64)
    scratch = np.empty(n, dtype=np.float32)

    is_selected = np.zeros(n, dtype=bool)
    # Chosen rows get -inf priority: their represented radius is already in the bank.
    bonus = None if radii is None else np.asarray(radii, dtype=np.float32).copy()
    if bonus is not None and bonus.shape != (n,):
        raise ValueError(f"radii must have shape ({n},), got {bonus.shape}")

    # Pick priority: min_d2 itself, or sqrt(min_d2) + radius kept up to date for the rows that
    # move (recomputing it for all rows on every pick was three O(N) passes per pick).
    priority: np.ndarray | None = None

    def refresh_priority(rows: np.ndarray | slice) -> None:
        if priority is not None and bonus is not None:
            priority[rows] = np.sqrt(np.maximum(min_d2[rows], 0.0)) + bonus[rows]

    def next_pick() -> int:
        best = int(min_d2.argmax()) if priority is None else int(priority.argmax())
        if is_selected[best]:
            # Everything left coincides with a chosen row (duplicates): any unchosen row will do.
            best = int(np.flatnonzero(~is_selected)[0])
        is_selected[best] = True
        if bonus is not None and priority is not None:
            bonus[best] = -np.inf
            priority[best] = -np.inf
        return best

    def distances_to(index: int, out: np.ndarray) -> np.ndarray:
        # |x|^2 - 2 x.c + |c|^2 in three passes (the -2 folded into the 128-vector); tiny negative
        # rounding results are harmless here: they only ever compare or get clamped below.
        np.dot(points, points[index] * -2.0, out=out)
        out += sq_norms
        out += sq_norms[index]
        return out

    is_selected[start] = True
    if bonus is not None:
        bonus[start] = -np.inf
    min_d2 = distances_to(start, np.empty(n, dtype=np.float32))
    min_d2[start] = 0.0
    if bonus is not None:
        priority = np.empty(n, dtype=np.float32)
        refresh_priority(slice(None))
    selected[0], centers[0], center_sq[0] = start, points[start], sq_norms[start]
    lead_centers[0] = points[start, :lead]
    lead_sq[0] = float(lead_centers[0] @ lead_centers[0])
    cluster_r2[0], cluster_size[0] = min_d2.max(), n
    full_passes_since_refresh = 0
    pick = next_pick()

    for t in range(1, k):
        if on_progress is not None and t % _PROGRESS_EVERY == 0:
            on_progress(t)
        selected[t], centers[t], center_sq[t] = pick, points[pick], sq_norms[pick]
        c = points[pick]
        c_lead = c[:lead]
        lead_centers[t] = c_lead
        lead_sq[t] = float(c_lead @ c_lead)
        # Cluster j can lose points to c only if |c - c_j| < 2 R_j (triangle inequality).
        limit = 4.0 * cluster_r2[:t] * (1.0 + _PRUNE_REL_SLACK) + 1e-6
        lower2 = lead_sq[:t] - 2.0 * (lead_centers[:t] @ c_lead) + lead_sq[t]
        maybe = np.flatnonzero(lower2 * (1.0 - _PRUNE_REL_SLACK) < limit)
        if 2 * maybe.size > t:  # the bound ruled out little: one dense pass is cheaper
            dc2 = center_sq[:t] - 2.0 * (centers[:t] @ c) + sq_norms[pick]
            candidate = dc2 < limit
        else:
            dc2 = center_sq[maybe] - 2.0 * (centers[maybe] @ c) + sq_norms[pick]
            candidate = np.zeros(t, dtype=bool)
            candidate[maybe[dc2 < limit[maybe]]] = True
        touched_points = int(cluster_size[:t][candidate].sum())
        if 2 * touched_points > n:
            # Most points may move: one dense pass is cheaper than gathering.
            dist = distances_to(pick, scratch)
            moved = np.flatnonzero(dist < min_d2)
            cluster_size[:t] -= np.bincount(assignment[moved], minlength=t)[:t]
            cluster_size[t] = moved.size
            min_d2[moved] = dist[moved]
            assignment[moved] = t
            min_d2[pick] = 0.0
            refresh_priority(moved)
            full_passes_since_refresh += 1
            if full_passes_since_refresh >= _RADIUS_REFRESH_PERIOD:
                cluster_r2[: t + 1] = 0.0
                np.maximum.at(cluster_r2, assignment, min_d2)
                full_passes_since_refresh = 0
            else:
                # Stale radii of the old clusters stay valid upper bounds (points only leave).
                cluster_r2[t] = min_d2[moved].max() if moved.size else 0.0
        else:
            rows = np.flatnonzero(candidate[assignment])
            dist = sq_norms[rows] - 2.0 * (points[rows] @ c) + sq_norms[pick]
            np.maximum(dist, 0.0, out=dist)
            better = dist < min_d2[rows]
            moved = rows[better]
            np.subtract.at(cluster_size, assignment[moved], 1)
            cluster_size[t] = moved.size
            min_d2[moved] = dist[better]
            assignment[moved] = t
            min_d2[pick] = 0.0
            refresh_priority(moved)
            # Exact radii for every cluster that could have changed.
            changed = np.flatnonzero(candidate)
            cluster_r2[changed] = 0.0
            cluster_r2[t] = 0.0
            np.maximum.at(cluster_r2, assignment[rows], min_d2[rows])
        pick = next_pick()
    return selected, assignment


def _farthest_first_torch(
    points: torch.Tensor,
    k: int,
    start: int,
    radii: np.ndarray | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Plain farthest-first on a (CUDA) tensor [N, d]: one fused ``addmv`` per pick.

    No pruning: on a GPU the dense pass is bandwidth-cheap and pruning's gathers would cost more.
    Same pick rule and ``radii`` priority as :func:`farthest_first` (ties aside).
    """
    n = points.shape[0]
    points = points - points.mean(dim=0, dtype=torch.float64).to(points.dtype)  # see _centred
    bonus = None
    if radii is not None:
        bonus = torch.as_tensor(radii, dtype=torch.float32, device=points.device).clone()
    sq_norms = (points * points).sum(dim=1)
    min_d2 = torch.full((n,), float("inf"), device=points.device)
    assignment = torch.zeros(n, dtype=torch.long, device=points.device)
    selected = torch.empty(k, dtype=torch.long, device=points.device)
    dist = torch.empty(n, device=points.device)
    pick = torch.tensor(start, device=points.device)
    for t in range(k):
        if on_progress is not None and t and t % _PROGRESS_EVERY == 0:
            on_progress(t)
        selected[t] = pick
        torch.addmv(sq_norms, points, points[pick], alpha=-2.0, out=dist)
        dist.add_(sq_norms[pick]).clamp_(min=0.0)
        assignment = torch.where(dist < min_d2, t, assignment)
        torch.minimum(min_d2, dist, out=min_d2)
        # -1 sticks (distances are >= 0), so a chosen row is never picked twice, even among
        # duplicates; keeping it a tensor op avoids a host sync per pick.
        min_d2[pick] = -1.0
        if bonus is None:
            pick = torch.argmax(min_d2)
        else:
            bonus[pick] = -torch.inf
            pick = torch.argmax(min_d2.clamp_min(0.0).sqrt() + bonus)
    return selected.cpu().numpy(), assignment.cpu().numpy()


def _nearest_distance(
    queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """Euclidean distance [Q] from each query row to its nearest bank row (one [Q, k] block).

    Callers pass rows already shifted into the bank's frame (see _centred): the expansion below
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
    b = torch.from_numpy(bank_array) - origin  # distances in the bank's frame: see _centred
    b_sq = torch.linalg.vector_norm(b, dim=1) ** 2
    radius = 0.0
    for lo in range(0, x.shape[0], chunk_rows):
        block = x[lo : lo + chunk_rows] - origin
        radius = max(radius, float(_nearest_distance(block, b, b_sq).max()))
    return radius


#: Picks between progress-bar updates (one Python call per 256 picks: nothing next to a pick).
_PROGRESS_EVERY = 256

_ROW_BLOCK = 8192  # rows per block of the [block, D] temporaries below


def _assigned_distances(features: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """[N] Euclidean |features[i] - features[chosen[i]]|, in row blocks (no [N, D] temporary)."""
    out = np.empty(features.shape[0], dtype=np.float32)
    for lo in range(0, features.shape[0], _ROW_BLOCK):
        diffs = features[lo : lo + _ROW_BLOCK] - features[chosen[lo : lo + _ROW_BLOCK]]
        out[lo : lo + _ROW_BLOCK] = np.sqrt(np.einsum("ij,ij->i", diffs, diffs))
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


def _exact_radius(
    features: np.ndarray,
    bank_indices: np.ndarray,
    assignment: np.ndarray,
    offsets: np.ndarray | None = None,
    bank: np.ndarray | None = None,
) -> float:
    """Exact max_i (min_j |x_i - x_bank_j| + offsets_i), touching few rows.

    ``upper[i] = |x_i - x_bank[assignment[i]]|`` bounds row i's true nearest-bank distance from
    above (the projection may have assigned it to a slightly farther member). Visiting rows by
    decreasing ``upper + offset`` and computing exact distances in blocks, we can stop as soon as
    the best exact value found is >= the next row's upper bound: no later row can exceed it.
    ``offsets`` (default 0) are the radii that rows already stand in for. ``bank`` may pass
    ``features[bank_indices]`` when the caller has it already (saves a [k, D] copy).
    """
    bank_array = features[bank_indices] if bank is None else bank
    # Distances in the bank's frame (see _centred); the subtraction makes a copy, so a ``bank``
    # passed in is not modified.
    origin = torch.from_numpy(bank_array.mean(axis=0, dtype=np.float64).astype(np.float32))
    bank_rows = torch.from_numpy(bank_array) - origin
    bank_sq = torch.linalg.vector_norm(bank_rows, dim=1) ** 2
    upper = _assigned_distances(features, bank_indices[assignment])
    if offsets is not None:
        upper += offsets
    order = np.argsort(-upper, kind="stable")
    radius = 0.0
    block = max(16, min(256, (1 << 22) // max(1, bank_rows.shape[0])))  # [block, k] <= 16 MiB
    for lo in range(0, order.size, block):
        if radius >= upper[order[lo]]:
            break
        rows = order[lo : lo + block]
        queries = torch.from_numpy(features[rows]) - origin
        exact = _nearest_distance(queries, bank_rows, bank_sq).numpy()
        if offsets is not None:
            exact = exact + offsets[rows]
        radius = max(radius, float(exact.max()))
    return radius


def greedy_coreset(
    features: np.ndarray | torch.Tensor,
    k: int,
    *,
    projection_dim: int | None = 128,
    projection: ProjectionKind = "pca",
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
        projection: "pca" (default) or "gaussian" (see the module docstring).
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
    projected = _project(fit_projection(array, projection_dim, seed, projection), array)
    indices, assignment = _run_farthest_first(projected, k, start, None, run_device)
    radius = _exact_radius(array, indices, assignment) if compute_radius else None
    return CoresetResult(indices=indices, radius=radius)


def _run_farthest_first(
    projected: np.ndarray,
    k: int,
    start: int,
    radii: np.ndarray | None,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    with progress_bar(k, f"coreset {k:,} of {projected.shape[0]:,} rows", "pick") as bar:
        def advance(picks: int) -> None:
            bar.update(picks - bar.n)

        if device.type == "cuda":
            return _farthest_first_torch(
                torch.from_numpy(projected).to(device), k, start, radii, advance
            )
        return farthest_first(projected, k, start=start, radii=radii, on_progress=advance)


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
        projection: ProjectionKind = "pca",
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
        return _run_farthest_first(
            _project(self._projection, buffered),
            k,
            start,
            radii if radii.any() else None,
            self.device,
        )

    def _reduce(self) -> None:
        """Buffer -> k rows; kept rows absorb the radius of the rows they now represent."""
        assert self._features is not None and self._radii is not None
        keep, assignment = self._farthest_first(self.k, self._reduce_generator)
        size = self._size
        features, radii = self._features[:size], self._radii[:size]
        # Original-space distance from every buffered row to the kept row it is assigned to.
        reach = _assigned_distances(features, keep[assignment]) + radii
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
        features = self._features[: self._size]
        if not release:
            selected = features[keep]  # fancy indexing: already a copy
            bound = _exact_radius(features, keep, assignment, self._radii[: self._size], selected)
            return IncrementalSelection(
                features=selected, radius_bound=bound, num_seen=self.num_seen
            )
        bound = _exact_radius(features, keep, assignment, self._radii[: self._size])
        _to_pick_order_in_place(self._features, _compact_in_place(self._features, keep))
        buffer, self._features, self._radii = self._features, None, None
        self._size, self._released = 0, True
        del features
        buffer.resize((k, buffer.shape[1]), refcheck=False)  # realloc: shrinks in place
        return IncrementalSelection(features=buffer, radius_bound=bound, num_seen=self.num_seen)

"""Aggregation strategies: how the server turns the sites' local coresets into one global bank.

All three take the sites' coresets as a list of [n_i, D] float32 arrays.

What a client weight means in each (weights are any non-negative numbers, one per site, e.g. the
sites' image counts; they are normalised to sum to 1 internally):

* :func:`federated_coreset_aggregation` -- **no effect on which rows are chosen.** Global
  selection is greedy k-center (farthest-first) over the union: it minimises the distance of the
  *worst-covered* uploaded patch, and a site's share of the data says nothing about how rare its
  normal patterns are. Weighting would let a big site crowd out a small site's rare-but-normal
  patches, the false positives federation exists to remove. The weights are validated and
  otherwise ignored, and the docstring and tests say so.
* :func:`federated_prefix_aggregation` -- the weights only size each site's **floor**: with
  ``floor_fraction`` f > 0, site i first keeps ceil(f x k x w_i / sum w) of its most separated
  rows (core.federated.allocation), so a compact site is never starved; the rest of the bank
  follows coverage (each site's rows down to one common separation, core.federated.prefix),
  not size. It is the selection :class:`~core.federated.aggregator.GlobalBankAggregator` makes
  by default (there with n_i = the sites' patch counts).
* :func:`federated_random_aggregation` -- the probability that a row is drawn is proportional to
  its site's weight divided by the number of rows that site sent, so each site's expected share
  of the bank is its weight (unweighted: every uploaded row is equally likely).
* :func:`federated_weighted_union` -- no selection; every row is kept, and row j of site i gets
  importance weight ``w_i / n_i`` (the weights of one site's rows sum to its normalised weight).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from core.coreset import IncrementalCoreset
from core.federated.prefix import PrefixMergeSelector
from core.federated.reservoir import WeightedReservoir

logger = logging.getLogger(__name__)

__all__ = [
    "federated_coreset_aggregation",
    "federated_prefix_aggregation",
    "federated_random_aggregation",
    "federated_weighted_union",
    "normalised_weights",
    "validate_coresets",
]


def validate_coresets(client_coresets: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Check the sites' coresets: a non-empty list of finite [n_i, D] arrays with one D."""
    if len(client_coresets) == 0:
        raise ValueError("no client coresets to aggregate")
    out: list[np.ndarray] = []
    dim: int | None = None
    for i, coreset in enumerate(client_coresets):
        array = np.asarray(coreset, dtype=np.float32)
        if array.ndim != 2:
            raise ValueError(f"client {i}: coreset must be [n, D], got shape {array.shape}")
        if dim is None:
            dim = array.shape[1]
        elif array.shape[1] != dim:
            raise ValueError(
                f"client {i}: feature dim {array.shape[1]} differs from client 0's {dim}; "
                "all sites must use the same feature extractor"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"client {i}: coreset contains NaN or inf")
        out.append(array)
    if sum(a.shape[0] for a in out) == 0:
        raise ValueError("all client coresets are empty")
    return out


def normalised_weights(client_weights: Sequence[float] | None, num_clients: int) -> np.ndarray:
    """[num_clients] float64 weights summing to 1 (uniform when None)."""
    if client_weights is None:
        return np.full(num_clients, 1.0 / num_clients)
    weights = np.asarray(client_weights, dtype=np.float64)
    if weights.shape != (num_clients,):
        raise ValueError(f"expected {num_clients} client weights, got {weights.tolist()}")
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(
            f"client weights must be finite, >= 0 and not all 0, got {weights.tolist()}"
        )
    return weights / weights.sum()


def _row_weights(coresets: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """[sum n_i] row weights w_i / n_i, renormalised over the sites that sent rows."""
    parts = [np.full(len(c), w / len(c)) for c, w in zip(coresets, weights, strict=True) if len(c)]
    row_weights = np.concatenate(parts)
    return row_weights / row_weights.sum()


def federated_coreset_aggregation(
    client_coresets: Sequence[np.ndarray],
    global_size: int,
    client_weights: Sequence[float] | None = None,
    *,
    seed: int = 0,
    projection_dim: int | None = 128,
    chunk_rows: int = 4096,
) -> np.ndarray:
    """Aggregate local coresets using global coreset selection (greedy k-center on the union).

    The union is streamed through :class:`~core.coreset.IncrementalCoreset` in chunks of
    ``chunk_rows``, the way the server consumes uploads, so memory stays ~2 x global_size rows
    however much the sites send. ``client_weights`` do not change the selection (module doc).

    Returns:
        [min(global_size, total rows), D] float32 global bank, in selection order.
    """
    coresets = validate_coresets(client_coresets)
    normalised_weights(client_weights, len(coresets))  # validate only: see the module docstring
    if global_size < 1:
        raise ValueError(f"global_size must be >= 1, got {global_size}")
    selector = IncrementalCoreset(global_size, projection_dim=projection_dim, seed=seed)
    for coreset in coresets:
        for lo in range(0, coreset.shape[0], chunk_rows):
            selector.add(coreset[lo : lo + chunk_rows])
    return selector.select().features


def federated_prefix_aggregation(
    client_coresets: Sequence[np.ndarray],
    global_size: int,
    client_weights: Sequence[float] | None = None,
    *,
    floor_fraction: float = 0.0,
) -> np.ndarray:
    """Aggregate local coresets by prefix merge (the aggregator's default server selection).

    Each coreset is one site's upload (``PatchCoreClient.train`` returns it). Every site first
    keeps its floor, ceil(floor_fraction x k x w_i / sum w) of its rows of largest separation
    (w_i: ``client_weights``, else the coresets' row counts: a site's coreset is a fixed
    fraction of its patches); then the rows of largest separation over all sites fill the
    bank (core.federated.allocation). floor_fraction 0: the plain k largest separations, and
    the weights change nothing.

    Returns:
        [min(global_size, total rows), D] float32 global bank, site by site in upload order.
    """
    coresets = validate_coresets(client_coresets)
    normalised_weights(client_weights, len(coresets))  # validate only: see the module docstring
    if global_size < 1:
        raise ValueError(f"global_size must be >= 1, got {global_size}")
    selector = PrefixMergeSelector(global_size, capacity=sum(len(c) for c in coresets),
                                   floor_fraction=floor_fraction)
    sizes = client_weights if client_weights is not None else [len(c) for c in coresets]
    total = float(sum(sizes))
    # Integer patch counts in proportion to the weights (the allocation takes counts).
    patches = {str(i): max(1, round(1e6 * float(w) / total)) if total > 0 else 1
               for i, w in enumerate(sizes)}
    for i, coreset in enumerate(coresets):
        selector.add(str(i), coreset)
    return selector.select(num_patches=patches).features


def federated_random_aggregation(
    client_coresets: Sequence[np.ndarray],
    global_size: int,
    client_weights: Sequence[float] | None = None,
    *,
    seed: int = 0,
) -> np.ndarray:
    """Aggregate by random sampling without replacement (the baseline).

    Row probabilities follow the module docstring; the rows go through the same
    :class:`~core.federated.reservoir.WeightedReservoir` the server uses on uploads, so this
    equals the streaming server's bank for the same seed and upload order.

    Returns:
        [min(global_size, rows with non-zero weight), D] float32 global bank.
    """
    coresets = validate_coresets(client_coresets)
    weights = normalised_weights(client_weights, len(coresets))
    if global_size < 1:
        raise ValueError(f"global_size must be >= 1, got {global_size}")
    reservoir = WeightedReservoir(global_size, seed=seed)
    for coreset, weight in zip(coresets, weights, strict=True):
        if len(coreset) and weight > 0:
            reservoir.add(coreset, weight / len(coreset))
    return reservoir.sample()


def federated_weighted_union(
    client_coresets: Sequence[np.ndarray],
    client_weights: Sequence[float] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted union without global selection: keep every row with an importance weight.

    Returns:
        (features [sum n_i, D] float32, row_weights [sum n_i] float64 summing to 1), rows in site
        order. Row weights are ``w_i / n_i`` for the rows of site i (module docstring).
    """
    coresets = validate_coresets(client_coresets)
    weights = normalised_weights(client_weights, len(coresets))
    # A site that sent nothing leaves its weight unassigned; renormalised over what was sent.
    return np.concatenate(coresets, axis=0), _row_weights(coresets, weights)

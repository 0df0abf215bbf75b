"""Split one dataset into per-site (client) datasets for federated simulations.

Every partitioner is a frozen, validated config with two methods:
``partition_indices(dataset) -> list[np.ndarray]`` (sorted int64 indices per client) and
``partition(dataset) -> list[AnomalyDataset]``. Partitions are disjoint, cover the dataset,
leave no client empty, and depend only on the dataset order and the seed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from core.data.dataset import AnomalyDataset

logger = logging.getLogger(__name__)


class Partitioner(Protocol):
    """Anything that splits a dataset into per-client datasets."""

    def partition(self, dataset: AnomalyDataset) -> list[AnomalyDataset]: ...


def _check_num_clients(num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


def _check_dataset(dataset: AnomalyDataset, num_clients: int) -> None:
    if len(dataset) < num_clients:
        raise ValueError(
            f"cannot give each of {num_clients} clients at least one image: the dataset has "
            f"only {len(dataset)} images"
        )


def _category_groups(dataset: AnomalyDataset) -> dict[str, np.ndarray]:
    """Category -> indices of its images (dataset order), categories in sorted order."""
    names = np.array([s.category for s in dataset], dtype=object)
    return {c: np.flatnonzero(names == c).astype(np.int64) for c in dataset.categories}


def _finish(parts: list[np.ndarray], dataset: AnomalyDataset, who: str) -> list[np.ndarray]:
    out = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    logger.info("%s: %d images -> client sizes %s", who, len(dataset), [len(p) for p in out])
    return out


@dataclass(frozen=True)
class CategoryPartitioner:
    """Each client gets whole categories, so sites differ in what they make (feature skew).

    Rule (deterministic, no randomness):

    * categories >= clients: every category goes to exactly one client. Categories are taken
      largest first (ties by name) and each is given to the client with the fewest images so far
      (ties: lowest client index); this balances the image counts and, as the first
      ``num_clients`` categories go to distinct empty clients, leaves no client empty.
    * categories < clients: every client gets part of exactly one category. Each category starts
      with one client; each remaining client is given to the category with the most images per
      client (ties: more images, then name). A category's images are dealt round-robin over its
      clients, which keeps their defect mix alike. Clients are ordered by category name.

    Either way each category is spread over as few clients as possible with no client empty.
    """

    num_clients: int = 5

    def __post_init__(self) -> None:
        _check_num_clients(self.num_clients)

    def partition_indices(self, dataset: AnomalyDataset) -> list[np.ndarray]:
        """Sorted int64 indices of each client's images; ``num_clients`` arrays."""
        _check_dataset(dataset, self.num_clients)
        groups = _category_groups(dataset)
        k = self.num_clients
        if len(groups) >= k:
            loads = [0] * k
            members: list[list[np.ndarray]] = [[] for _ in range(k)]
            for name in sorted(groups, key=lambda c: (-len(groups[c]), c)):
                client = min(range(k), key=lambda j: (loads[j], j))
                members[client].append(groups[name])
                loads[client] += len(groups[name])
            parts = [np.concatenate(m) for m in members]
        else:
            shares = dict.fromkeys(groups, 1)
            for _ in range(k - len(groups)):
                # A category can take at most one client per image; the dataset check above
                # guarantees some category still can.
                open_ = [c for c in groups if shares[c] < len(groups[c])]
                # max() keeps the first of equal keys and groups are in name order.
                name = max(open_, key=lambda c: (len(groups[c]) / shares[c], len(groups[c])))
                shares[name] += 1
            parts = []
            for name in sorted(groups):
                idx = groups[name]
                parts.extend(idx[j :: shares[name]] for j in range(shares[name]))
        return _finish(parts, dataset, f"CategoryPartitioner(num_clients={k})")

    def partition(self, dataset: AnomalyDataset) -> list[AnomalyDataset]:
        """One dataset per client (see the class docstring for the rule)."""
        return [dataset.subset(p) for p in self.partition_indices(dataset)]


@dataclass(frozen=True)
class IIDPartitioner:
    """Uniformly random split into near-equal clients (sizes differ by at most one)."""

    num_clients: int
    seed: int = 0

    def __post_init__(self) -> None:
        _check_num_clients(self.num_clients)
        _check_seed(self.seed)

    def partition_indices(self, dataset: AnomalyDataset) -> list[np.ndarray]:
        """Sorted int64 indices of each client's images; ``num_clients`` arrays."""
        _check_dataset(dataset, self.num_clients)
        rng = np.random.default_rng(self.seed)
        perm = rng.permutation(len(dataset))
        parts = np.array_split(perm, self.num_clients)
        return _finish(
            list(parts),
            dataset,
            f"IIDPartitioner(num_clients={self.num_clients}, seed={self.seed})",
        )

    def partition(self, dataset: AnomalyDataset) -> list[AnomalyDataset]:
        """One dataset per client."""
        return [dataset.subset(p) for p in self.partition_indices(dataset)]


@dataclass(frozen=True)
class DirichletPartitioner:
    """Label skew over categories: each category's images are split by Dirichlet proportions.

    For each category (sorted by name) the client proportions are drawn from
    Dirichlet(alpha, ..., alpha) and the category's shuffled images are cut at those cumulative
    proportions. Small alpha (e.g. 0.1) puts most of a category on one or two clients; large
    alpha (e.g. 100) approaches an even split.

    No empty client: a Dirichlet draw can leave a client with nothing, so afterwards, while a
    client is empty, it is given one image taken from the currently largest client (ties:
    lowest index; the image that client received last). This moves at most ``num_clients - 1``
    images and so barely changes the skew, unlike redrawing until every client is non-empty,
    which is unbounded for small alpha.
    """

    num_clients: int
    alpha: float
    seed: int = 0

    def __post_init__(self) -> None:
        _check_num_clients(self.num_clients)
        _check_seed(self.seed)
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, int | float)
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")

    def partition_indices(self, dataset: AnomalyDataset) -> list[np.ndarray]:
        """Sorted int64 indices of each client's images; ``num_clients`` arrays."""
        _check_dataset(dataset, self.num_clients)
        k = self.num_clients
        rng = np.random.default_rng(self.seed)
        members: list[list[int]] = [[] for _ in range(k)]
        for idx in _category_groups(dataset).values():
            shuffled = rng.permutation(idx)
            proportions = rng.dirichlet(np.full(k, float(self.alpha)))
            cuts = np.floor(np.cumsum(proportions)[:-1] * len(shuffled)).astype(np.int64)
            for client, piece in enumerate(np.split(shuffled, cuts)):
                members[client].extend(piece.tolist())
        # Terminates within k steps: with >= k images in all, the largest client has >= 2
        # whenever some client is empty, so a donor never becomes empty itself.
        while True:
            empty = [j for j in range(k) if not members[j]]
            if not empty:
                break
            donor = max(range(k), key=lambda j: (len(members[j]), -j))
            members[empty[0]].append(members[donor].pop())
        return _finish(
            [np.asarray(m, dtype=np.int64) for m in members],
            dataset,
            f"DirichletPartitioner(num_clients={k}, alpha={self.alpha}, seed={self.seed})",
        )

    def partition(self, dataset: AnomalyDataset) -> list[AnomalyDataset]:
        """One dataset per client."""
        return [dataset.subset(p) for p in self.partition_indices(dataset)]

"""Server selection by merging the sites' farthest-first prefixes ("prefix merge").

A site's local coreset arrives in farthest-first pick order, and a prefix of a farthest-first
order is itself the site's farthest-first coreset of that size, selected over *all* its patches.
Row t's *separation* s_t (its distance to the site's earlier rows) is the distance at which the
site picked it: about the coverage radius of the prefix before it. Keeping the k uploaded rows
with the largest separations (all sites together) therefore keeps, for every site, a prefix
chosen to the same common radius: a site whose patches are more diverse keeps more rows, and no
row is re-selected from the union of local selections.

Why not farthest-first again over the union (the old server selection): the union of local
coresets has already lost the density of the patches (every region is represented at spacing
r_i, however many patches it held), and a second farthest-first pass over it prefers the
periphery of what is left, so common normal patterns end up covered more coarsely than a
single selection over all patches would cover them (larger mean patch distance and realised
radius on every partition of benchmarks/realistic_parity.py; issue 11 measured up to 0.03 image
AUROC lost on its data). The prefix merge meets that benchmark's parity bar on every category,
metric and partition (docs/performance.md, "Federated parity on realistic data").

Certificate: the server holds every uploaded row, so it reports r_S exactly: the largest
distance from any uploaded row to the bank (Euclidean, original space). Every site patch lies
within r_i of the site's upload, so max_i r_i + r_S still bounds every training patch.

Memory: all uploaded rows are buffered (the selection needs every row's separation, and r_S is
measured on them), bounded by ``capacity`` rows; more raises :class:`CapacityError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from core.coreset import coverage_radius

logger = logging.getLogger(__name__)

__all__ = ["CapacityError", "PrefixMergeSelector", "PrefixSelection", "prefix_separations"]

_QUERY_BLOCK = 1024  # query rows per [block, n] distance block (4 MiB per 1,000 columns)


class CapacityError(ValueError):
    """More rows were uploaded than the prefix-merge buffer may hold."""


def prefix_separations(
    rows: np.ndarray, previous: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Separation of each row from the rows before it (and from ``previous``).

    Args:
        rows: [n, D] float32, one site's upload in its pick order.
        previous: [m, D] float32 rows the site uploaded before (earlier chunks or rounds), or None.

    Returns:
        (separations [n] float32, Euclidean: s_t = min over earlier rows and ``previous``;
        inf for the very first row of a site; parents [n] int64: index of the nearest earlier
        row in the concatenation (previous, rows), -1 for the first row).
        Cost: n x (m + n / 2) x D multiply-adds in blocks of 1,024 query rows.
    """
    x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    before = (
        torch.from_numpy(np.ascontiguousarray(previous, dtype=np.float32))
        if previous is not None and previous.shape[0]
        else x[:0]
    )
    everything = torch.cat([before, x]) if before.shape[0] else x
    # Centre first: |x|^2 - 2 x.c + |c|^2 cancels catastrophically in float32 when rows sit far
    # from the origin compared with their spread (see core.coreset._frame_origin); distances do not
    # change under translation.
    m, n = before.shape[0], x.shape[0]
    everything = everything - everything.mean(dim=0, dtype=torch.float64).to(torch.float32)
    x = everything[m:]
    everything_sq = (everything * everything).sum(1)
    separations = np.empty(n, dtype=np.float32)
    parents = np.empty(n, dtype=np.int64)
    for lo in range(0, n, _QUERY_BLOCK):
        hi = min(lo + _QUERY_BLOCK, n)
        # Columns up to m + hi; a row t only looks at columns < m + t (its earlier rows).
        cols = m + hi
        d2 = (
            (x[lo:hi] * x[lo:hi]).sum(1, keepdim=True)
            - 2.0 * x[lo:hi] @ everything[:cols].T
            + everything_sq[:cols]
        )
        t = torch.arange(lo, hi).unsqueeze(1)
        d2.masked_fill_(torch.arange(cols).unsqueeze(0) >= m + t, float("inf"))
        best, arg = d2.min(dim=1)
        separations[lo:hi] = best.clamp_min(0.0).sqrt().numpy()
        parents[lo:hi] = arg.numpy()
    first = np.isinf(separations)
    parents[first] = -1
    return separations, parents


@dataclass(frozen=True)
class PrefixSelection:
    """features [k, D] float32; radius_bound: exact max distance of every uploaded row to the
    bank (Euclidean); num_seen: rows uploaded so far; rows_kept: per site, rows in the bank."""

    features: np.ndarray
    radius_bound: float
    num_seen: int
    rows_kept: dict[str, int]


class PrefixMergeSelector:
    """Buffer the sites' uploads (each in pick order) and keep the k most separated rows.

    Args:
        k: bank size.
        capacity: most rows buffered over all sites and rounds (memory: capacity x D x 4 B).
    """

    def __init__(self, k: int, *, capacity: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.k = k
        self.capacity = capacity
        self._rows: dict[str, list[np.ndarray]] = {}
        self._separations: dict[str, list[np.ndarray]] = {}
        self._reference: np.ndarray | None = None  # the bank the current round started from
        self._round_rows: dict[str, list[np.ndarray]] = {}
        self.num_seen = 0

    def start_round(self, bank: np.ndarray | None) -> None:
        """A new round: later rows are measured against ``bank`` (the bank the sites were sent)
        and the site's earlier rows of this round, not against its earlier rounds' uploads.

        A later round uploads the site's patches the bank covers worst; their distance to the
        bank is what they add. (Measured against the site's own round-1 upload, which covers
        every site patch to r_i, they would never outrank a kept row.)
        """
        self._reference = None if bank is None else np.ascontiguousarray(bank, np.float32)
        self._round_rows = {}

    def add(self, site_id: str, rows: np.ndarray) -> None:
        """Append [n, D] rows to ``site_id``'s stream (its pick order continues across calls).

        Separation of a row: its distance to the site's earlier rows (round 1) or to the
        round's starting bank and the site's earlier rows of this round (see start_round).
        """
        batch = np.ascontiguousarray(rows, dtype=np.float32)
        if batch.ndim != 2:
            raise ValueError(f"rows must be [n, D], got shape {batch.shape}")
        if batch.shape[0] == 0:
            return
        if not np.isfinite(batch).all():
            raise ValueError(f"site {site_id!r}: rows contain NaN or inf")
        if self.num_seen + batch.shape[0] > self.capacity:
            raise CapacityError(
                f"site {site_id!r}: {batch.shape[0]} more rows would exceed the prefix-merge "
                f"buffer of {self.capacity} rows ({self.num_seen} held); raise buffer_rows or "
                "have the sites send less (about 2-3 x their share of the global bank suffices)"
            )
        if self._reference is None:
            previous_parts = self._rows.get(site_id, [])
        else:
            previous_parts = [self._reference, *self._round_rows.get(site_id, [])]
        previous = np.concatenate(previous_parts) if previous_parts else None
        separations, _ = prefix_separations(batch, previous)
        self._rows.setdefault(site_id, []).append(batch)
        self._round_rows.setdefault(site_id, []).append(batch)
        self._separations.setdefault(site_id, []).append(separations)
        self.num_seen += batch.shape[0]

    def select(self, k: int | None = None) -> PrefixSelection:
        """The ``k`` rows (default the constructor's) of largest separation, with exact r_S."""
        k = self.k if k is None else k
        if self.num_seen == 0:
            raise ValueError("no rows were added; nothing to select from")
        # Sites in id order, not arrival order: the bank must not depend on which site's first
        # chunk reached the server first (ties between sites then go to the smaller site id).
        sites = sorted(self._rows)
        rows = np.concatenate([np.concatenate(self._rows[s]) for s in sites])
        separations = np.concatenate([np.concatenate(self._separations[s]) for s in sites])
        owner = np.concatenate(
            [np.full(sum(p.shape[0] for p in self._rows[s]), i) for i, s in enumerate(sites)]
        )
        # Largest separation first; ties (inf first rows, duplicates) in upload order.
        order = np.argsort(-separations, kind="stable")
        keep = np.sort(order[: min(k, rows.shape[0])])
        bank = rows[keep]
        # Exact r_S: every uploaded row's distance to the bank (rows in the bank: 0).
        radius = coverage_radius(rows, bank) if keep.size < rows.shape[0] else 0.0
        kept = np.bincount(owner[keep], minlength=len(sites))
        logger.info(
            "prefix merge: %d of %d rows kept (%s), r_S = %.4f",
            keep.size, rows.shape[0], dict(zip(sites, kept.tolist(), strict=True)), radius,
        )
        return PrefixSelection(
            features=bank,
            radius_bound=radius,
            num_seen=self.num_seen,
            rows_kept=dict(zip(sites, kept.tolist(), strict=True)),
        )

"""r_S for the prefix merge: a chain bound in O(N), then exact refinement of the few rows it
leaves above the radius found so far.

Every uploaded row u was compared, when it arrived, with a few earlier rows (its *edges*: the
nearest candidates its search found, core.federated.prefix), and the exact original-space
distance to each was kept. If c is an edge of u, the triangle inequality gives

    dist(u, bank) <= |u - c| + dist(c, bank),

in both directions along the edge. Starting from 0 on the bank's rows and +inf elsewhere,
relaxing every edge both ways (:func:`chain_bounds`, synchronous sweeps until nothing changes)
gives every row an upper bound B(u): the length of the shortest edge path from u to a bank row.
Any state of the sweeps is a valid bound (each value is the length of a real path), so
stopping early only loosens it. Cost: O(edges) per sweep, a few sweeps.

B is an upper bound, typically 1-2 x the exact distance (an edge path detours through dropped
rows). :func:`refine_radius` turns it into the exact r_S = max_u dist(u, bank) while touching
few rows, as core.coreset's exact radius does: rows are visited by decreasing B; each visited
row's bound is tightened by its exact distance to the ``_GUESSES`` bank rows nearest to it in
the projection (a cell index over the bank); rows still above the exact radius found so far
get a deeper look (``_DEEP_GUESSES`` rows over ``_DEEP_PROBES`` x the cells), and those still
above it the full [rows, k] x D check, largest bound first, in small groups, so that the radius
they raise settles the rest. Once the largest remaining bound is <= the radius found, every
row is settled and that radius is the exact maximum. The full checks have a budget (rows); past
it the largest bound left is reported instead, still valid but no longer exact. Every value
involved is a float32 distance measured as a direct difference, or a sum of them: the result
holds up to that rounding (relative ~1e-7).

All of it is torch on the selector's device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from core.federated.cells import CellIndex, FlatIndex, num_cells_for

logger = logging.getLogger(__name__)

__all__ = ["BankDistances", "RadiusResult", "chain_bounds", "exact_distances", "refine_radius"]

#: Sweeps of the chain relaxation before it stops anyway (it stops as soon as nothing changes;
#: any sweep count gives a valid bound).
MAX_SWEEPS = 64
#: Bank rows nearest in the projection whose exact distance tightens a visited row's bound.
_GUESSES = 8
#: Rows per tightening block (one bank-index search each).
_TIGHTEN_BLOCK = 2048
#: Rows per full exact check, and rows collected before the checks run (as core.coreset).
_SETTLE_ROWS = 32
_SETTLE_BATCH = 128
#: Bank rows per block of the full check ([rows, block] temporaries).
_BANK_BLOCK = 16384
#: Rows sampled to choose the frame of the exact distances.
_FRAME_SAMPLE = 4096
#: Before a row gets the full check: bank rows nearest in the projection (over this many
#: times the usual cells) whose exact distance may still settle it.
_DEEP_GUESSES = 64
_DEEP_PROBES = 4


def exact_distances(
    originals: torch.Tensor, source: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """[b, r] exact Euclidean |originals[i] - source[candidates[i, j]]|, inf where the
    candidate is -1 (a direct difference: no cancellation far from the origin). One reused
    [b, D] buffer: 1.5 x faster than a fresh gather and difference per column."""
    out = torch.empty(candidates.shape, dtype=torch.float32, device=originals.device)
    buffer = torch.empty_like(originals)
    for j in range(candidates.shape[1]):
        column = candidates[:, j]
        torch.index_select(source, 0, column.clamp_min(0), out=buffer)
        buffer.sub_(originals)
        out[:, j] = torch.where(column >= 0, torch.linalg.vector_norm(buffer, dim=1), math.inf)
    return out


def chain_bounds(
    num_rows: int,
    bank_rows: torch.Tensor,
    edge_ids: torch.Tensor,
    edge_distances: torch.Tensor,
    *,
    max_sweeps: int = MAX_SWEEPS,
) -> tuple[torch.Tensor, int]:
    """Upper bound [num_rows] on each row's distance to the bank, by edge paths.

    Args:
        num_rows: rows 0 .. num_rows - 1.
        bank_rows: [k] int64 rows in the bank (bound 0).
        edge_ids: [num_rows, e] int64 other row of each edge, -1 for none.
        edge_distances: [num_rows, e] float32 exact original-space length of each edge.
        max_sweeps: stop after this many sweeps even if bounds still fall.

    Returns:
        (bounds [num_rows] float32, +inf for rows no edge path joins to the bank; sweeps run).
        Synchronous sweeps with min reductions: the result does not depend on how rows are
        numbered.
    """
    device = edge_ids.device
    bounds = torch.full((num_rows,), math.inf, dtype=torch.float32, device=device)
    bounds[bank_rows] = 0.0
    valid = edge_ids >= 0
    source = torch.arange(num_rows, device=device).unsqueeze(1).expand_as(edge_ids)[valid]
    target = edge_ids[valid]
    length = edge_distances[valid]
    ends = torch.cat([source, target])  # both directions: u <- c and c <- u
    starts = torch.cat([target, source])
    lengths = torch.cat([length, length])
    sweeps = 0
    while sweeps < max_sweeps:
        sweeps += 1
        relaxed = bounds.scatter_reduce(0, ends, lengths + bounds[starts], "amin")
        if torch.equal(relaxed, bounds):
            break
        bounds = relaxed
    return bounds, sweeps


def frame_origin(rows: torch.Tensor) -> torch.Tensor | None:
    """torch twin of core.coreset._frame_origin, on at most ``_FRAME_SAMPLE`` evenly spaced
    rows of ``rows`` [n, D]: their mean when the rows sit far from the origin compared with
    their spread (where |x|^2 - 2 x.c + |c|^2 cancels in float32), else None. Any origin near
    the rows removes the cancellation; a sample finds one without reading all n rows."""
    step = max(1, rows.shape[0] // _FRAME_SAMPLE)
    sample = rows[::step].double()
    mean = sample.mean(dim=0)
    offset2 = float(mean @ mean)
    mean_sq = float((sample * sample).sum(1).mean())
    return mean.to(torch.float32) if offset2 > 0.5 * (mean_sq - offset2) else None


class BankDistances:
    """Exact Euclidean distance from rows to their nearest row of ``bank`` [k, D]: one full
    [rows, k] x D product, in blocks. Prepared on first use: the frame (see
    :func:`frame_origin`; far from the origin a centred copy of the bank is made, k x D
    float32, since every check reads the whole bank) and the bank rows' squared norms."""

    def __init__(self, bank: torch.Tensor) -> None:
        self.bank = bank
        self._origin: torch.Tensor | None = None
        self._centred: torch.Tensor | None = None
        self._sq: torch.Tensor | None = None

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """[n] exact distance from each of ``rows`` [n, D] to its nearest bank row.

        The nearest row is found with the expansion |q|^2 - 2 q.b + |b|^2 (a GEMM), whose
        float32 rounding (relative ~1e-5 of |q|^2 in the frame) could put the minimum a
        little *below* the true distance; the distance returned is re-measured as a direct
        difference to that row, a true distance to a bank row, so never below the minimum
        by more than the rounding of one norm (relative ~1e-7).
        """
        if self._sq is None:
            self._origin = frame_origin(self.bank)
            self._centred = self.bank if self._origin is None else self.bank - self._origin
            self._sq = (self._centred * self._centred).sum(1)
        assert self._centred is not None
        queries = rows if self._origin is None else rows - self._origin
        best = torch.full((rows.shape[0],), math.inf, dtype=torch.float32, device=rows.device)
        nearest = torch.zeros(rows.shape[0], dtype=torch.int64, device=rows.device)
        for lo in range(0, self._centred.shape[0], _BANK_BLOCK):
            d2 = torch.addmm(self._sq[lo : lo + _BANK_BLOCK], queries,
                             self._centred[lo : lo + _BANK_BLOCK].T, alpha=-2.0)
            value, where = d2.min(dim=1)
            closer = value < best
            best = torch.where(closer, value, best)
            nearest = torch.where(closer, where + lo, nearest)
        return torch.linalg.vector_norm(rows - self.bank[nearest], dim=1)


@dataclass(frozen=True)
class RadiusResult:
    """radius: a valid upper bound on max over rows of the distance to the bank (Euclidean,
    original space); exact: True when it is the exact maximum (refinement finished within its
    budget); chain_radius: max of the chain bounds before refinement; tightened: rows whose
    bound was tightened by guesses; exact_checks: rows given the full [1, k] x D check."""

    radius: float
    exact: bool
    chain_radius: float
    tightened: int
    exact_checks: int


def refine_radius(
    bounds: torch.Tensor,
    visit_order: torch.Tensor,
    rows: Callable[[torch.Tensor], torch.Tensor],
    projected: Callable[[torch.Tensor], torch.Tensor],
    bank: torch.Tensor,
    bank_projected: torch.Tensor,
    *,
    flat_below: int,
    max_exact_rows: int,
) -> RadiusResult:
    """Exact max over rows of the distance to ``bank``, from upper bounds that are mostly tight.

    Args:
        bounds: [N] valid upper bounds (0 for bank rows; :func:`chain_bounds`).
        visit_order: [N] int64 row numbers by decreasing bound (ties in a fixed order, so the
            rows checked, hence the result, do not depend on how rows are numbered).
        rows: row numbers [n] -> their original rows [n, D] (float32, on the device).
        projected: row numbers [n] -> their projections [n, d] in ``bank_projected``'s frame.
        bank: [k, D] float32. bank_projected: [k, d] its projections.
        flat_below: banks of at most this many rows are searched exhaustively, larger ones
            through a CellIndex.
        max_exact_rows: most rows given the full check; past it the radius reported is the
            largest bound left (valid, ``exact`` False).

    Returns:
        RadiusResult.
    """
    chain = float(bounds.max()) if bounds.numel() else 0.0
    k = bank.shape[0]
    ordered = bounds[visit_order]
    live = int((ordered > 0).sum())  # bank rows and exact duplicates of them are settled
    if live == 0:
        return RadiusResult(0.0, True, chain, 0, 0)
    ids = torch.arange(k, device=bank.device)
    index: CellIndex | FlatIndex = (
        FlatIndex(bank_projected, ids) if k <= flat_below
        else CellIndex(bank_projected, ids, num_cells=num_cells_for(k))
    )
    nearest = BankDistances(bank)
    radius = 0.0
    tightened = checks = 0
    pending_rows: list[torch.Tensor] = []
    pending_bounds: list[torch.Tensor] = []
    waiting = 0
    exhausted = False  # the full-check budget ran out: the radius becomes a bound

    def tighten(block: torch.Tensor, upper: torch.Tensor, guesses: int,
                probes: int | None) -> torch.Tensor:
        """min(upper, exact distance to the ``guesses`` bank rows nearest in the projection)."""
        _, guess = index.search(projected(block), min(guesses, k), probes=probes)
        return torch.minimum(upper, exact_distances(rows(block), bank, guess).min(dim=1).values)

    def settle() -> None:
        nonlocal radius, checks, exhausted, waiting
        waiting = 0
        if not pending_rows:
            return
        group_rows, group_bounds = torch.cat(pending_rows), torch.cat(pending_bounds)
        pending_rows.clear()
        pending_bounds.clear()
        keep = group_bounds > radius
        group_rows, group_bounds = group_rows[keep], group_bounds[keep]
        if group_rows.numel() == 0:
            return
        # A deeper look in the projection before the full check (cheap next to it: a full
        # check reads the whole bank).
        probes = None if isinstance(index, FlatIndex) else index.probes * _DEEP_PROBES
        group_bounds = tighten(group_rows, group_bounds, _DEEP_GUESSES, probes)
        keep = group_bounds > radius
        group_rows, group_bounds = group_rows[keep], group_bounds[keep]
        order = torch.sort(group_bounds, descending=True, stable=True).indices
        group_rows, group_bounds = group_rows[order], group_bounds[order]
        values = group_bounds.tolist()
        for lo in range(0, len(values), _SETTLE_ROWS):
            if radius >= values[lo]:
                break
            if checks >= max_exact_rows:
                exhausted = True
                radius = max(radius, values[lo])  # every row left is within its own bound
                break
            part = group_rows[lo : lo + _SETTLE_ROWS]
            exact = nearest(rows(part))
            checks += part.numel()
            radius = max(radius, float(exact.max()))

    lo = 0
    first = True
    while lo < live and not exhausted:
        if radius >= float(ordered[lo]):
            break
        size = _SETTLE_ROWS if first else _TIGHTEN_BLOCK
        block = visit_order[lo : min(lo + size, live)]
        block_bounds = ordered[lo : min(lo + size, live)]
        lo += block.numel()
        keep = block_bounds > radius
        block, block_bounds = block[keep], block_bounds[keep]
        if block.numel() == 0:
            continue
        tight = tighten(block, block_bounds, _GUESSES, None)
        tightened += block.numel()
        above = tight > radius
        pending_rows.append(block[above])
        pending_bounds.append(tight[above])
        waiting += int(above.sum())
        if first or waiting >= _SETTLE_BATCH:
            settle()
        first = False
    if not exhausted:
        settle()
    if exhausted:
        # Rows never visited keep their chain bound, pending ones their tightened bound.
        rest = [float(ordered[lo])] if lo < live else []
        rest += [float(b.max()) for b in pending_bounds if b.numel()]
        radius = max([radius, *rest])
    return RadiusResult(radius, not exhausted, chain, tightened, checks)


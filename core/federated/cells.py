"""Approximate nearest-row search in a low-dimensional projection, in torch on any device.

The prefix merge (core.federated.prefix) needs, for every uploaded row, a few *near* earlier
rows (its parent candidates) and, when it certifies r_S, a few bank rows near a poorly covered
row. Exact nearest neighbours in 1024-d cost O(n) per row (O(n^2 D) per site); candidates only
have to be good, because every distance that enters a separation or a bound is recomputed
exactly in the original space afterwards. So candidates are found here, in a projection of
d = 32 dimensions, by one of two searches with the same interface:

* :func:`exhaustive_topk`: every member, one GEMM per block (the GPU's choice, and the CPU's
  for small sets);
* :class:`CellIndex`: an inverted file (IVF). Centroids are members taken at evenly spaced
  positions of the member order (deterministic, and density-proportional when the order is
  random; a farthest-first order spreads them like a k-center); every member belongs to its
  nearest centroid's cell; a query scans the members of its ``probes`` nearest cells. Members
  are stored sorted by cell, so a cell is a contiguous slice and one block of queries costs one
  [queries, cells] GEMM plus, per probed cell, one small GEMM into a shared buffer, and a few
  top-ks over small arrays (see CellIndex._search): O(n^0.5) work per query, n / cells ~ n^0.5.
  On the CPU, torch's top-k (~7 ns per element, ~0.4 us per row) and not the GEMMs is the cost
  to avoid: :func:`smallest` gets the same result from group minima.

Distances here are *partial* squared distances |m|^2 - 2 q.m: the query's own |q|^2 is the same
for every member, so rankings need no more (callers add |q|^2 where they compare queries).
Both searches are deterministic for given inputs (the same tensors give the same candidates),
which the server's interleaving invariance relies on.
"""

from __future__ import annotations

import math

import torch

__all__ = ["CellIndex", "FlatIndex", "exhaustive_topk", "num_cells_for", "smallest"]

#: Members per GEMM block of the exhaustive search ([queries, block] float32 temporaries).
_MEMBER_BLOCK = 32768
#: Rows per block when members are assigned to cells ([block, cells] temporaries).
_ASSIGN_BLOCK = 8192
#: Columns per strided group whose minimum stands for it in a search (see CellIndex._search).
_GROUP = 8
#: Most float32 elements of a search's [slots, width] buffers, counting every slot at the
#: widest cell's width (256 MiB; met only where a cell is degenerate): larger query batches
#: are searched in parts.
_BUFFER_ELEMENTS = 1 << 26


def num_cells_for(members: int) -> int:
    """Cells of an index over ``members`` rows: 2 sqrt(n), at least 1, at most 4,096.

    Cells of about sqrt(n) / 2 members make the centroid scan and the cell scans of a query
    cost about the same (both O(sqrt n)).
    """
    return max(1, min(4096, round(2.0 * math.sqrt(members))))


def smallest(values: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``r`` smallest entries of each row of ``values`` [n, m]: (values [n, r] ascending,
    column indices [n, r]), padded with (inf, 0) when m < r. Ties: any of the tied columns.

    Same result as ``values.topk(r, largest=False)``, about 5 x cheaper on wide rows on a CPU,
    where torch's top-k costs ~7 ns per element (a minimum ~0.4 ns): the columns are split into
    ``_GROUP`` strided groups, the r groups of smallest minimum are found, and the r smallest
    are among their members (each of r smaller group minima is a smaller entry).
    """
    n, m = values.shape
    if m <= 2 * _GROUP * max(r, 1):
        top_v, top_i = values.topk(min(r, m), dim=1, largest=False)
        return _pad_topk(top_v, top_i, r)
    g = _GROUP
    groups = math.ceil(m / g)
    if groups * g != m:
        values = torch.nn.functional.pad(values, (0, groups * g - m), value=math.inf)
    minima = values.view(n, g, groups).amin(dim=1)  # group j: columns j, j + groups, ...
    best = min(r, groups)
    _, chosen = minima.topk(best, dim=1, largest=False)  # [n, best]
    columns = (chosen.unsqueeze(2) + groups * torch.arange(g, device=values.device)).reshape(
        n, best * g)
    top_v, pick = values.gather(1, columns).topk(r, dim=1, largest=False)
    return top_v, columns.gather(1, pick)


def _pad_topk(values: torch.Tensor, indices: torch.Tensor, r: int) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """Pad [q, r'] top-k results to r columns (inf / index 0) when fewer than r existed."""
    short = r - values.shape[1]
    if short <= 0:
        return values, indices
    return (
        torch.nn.functional.pad(values, (0, short), value=math.inf),
        torch.nn.functional.pad(indices, (0, short), value=0),
    )


def exhaustive_topk(
    queries: torch.Tensor, members: torch.Tensor, members_sq: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``r`` members of smallest partial squared distance to each query, by brute force.

    Args:
        queries: [q, d]; members: [m, d]; members_sq: [m] squared norms of ``members``.
        r: candidates per query.

    Returns:
        (partial d2 [q, r] = |m|^2 - 2 q.m, ascending per row, inf where fewer than r members;
        member positions [q, r] int64, meaningful only where the value is finite).
    """
    q = queries.shape[0]
    best_v = torch.full((q, r), math.inf, dtype=queries.dtype, device=queries.device)
    best_i = torch.zeros((q, r), dtype=torch.int64, device=queries.device)
    for lo in range(0, members.shape[0], _MEMBER_BLOCK):
        hi = min(lo + _MEMBER_BLOCK, members.shape[0])
        d2 = torch.addmm(members_sq[lo:hi], queries, members[lo:hi].T, alpha=-2.0)
        v, i = smallest(d2, r)
        i += lo
        if lo == 0:
            best_v, best_i = v, i
            continue
        best_v, pick = torch.cat([best_v, v], dim=1).topk(r, dim=1, largest=False)
        best_i = torch.cat([best_i, i], dim=1).gather(1, pick)
    return best_v, best_i


class FlatIndex:
    """:func:`exhaustive_topk` behind :class:`CellIndex`'s interface: members [n, d], payload
    ids [n]; every query scans every member."""

    def __init__(self, points: torch.Tensor, ids: torch.Tensor) -> None:
        if ids.shape != (points.shape[0],):
            raise ValueError(f"ids must be [{points.shape[0]}], got {tuple(ids.shape)}")
        self._members = points
        self._members_sq = (points * points).sum(1)
        self._ids = ids

    def __len__(self) -> int:
        return self._members.shape[0]

    def search(self, queries: torch.Tensor, r: int, *, probes: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`CellIndex.search`, over every member (``probes`` has no effect)."""
        if self._members.shape[0] == 0:
            return (queries.new_full((queries.shape[0], r), math.inf),
                    torch.full((queries.shape[0], r), -1, dtype=torch.int64,
                               device=queries.device))
        values, positions = exhaustive_topk(queries, self._members, self._members_sq, r)
        return values, torch.where(torch.isfinite(values), self._ids[positions], -1)


class CellIndex:
    """An inverted-file index over ``points`` [n, d] with payload ``ids`` [n] (any int64).

    Args:
        points: [n, d] float32 members (any device; the index lives there).
        ids: [n] int64 payload returned by :meth:`search` for each member.
        num_cells: centroids, taken at positions (i + 1/2) n / num_cells of ``points``.
        probes: cells a query scans.
        scan_cap: most members scanned per probed cell (the first ones in member order): bounds
            the cost where a cell is degenerate (e.g. thousands of duplicate rows).
    """

    def __init__(
        self,
        points: torch.Tensor,
        ids: torch.Tensor,
        *,
        num_cells: int,
        probes: int = 8,
        scan_cap: int = 16384,
    ) -> None:
        n = points.shape[0]
        if n < 1:
            raise ValueError("a CellIndex needs at least one member")
        if ids.shape != (n,):
            raise ValueError(f"ids must be [{n}], got {tuple(ids.shape)}")
        cells = max(1, min(num_cells, n))
        picks = ((torch.arange(cells, dtype=torch.float64) + 0.5) * (n / cells)).long()
        picks = picks.to(points.device)
        self.centroids = points[picks].clone()
        #: [cells] payload of the member each centroid was taken from.
        self.centroid_ids = ids[picks].clone()
        self.centroids_sq = (self.centroids * self.centroids).sum(1)
        self.probes = max(1, min(probes, cells))
        self.scan_cap = scan_cap
        self._members = points[:0]
        self._members_sq = points.new_zeros(0)
        self._ids = ids[:0]
        self._cell = torch.zeros(0, dtype=torch.int64, device=points.device)
        self._starts: list[int] = [0] * (cells + 1)
        self.extend(points, ids)

    @property
    def num_cells(self) -> int:
        return self.centroids.shape[0]

    def cells(self) -> tuple[torch.Tensor, list[int]]:
        """(payload ids [n] sorted by cell, starts [cells + 1]): cell c holds
        ``ids[starts[c]:starts[c + 1]]`` (its centroid's member among them)."""
        return self._ids, self._starts

    def __len__(self) -> int:
        return self._members.shape[0]

    def _assign(self, points: torch.Tensor) -> torch.Tensor:
        """[n] nearest centroid of each point (projected space)."""
        out = torch.empty(points.shape[0], dtype=torch.int64, device=points.device)
        for lo in range(0, points.shape[0], _ASSIGN_BLOCK):
            block = points[lo : lo + _ASSIGN_BLOCK]
            d2 = torch.addmm(self.centroids_sq, block, self.centroids.T, alpha=-2.0)
            out[lo : lo + block.shape[0]] = d2.argmin(dim=1)
        return out

    def extend(self, points: torch.Tensor, ids: torch.Tensor) -> None:
        """Add members (each to its nearest existing centroid's cell; centroids stay fixed).

        Re-sorts all members by cell, O(n d): a cell stays one contiguous slice, and members
        keep their insertion order within a cell.
        """
        if points.shape[0] == 0:
            return
        device = points.device
        new_cell = self._assign(points)
        order = torch.argsort(new_cell, stable=True)
        new_cell = new_cell[order]
        # Merge two cell-sorted lists without sorting all n again: each old member moves down
        # by the new members of earlier cells; the new ones go after their cell's old members.
        added = torch.bincount(new_cell, minlength=self.num_cells)
        before = torch.cumsum(added, 0) - added  # new members in earlier cells
        old_ends = torch.tensor(self._starts[1:], device=device)
        n, m = len(self), points.shape[0]
        old_to = torch.arange(n, device=device) + before[self._cell]
        new_to = old_ends[new_cell] + torch.arange(m, device=device)
        cell = torch.empty(n + m, dtype=torch.int64, device=device)
        members = points.new_empty((n + m, points.shape[1]))
        all_ids = torch.empty(n + m, dtype=self._ids.dtype, device=device)
        squared = points.new_empty(n + m)
        new_points = points[order]
        for target, source in ((cell, (self._cell, new_cell)),
                               (members, (self._members, new_points)),
                               (all_ids, (self._ids, ids[order])),
                               (squared, (self._members_sq, (new_points * new_points).sum(1)))):
            target[old_to] = source[0]
            target[new_to] = source[1]
        self._cell, self._members, self._ids, self._members_sq = cell, members, all_ids, squared
        self._starts = [a + b for a, b in zip(
            self._starts, [0, *torch.cumsum(added, 0).tolist()], strict=True)]

    def search(self, queries: torch.Tensor, r: int, *, probes: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``r`` members nearest each query among its ``probes`` nearest cells.

        Args:
            queries: [q, d] in the members' frame. r: candidates per query.
            probes: cells scanned per query (default: the constructor's).

        Returns:
            (partial d2 [q, r] = |m|^2 - 2 q.m ascending, inf where fewer candidates were
            found; ids [q, r] int64: the members' payload, -1 where the value is inf).
        """
        widest = max(1, min(int(torch.tensor(self._starts).diff().max()), self.scan_cap))
        probes = self.probes if probes is None else max(1, min(probes, self.num_cells))
        step = max(1, _BUFFER_ELEMENTS // (probes * widest))
        parts = [self._search(queries[lo : lo + step], r, probes)
                 for lo in range(0, queries.shape[0], step)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])

    def _search(self, queries: torch.Tensor, r: int, p: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`search` for one batch of queries (its buffers fit _BUFFER_ELEMENTS).

        Each (query, probed cell) pair is a *slot*. Slots are sorted by cell, cells by width
        class (about 2^j x _GROUP members), so a class's slots are consecutive rows of one
        inf-padded [slots, 2^j x _GROUP] buffer (padding < 2 x) and each cell costs one GEMM
        written straight into it. Torch's CPU top-k costs ~7 ns per element and ~0.4 us per
        row (one per slot was most of the search), so it runs only on small arrays: each slot's
        columns are split into _GROUP strided groups and their minima kept; a query's r best
        groups over all its slots hold its r best members (:func:`smallest`'s argument); their
        members' distances are recomputed (one small batched product) for the final top-r.
        """
        q, g = queries.shape[0], _GROUP
        device = queries.device
        if q == 0:
            return (queries.new_zeros((0, r)),
                    torch.zeros((0, r), dtype=torch.int64, device=device))
        cells = self.num_cells
        cd2 = torch.addmm(self.centroids_sq, queries, self.centroids.T, alpha=-2.0)
        probe = smallest(cd2, p)[1].reshape(-1)  # [q * p] cells, query-major
        counts = torch.bincount(probe, minlength=cells).tolist()
        starts = self._starts
        sizes = [min(starts[c + 1] - starts[c], self.scan_cap) for c in range(cells)]
        groups_of = [1 << max(0, math.ceil(math.log2(max(1, math.ceil(size / g)))))
                     for size in sizes]
        groups_t = torch.tensor(groups_of, device=device)
        order = torch.argsort(groups_t[probe] * cells + probe, stable=True)  # sorted slots
        slot_queries = queries[order // p]
        probed = sorted((c for c in range(cells) if counts[c]), key=lambda c: (groups_of[c], c))
        widest = max(groups_of[c] for c in probed)
        minima = queries.new_full((q * p, widest), math.inf)
        lo = first = 0
        while first < len(probed):
            groups = groups_of[probed[first]]
            last = first
            while last < len(probed) and groups_of[probed[last]] == groups:
                last += 1
            rows = sum(counts[c] for c in probed[first:last])
            buffer = queries.new_full((rows, groups * g), math.inf)
            row = 0
            for cell in probed[first:last]:
                count, start, size = counts[cell], starts[cell], sizes[cell]
                if size:
                    torch.addmm(self._members_sq[start : start + size],
                                slot_queries[lo + row : lo + row + count],
                                self._members[start : start + size].T, alpha=-2.0,
                                out=buffer[row : row + count, :size])
                row += count
            # Group k of a slot: its columns k, k + groups, ..., k + (g - 1) groups.
            minima[lo : lo + rows, :groups] = buffer.view(rows, g, groups).amin(dim=1)
            lo += rows
            first = last
        position = torch.empty_like(order)
        position[order] = torch.arange(q * p, device=device)  # query-major slot -> sorted row
        best = min(r, p * widest)
        _, top = smallest(minima[position].view(q, p * widest), best)  # [q, best]
        rows_t = position.view(q, p).gather(1, top // widest)  # sorted slot of each group
        group = top % widest
        cell_of = probe[order][rows_t]  # [q, best]
        slot_groups = groups_t[cell_of]
        columns = group.unsqueeze(2) + slot_groups.unsqueeze(2) * torch.arange(g, device=device)
        sizes_t = torch.tensor(sizes, device=device)
        valid = (columns < sizes_t[cell_of].unsqueeze(2)) & (group < slot_groups).unsqueeze(2)
        starts_t = torch.tensor(starts[:-1], device=device)
        member = (starts_t[cell_of].unsqueeze(2) + columns).clamp_max(len(self) - 1)
        member = member.reshape(q, best * g)
        d2 = self._members_sq[member] - 2.0 * torch.bmm(
            self._members[member], queries.unsqueeze(2)).squeeze(2)
        d2 = torch.where(valid.reshape(q, best * g), d2, math.inf)
        take = min(r, best * g)
        best_v, pick = d2.topk(take, dim=1, largest=False)
        best_ids = torch.where(torch.isfinite(best_v), self._ids[member.gather(1, pick)], -1)
        if take < r:
            best_v = torch.nn.functional.pad(best_v, (0, r - take), value=math.inf)
            best_ids = torch.nn.functional.pad(best_ids, (0, r - take), value=-1)
        return best_v, best_ids

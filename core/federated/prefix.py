"""Server selection by merging the sites' uploads by separation ("prefix merge").

Every uploaded row gets a *separation* s_t: its distance to the site's earlier rows of its
stream (round 1), or to the round's starting bank and the site's earlier rows of the round
(later rounds). When a site's upload is in farthest-first pick order, s_t is the distance at
which the site picked the row, about the coverage radius of the prefix before it, and every
prefix of the upload is the site's own farthest-first coreset; keeping the k rows of largest
separation over all sites then keeps, for every site, a prefix chosen to one common radius.

**What the upload order has, and lacks** (issue 17; docs/protocol.md). It has: a total order
per site and round (chunk ``sequence``, then row order), the same for the same data and seed;
rows that are the site's own training patches (as decoded); and together they cover every
site patch within r_i. It lacks, in general: monotone separations and "every prefix is the
site's coreset". A site with more patches than its coreset buffer reduces in a stream, and
the final order then mixes pick distance and represented radius (on one real site 3,031 of
3,839 rows sat more than 5 % above the running minimum of the separations, Spearman 0.48).
So nothing here relies on position in the upload: a row's separation is a measured distance
to real earlier rows (valid in any order; an order far from farthest-first only makes some
early rows look more separated than they are, i.e. that site's coverage coarser), the
allocation ranks each site's rows by separation, never by position, and the certificate is
measured on the kept rows whatever the order.

**Allocation** (core.federated.allocation): pure k-center (the k largest separations) starves
a site whose features are compact, and lets a site of random rows take nearly the whole bank.
So each site first keeps a floor, ``ceil(floor_fraction x k x n_i / N)`` of its rows of largest
own separation (n_i its SiteSummary.num_patches), the rest of the bank is filled by the largest
separations over all sites, and ``max_site_share`` optionally caps each site's rows; the
selection reports rows kept per site (PrefixSelection.allocation). The selector's own default
is no floor (floor_fraction 0); the aggregator sets the default floor.

Why not farthest-first again over the union (the old server selection): the union of local
coresets has already lost the density of the patches (every region is represented at spacing
r_i, however many patches it held), and a second farthest-first pass over it prefers the
periphery of what is left, so common normal patterns end up covered more coarsely than a
single selection over all patches would cover them (larger mean patch distance and realised
radius on every partition of benchmarks/realistic_parity.py; issue 11 measured up to 0.03 image
AUROC lost on its data). The prefix merge meets that benchmark's parity bar on every category,
metric and partition (docs/performance.md, "Federated parity on realistic data").

How it scales (issue 16): the work happens in :meth:`PrefixMergeSelector.add`, as chunks
arrive, and costs O(n^1.5 d + n D) per site of n rows, not O(n^2 D):

* **Separations from a projected search.** Each site's stream is processed in fixed blocks of
  ``block_rows`` rows (2,048) at fixed stream positions. A block is projected to d = 32
  dimensions (a seeded Gaussian JL matrix, the same on every device) in the stream's frame
  (its first row is the origin: no float32 cancellation far from the origin); its rows'
  candidate parents are the ``_CANDIDATES`` nearest in the projection among the earlier rows
  of the block (brute force) and of earlier blocks (brute force below ``exhaustive_rows``
  rows, beyond it an inverted file of about 2 sqrt(n) cells, core.federated.cells, rebuilt
  when the stream has doubled), and, in later rounds, the round's starting bank (its own
  index). Each candidate's distance is then computed exactly in the original space; the
  separation is the smallest, so it is the exact distance to a real earlier row: at least the
  true separation, equal when the nearest earlier row was among the candidates (always when
  D <= d, where the projection is the identity). The candidates are kept as the row's *edges*
  (row, exact distance).
* **Certificate.** :meth:`PrefixMergeSelector.select` keeps its rows (allocation above), then
  bounds every row's distance to the bank by edge paths to kept rows (triangle inequality,
  O(N); core.federated.coverage.chain_bounds) and refines exactly only the rows whose bound
  exceeds the largest exact distance found so far (coverage.refine_radius). The r_S it reports
  (``radius_bound``) is the exact max over every uploaded row of its distance to the bank when
  ``radius_exact`` (refinement finished within its budget of full checks, ``max_exact_rows``:
  on the scale workload and resnet18 features it needs 32-65; rows of pure noise, where
  every distance is alike, need thousands), else the largest bound left, still valid (1.3 %
  above the exact value on 200,000 rows of noise at k = 100,000); both up to float32 rounding
  of one distance (relative ~1e-7). Every site patch lies within r_i of the site's upload, so
  max_i r_i + r_S still bounds every training patch.
* **Device.** Everything above is torch on ``device`` (CUDA for "auto" when available). A
  GPU searches each stream exhaustively up to 1,048,576 rows (one GEMM per block), a CPU up to
  4,096 rows, then through cells; so CPU and GPU banks may differ a little (as their float
  rounding already would).
* **Determinism.** A stream's results depend only on its own rows, the block positions and the
  round's starting bank: not on other sites, on how the sites' chunks interleave, nor on chunk
  boundaries (a last partial block is processed when ``select`` or ``finish_site`` needs it,
  provisionally: if the stream goes on, it is redone as a full block). Ranking ties go to the
  smaller site id, then upload order.

The quality cost of the approximate search (a row whose nearest earlier row was not among its
candidates gets a larger separation than the exact ranking gives it) is measured by
benchmarks/selection_scale.py: kept rows and exact r_S against the exact ranking
(:func:`prefix_separations`, kept here as the reference), on the scale workload and on
resnet18 features.

Memory: all uploaded rows are buffered on the device (the selection needs every row, and r_S
is measured on them), bounded by ``capacity`` rows (more raises :class:`CapacityError`), plus
per row its projection (d floats) and ``_CANDIDATES`` edges; the cell indexes hold one more
copy of the projections. No [N, N] matrix exists anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from core.coreset import projection_matrix
from core.federated.allocation import SiteAllocation, allocate, check_allocation_settings
from core.federated.cells import CellIndex, FlatIndex, num_cells_for, smallest
from core.federated.coverage import chain_bounds, exact_distances, refine_radius

logger = logging.getLogger(__name__)

__all__ = [
    "CapacityError",
    "PrefixMergeSelector",
    "PrefixSelection",
    "prefix_separations",
    "resolve_device",
]

_QUERY_BLOCK = 1024  # query rows per [block, n] distance block (4 MiB per 1,000 columns)

#: Rows per block of a site's stream (at fixed stream positions: chunk boundaries do not matter).
BLOCK_ROWS = 2048
#: Projection dimension of the candidate search (the original rows decide every distance).
PROJECTION_DIM = 32
#: Candidate parents per row from each source (the stream; the round's starting bank), each
#: checked exactly; the nearest ``_CANDIDATES`` overall are kept as the row's edges.
_CANDIDATES = 8
#: Streams (and starting banks) up to this many rows are searched exhaustively, larger ones
#: through cells: one GEMM per block is cheap on a GPU, the cells' small loops are not.
EXHAUSTIVE_ROWS = {"cpu": 4096, "cuda": 1 << 20}
#: Query rows per slice of a block's search among its own earlier rows.
_TRIANGLE_ROWS = 512
#: Budget of the exact refinement, in (row, bank row) pairs of full checks: a CPU does 2e8
#: (2,048 rows at k = 100,000: about 5 s here), a GPU 50 x more. Past it r_S is a bound.
MAX_EXACT_PAIRS = {"cpu": 2 * 10**8, "cuda": 10**10}


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
    """What :meth:`PrefixMergeSelector.select` returns.

    Attributes:
        features: [k, D] float32 bank, site by site (ids sorted), each site's rows in upload
            order (rounds in order).
        radius_bound: r_S, a valid upper bound on the Euclidean distance (original space) from
            every uploaded row to the bank; the exact maximum when ``radius_exact``.
        num_seen: rows uploaded so far.
        rows_kept: per site, rows in the bank.
        radius_exact: True when ``radius_bound`` is the exact maximum (the refinement finished
            within its budget of full checks), False when it is the largest bound left.
        chain_radius: the O(N) chain bound before refinement (max over rows of the shortest
            edge path to a bank row); >= radius_bound. 0.0 when every row is kept.
        exact_checks: rows given the full [1, k] x D check while certifying.
        allocation: per site (ids sorted): rows uploaded and kept, proportional share, floor,
            cap (core.federated.allocation).
    """

    features: np.ndarray
    radius_bound: float
    num_seen: int
    rows_kept: dict[str, int]
    radius_exact: bool = True
    chain_radius: float = 0.0
    exact_checks: int = 0
    allocation: tuple[SiteAllocation, ...] = ()


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """One torch thread for CPU work, restored afterwards.

    The selection is hundreds of small GEMMs, top-ks and gathers per block; on this team's
    shared 2-core machines two torch threads spin at every barrier: add() ran 5 x slower with
    two (35,000 -> 7,000 rows/s at k = 10,000, load ~3). All of it is torch (no NumPy BLAS),
    so unlike core.coreset._one_thread this leaves the BLAS pools alone (0.6 ms per call saved).
    The setting is process-wide: concurrent torch work elsewhere also runs on one thread.
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or "auto": CUDA when torch sees a GPU, else the CPU; anything else as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _Growing:
    """An int64 vector on ``device`` that grows by doubling (a site's row numbers)."""

    def __init__(self, device: torch.device) -> None:
        self._data = torch.empty(1024, dtype=torch.int64, device=device)
        self.size = 0

    def extend(self, values: torch.Tensor) -> None:
        need = self.size + values.numel()
        if need > self._data.numel():
            grown = torch.empty(max(need, 2 * self._data.numel()), dtype=torch.int64,
                                device=self._data.device)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : need] = values
        self.size = need

    def view(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        return self._data[lo : self.size if hi is None else hi]


class _Stream:
    """One site's rows of one round (epoch), in upload order.

    origin: [D] the stream's first row (its projection frame). committed: rows processed as
    full blocks (they are in ``index``). provisional: rows up to which a last partial block was
    processed (results written, not indexed; redone if the stream goes on).
    """

    def __init__(self, site: str, epoch: int, number: int, origin: torch.Tensor,
                 ref_shift: torch.Tensor | None) -> None:
        self.site, self.epoch, self.number = site, epoch, number
        self.origin = origin
        self.ref_shift = ref_shift  # projection of (origin - starting bank's origin)
        self.ids = _Growing(origin.device)
        self.committed = 0
        self.provisional = 0
        self.index: CellIndex | None = None
        self.indexed_at = 0  # committed rows when ``index`` was last rebuilt


@dataclass
class _Reference:
    """The round's starting bank: rows [m, D], its frame's origin (its first row), a search
    index over the rows' projections in that frame, and each row's number in the selector's
    buffer (-1 when the bank is not this selector's last selection)."""

    rows: torch.Tensor
    origin: torch.Tensor
    index: CellIndex | FlatIndex
    buffer_ids: torch.Tensor


class PrefixMergeSelector:
    """Buffer the sites' uploads (each in pick order) and keep the k most separated rows.

    Args:
        k: bank size.
        capacity: most rows buffered over all sites and rounds (memory: capacity x D x 4 B on
            ``device``, touched only as rows arrive, plus about 400 B per row: projection,
            edges, search index).
        device: where the buffer lives and all the work runs; None or "auto": CUDA when
            available, else the CPU.
        seed: seeds the projection of the candidate search.
        exhaustive_rows: streams up to this many rows are searched exhaustively, then through
            cells (default: EXHAUSTIVE_ROWS for the device type).
        max_exact_rows: most rows given the full exact check when certifying r_S (see
            PrefixSelection.radius_exact); default: MAX_EXACT_PAIRS for the device type / k,
            at least 32.
        block_rows: rows per block of a site's stream (the bank depends on it, like on
            ``seed``; tests use small blocks to cover many of them).
        floor_fraction: each site first keeps this fraction of its proportional share
            k x n_i / N (core.federated.allocation; 0: the plain k largest separations).
            :meth:`select` then needs the sites' patch counts.
        max_site_share: most rows one site may keep, as a fraction of k (None: no cap).
    """

    def __init__(
        self,
        k: int,
        *,
        capacity: int,
        device: str | torch.device | None = None,
        seed: int = 0,
        exhaustive_rows: int | None = None,
        max_exact_rows: int | None = None,
        block_rows: int = BLOCK_ROWS,
        floor_fraction: float = 0.0,
        max_site_share: float | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        check_allocation_settings(floor_fraction, max_site_share)
        self.floor_fraction = floor_fraction
        self.max_site_share = max_site_share
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.k = k
        self.capacity = capacity
        self.device = resolve_device(device)
        self.seed = seed
        self.exhaustive_rows = (
            EXHAUSTIVE_ROWS.get(self.device.type, EXHAUSTIVE_ROWS["cpu"])
            if exhaustive_rows is None else exhaustive_rows
        )
        self.max_exact_rows = max_exact_rows
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.block_rows = block_rows
        self._dim: int | None = None
        self._projection: torch.Tensor | None = None  # [D, d]; None: identity (D <= d)
        self._rows: torch.Tensor | None = None  # [capacity, D]
        self._projected: torch.Tensor | None = None  # [capacity, d] in each stream's frame
        self._separations: torch.Tensor | None = None  # [capacity]
        self._edge_ids: torch.Tensor | None = None  # [capacity, _CANDIDATES], -1: none
        self._edge_distances: torch.Tensor | None = None  # [capacity, _CANDIDATES]
        self._stream_of: torch.Tensor | None = None  # [capacity] stream number of each row
        self._streams: list[_Stream] = []
        self._current: dict[str, _Stream] = {}  # site -> its stream this round
        self._epoch = 0
        self._reference: _Reference | None = None
        self._last: tuple[np.ndarray, torch.Tensor] | None = None  # last bank, its row numbers
        self._mask: torch.Tensor | None = None  # see _later_mask
        #: What the last select() returned (its certificate fields: radius_exact, ...).
        self.last_selection: PrefixSelection | None = None
        self.num_seen = 0

    # -- set-up --------------------------------------------------------------------------

    def _allocate(self, dim: int) -> None:
        """Buffers for D = ``dim`` (torch.empty: pages are touched only as rows arrive)."""
        if self._dim is not None:
            if dim != self._dim:
                raise ValueError(f"rows must have D={self._dim} columns, got {dim}")
            return
        self._dim = dim
        d = min(PROJECTION_DIM, dim)
        if dim > PROJECTION_DIM:
            self._projection = projection_matrix(dim, PROJECTION_DIM, self.seed).to(self.device)
        cap, device = self.capacity, self.device
        self._rows = torch.empty((cap, dim), dtype=torch.float32, device=device)
        self._projected = torch.empty((cap, d), dtype=torch.float32, device=device)
        self._separations = torch.empty(cap, dtype=torch.float32, device=device)
        self._edge_ids = torch.empty((cap, _CANDIDATES), dtype=torch.int64, device=device)
        self._edge_distances = torch.empty((cap, _CANDIDATES), dtype=torch.float32,
                                           device=device)
        self._stream_of = torch.empty(cap, dtype=torch.int64, device=device)

    def _earlier_in_block(self, projected: torch.Tensor, r: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """For each row of a block [b, d], the ``r`` strictly earlier rows of the block nearest
        in the projection: (partial d2 [b, r], positions [b, r]), inf where fewer exist.

        Brute force over the lower triangle only, in slices of _TRIANGLE_ROWS query rows
        (slice j against rows before its end): about 60 % of the full [b, b] matrix.
        """
        b = projected.shape[0]
        squared = (projected * projected).sum(1)
        mask = self._later_mask()
        values, positions = [], []
        for lo in range(0, b, _TRIANGLE_ROWS):
            hi = min(lo + _TRIANGLE_ROWS, b)
            d2 = torch.addmm(squared[:hi], projected[lo:hi], projected[:hi].T, alpha=-2.0)
            d2[:, lo:hi].masked_fill_(mask[: hi - lo, : hi - lo], math.inf)
            v, i = smallest(d2, r)
            values.append(v)
            positions.append(i)
        return torch.cat(values), torch.cat(positions)

    def _later_mask(self) -> torch.Tensor:
        """[_TRIANGLE_ROWS] x 2, True where column >= row (not an earlier row); cached."""
        if self._mask is None:
            self._mask = torch.ones(_TRIANGLE_ROWS, _TRIANGLE_ROWS, dtype=torch.bool,
                                    device=self.device).triu()
        return self._mask

    def _exact_budget(self, k: int) -> int:
        """Rows the refinement may give the full check for a bank of k rows."""
        if self.max_exact_rows is not None:
            return self.max_exact_rows
        pairs = MAX_EXACT_PAIRS.get(self.device.type, MAX_EXACT_PAIRS["cpu"])
        return max(32, pairs // max(1, k))

    def _project(self, centred: torch.Tensor) -> torch.Tensor:
        """[n, D] rows already shifted into a frame -> [n, d]."""
        return centred if self._projection is None else centred @ self._projection

    def start_round(self, bank: np.ndarray | None) -> None:
        """A new round: later rows are measured against ``bank`` (the bank the sites were sent)
        and the site's earlier rows of this round, not against its earlier rounds' uploads.

        A later round uploads the site's patches the bank covers worst; their distance to the
        bank is what they add. (Measured against the site's own round-1 upload, which covers
        every site patch to r_i, they would never outrank a kept row.) With ``bank`` None, the
        new round's rows are measured against the site's earlier rows of that round only.
        When ``bank`` is this selector's last selection, each of its rows is known as an
        uploaded row, so the certificate's edge paths run through it; another bank only serves
        separations.
        """
        with _one_thread(self.device):
            self._start_round(bank)

    def _start_round(self, bank: np.ndarray | None) -> None:
        for stream in self._current.values():
            self._finish(stream)
            stream.index = None  # the stream is over: its search structure is not needed
        self._current = {}
        self._epoch += 1
        if bank is None:
            self._reference = None
            return
        array = np.ascontiguousarray(bank, dtype=np.float32)
        if array.ndim != 2 or array.shape[0] == 0:
            raise ValueError(f"bank must be a non-empty [m, D] matrix, got shape {array.shape}")
        self._allocate(array.shape[1])
        rows = torch.from_numpy(array).to(self.device)
        origin = rows[0].clone()
        projected = torch.cat([self._project(b - origin) for b in rows.split(8192)])
        positions = torch.arange(rows.shape[0], device=self.device)
        index: CellIndex | FlatIndex = (
            FlatIndex(projected, positions) if rows.shape[0] <= self.exhaustive_rows
            else CellIndex(projected, positions, num_cells=num_cells_for(rows.shape[0]))
        )
        buffer_ids = torch.full((rows.shape[0],), -1, dtype=torch.int64, device=self.device)
        if self._last is not None:
            features, ids = self._last
            if features is bank or (features.shape == array.shape
                                    and np.array_equal(features, array)):
                buffer_ids = ids
        self._reference = _Reference(rows, origin, index, buffer_ids)

    # -- ingest --------------------------------------------------------------------------

    def add(self, site_id: str, rows: np.ndarray) -> None:
        """Append [n, D] rows to ``site_id``'s stream (its pick order continues across calls).

        Separation of a row: its distance to the nearest candidate among the site's earlier
        rows (round 1) or the round's starting bank and the site's earlier rows of this round
        (see start_round). Every complete block of the stream is processed here.
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
        self._allocate(batch.shape[1])
        assert self._rows is not None and self._stream_of is not None
        start, stop = self.num_seen, self.num_seen + batch.shape[0]
        self._rows[start:stop] = torch.from_numpy(batch).to(self.device)
        stream = self._current.get(site_id)
        if stream is None:
            reference = self._reference
            origin = self._rows[start].clone()
            shift = None if reference is None else self._project(
                (origin - reference.origin).unsqueeze(0)).squeeze(0)
            stream = _Stream(site_id, self._epoch, len(self._streams), origin, shift)
            self._streams.append(stream)
            self._current[site_id] = stream
        stream.ids.extend(torch.arange(start, stop, device=self.device))
        self._stream_of[start:stop] = stream.number
        self.num_seen = stop
        if stream.ids.size - stream.committed < self.block_rows:
            return
        with _one_thread(self.device):
            while stream.ids.size - stream.committed >= self.block_rows:
                self._process(stream, stream.committed, stream.committed + self.block_rows,
                              commit=True)

    def finish_site(self, site_id: str) -> None:
        """``site_id``'s upload for this round is complete: process its last partial block now
        (optional; :meth:`select` does it otherwise). Calling ``add`` for the site afterwards
        is still allowed: the block is then redone in full."""
        stream = self._current.get(site_id)
        if stream is not None:
            with _one_thread(self.device):
                self._finish(stream)

    def _finish(self, stream: _Stream) -> None:
        size = stream.ids.size
        if size > stream.committed and stream.provisional != size:
            self._process(stream, stream.committed, size, commit=False)
            stream.provisional = size

    def _process(self, stream: _Stream, lo: int, hi: int, *, commit: bool) -> None:
        """Separations and edges of stream rows lo .. hi - 1 (one block)."""
        assert self._rows is not None and self._projected is not None
        assert self._separations is not None and self._edge_ids is not None
        assert self._edge_distances is not None
        ids = stream.ids.view(lo, hi)
        originals = self._rows[ids]  # [b, D]
        projected = self._project(originals - stream.origin)  # [b, d]
        b, r = ids.numel(), _CANDIDATES
        values, positions = self._earlier_in_block(projected, r)
        candidates = torch.where(torch.isfinite(values), ids[positions.clamp_max(b - 1)], -1)
        if lo > 0:  # earlier blocks: their index, or all of them
            index = stream.index if stream.index is not None else FlatIndex(
                self._projected[stream.ids.view(0, lo)], stream.ids.view(0, lo))
            earlier_values, earlier = index.search(projected, r)
            values = torch.cat([values, earlier_values], dim=1)
            candidates = torch.cat([candidates, earlier], dim=1)
        if values.shape[1] > r:
            values, pick = values.topk(r, dim=1, largest=False)
            candidates = candidates.gather(1, pick)
        distances = exact_distances(originals, self._rows, candidates)
        reference = self._reference
        if reference is not None:
            assert stream.ref_shift is not None
            _, found = reference.index.search(projected + stream.ref_shift, r)
            distances = torch.cat([distances, exact_distances(originals, reference.rows,
                                                               found)], dim=1)
            known = torch.where(found >= 0, reference.buffer_ids[found.clamp_min(0)], -1)
            candidates = torch.cat([candidates, known], dim=1)
        edge_distances, pick = distances.topk(r, dim=1, largest=False)
        edge_ids = candidates.gather(1, pick)
        # An edge needs a finite length and a row of the buffer at its other end (a starting
        # bank row from elsewhere only counts for the separation).
        edge_ids = torch.where(torch.isfinite(edge_distances), edge_ids, -1)
        self._separations[ids] = edge_distances[:, 0]
        self._edge_ids[ids] = edge_ids
        self._edge_distances[ids] = edge_distances
        self._projected[ids] = projected
        if not commit:
            return
        stream.committed = hi
        stream.provisional = 0
        if stream.index is None and hi < self.exhaustive_rows:
            return
        if stream.index is None or hi >= 2 * stream.indexed_at:
            members = stream.ids.view(0, hi)
            stream.index = CellIndex(self._projected[members], members,
                                     num_cells=num_cells_for(hi))
            stream.indexed_at = hi
        else:
            stream.index.extend(projected, ids)

    # -- selection -----------------------------------------------------------------------

    def select(self, k: int | None = None, *, num_patches: Mapping[str, int] | None = None
               ) -> PrefixSelection:
        """``k`` rows (default the constructor's): each site's floor, then the largest
        separations, within any cap (core.federated.allocation), with r_S certified on the
        kept rows (exact unless the refinement's budget ran out; see PrefixSelection).

        ``num_patches``: n_i of every site that uploaded (SiteSummary.num_patches); required
        when ``floor_fraction`` > 0, reported (and used by the flooding flag) otherwise.
        """
        with _one_thread(self.device):
            return self._select(k, num_patches)

    def _select(self, k: int | None, num_patches: Mapping[str, int] | None = None
                ) -> PrefixSelection:
        k = self.k if k is None else k
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.num_seen == 0:
            raise ValueError("no rows were added; nothing to select from")
        assert self._rows is not None and self._separations is not None
        assert self._projected is not None and self._stream_of is not None
        assert self._edge_ids is not None and self._edge_distances is not None
        for stream in self._current.values():
            self._finish(stream)
        # Canonical order: sites by id, each site's rounds in order, rows in upload order; so
        # the bank does not depend on which site's chunks reached the server first (ties
        # between sites go to the smaller site id).
        sites = sorted({s.site for s in self._streams})
        streams = sorted(self._streams, key=lambda s: (s.site, s.epoch))
        canonical = torch.cat([s.ids.view() for s in streams])  # [N] buffer row numbers
        site_of = torch.cat([
            torch.full((s.ids.size,), sites.index(s.site), dtype=torch.int64,
                       device=self.device) for s in streams
        ])
        n = canonical.numel()
        keep, allocation = allocate(
            self._separations[canonical], site_of, sites, k, num_patches=num_patches,
            floor_fraction=self.floor_fraction, max_site_share=self.max_site_share,
        )  # canonical positions of kept rows, ascending
        kept_rows = canonical[keep]
        bank = self._rows[kept_rows]
        rows_kept = {a.site_id: a.kept for a in allocation}
        features = bank.cpu().numpy() if bank.device.type != "cpu" else bank.numpy()
        if keep.numel() == n:
            result_radius, exact, chain, checks = 0.0, True, 0.0, 0
        else:
            bounds, sweeps = chain_bounds(n, kept_rows, self._edge_ids[:n],
                                          self._edge_distances[:n])
            # Visit rows by decreasing bound, ties in canonical order (numbering-independent).
            by_bound = torch.sort(bounds[canonical], descending=True, stable=True).indices
            origin = bank[0]
            shifts = torch.stack([self._project((s.origin - origin).unsqueeze(0)).squeeze(0)
                                  for s in self._streams])
            projected = self._projected

            def in_bank_frame(rows: torch.Tensor) -> torch.Tensor:
                return projected[rows] + shifts[self._stream_of[rows]]

            result = refine_radius(
                bounds, canonical[by_bound], lambda rows: self._rows[rows], in_bank_frame,
                bank, in_bank_frame(kept_rows),
                flat_below=self.exhaustive_rows, max_exact_rows=self._exact_budget(k),
            )
            result_radius, exact = result.radius, result.exact
            chain, checks = result.chain_radius, result.exact_checks
            logger.info(
                "prefix merge r_S: chain bound %.4f (%d sweeps), %d rows tightened, %d exact "
                "checks -> %s %.4f", chain, sweeps, result.tightened, checks,
                "exact" if exact else "bound", result_radius,
            )
        self._last = (features, kept_rows)
        logger.info(
            "prefix merge: %d of %d rows kept (%s), r_S = %.4f",
            keep.numel(), n, rows_kept, result_radius,
        )
        self.last_selection = PrefixSelection(
            features=features,
            radius_bound=result_radius,
            num_seen=self.num_seen,
            rows_kept=rows_kept,
            radius_exact=exact,
            chain_radius=chain,
            exact_checks=checks,
            allocation=allocation,
        )
        return self.last_selection

"""How the prefix merge shares the k bank rows between sites: a floor per site, the rest by
coverage, an optional cap per site, and the flag for a site that floods the bank.

The prefix merge ranks every uploaded row by its *separation* (its distance to the nearest
earlier row of its site's stream, or to the round's starting bank; core.federated.prefix).
Keeping the k largest separations over all sites cuts every site at one common radius: the
k-center rule. It starves a site whose features are compact (issue 17: a site holding a third
of the patches kept 18-20 of 4,608 rows, and its good images scored like defects), and it lets
a site of random rows (maximally separated) take nearly the whole bank.

The rule here (:func:`allocate`), for site i with n_i training patches (its
SiteSummary.num_patches; N = sum over the sites taking part):

1. **Floor**: ``ceil(f x k x n_i / N)`` rows, capped at the rows the site uploaded (all rounds)
   and at its cap, taken as the site's rows of *largest own separation* (not the first rows
   of its upload: the client's streaming reduce does not leave its upload farthest-first, so
   a prefix of the upload is not the site's own coreset; the ranking by separation is the
   same whatever the upload order's quality). Should the floors add up to more than k (more
   sites than k / f), the floor rows themselves are cut by separation to k.
2. **Fill**: the other ``k - sum(floors)`` rows are the largest separations among the rows
   left, over all sites, as the plain prefix merge does (coverage decides).
3. **Cap** (optional ``max_site_share``): no site keeps more than ``max(1, floor(share x k))``
   rows; rows past its cap are not eligible, so the fill moves on to other sites' rows (the
   bank is smaller than k only when every site is capped or fully kept).

Whatever is kept, each site's kept rows are the top of its own ranking by separation (the
floor, cap and fill all take rows in that order), and ties go to the earlier row in the
canonical order the caller passes (sites by id, rounds in order, upload order): the result
depends only on the uploads, not on how chunks interleaved. The certificate does not depend on
the rule: r_S is measured on the kept rows afterwards (core.federated.coverage).

Why f = :data:`DEFAULT_FLOOR_FRACTION` (0.1) (docs/performance.md, "Site allocation";
benchmarks/site_allocation.py, RESULTS.md): on held-back real textures a floor of 5-10 % fixed a
starved compact site and 25 % or more cost a diverse site pixel AUROC below its bar (issue 17);
on the generated settings (IID / category / Dirichlet 0.3, three category mixes) no floor up to
0.5 cost a busy category more than 0.0005, 0.05 never binds, 0.1 binds a little, 0.2 and 0.5
help the compact category much more. 0.1 is the largest value that did no harm on either kind
of data.

Flooding (:func:`flooding`): a site is flagged when it keeps more than :data:`FLOOD_RATIO`
times as many bank rows per training patch as the other sites together, *and* its bank share
exceeds its patch share by more than :data:`FLOOD_MARGIN`. The ratio of rows per patch
(site vs the rest) is used rather than the ratio of shares because a site holding half the
patches can at most double its share (0.5 -> 1.0) even when it takes every row; the
rows-per-patch ratio is then unbounded. Honest sites of unequal diversity reach ratios of
about 2-3 under the k-center rule (issue 17: diverse sites at about 1/2 of the bank with a
third of the patches each: ratio 2); a site of random rows takes everything the floors leave,
and its ratio is then (1 - f (1 - p)) / (p f) >= 1 / f = 10 at f = 0.1 (p its patch share),
flagged while its share exceeds its patch share by the margin, i.e. for p < about 0.89 (a site
claiming nearly all the patches is owed nearly all the bank). The margin keeps small sites
that hold a few percent of the bank from being flagged. The flag is a warning for a
person, not a decision: a genuinely much more diverse site can be flagged too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_FLOOR_FRACTION",
    "FLOOD_MARGIN",
    "FLOOD_RATIO",
    "SiteAllocation",
    "allocate",
    "check_allocation_settings",
    "flooding",
    "overrepresentation",
]

#: Default floor: each site first keeps this fraction of its proportional share k x n_i / N.
DEFAULT_FLOOR_FRACTION = 0.1
#: A site keeping more than this many times the rest's bank rows per training patch ...
FLOOD_RATIO = 5.0
#: ... with a bank share this much above its patch share is flagged as flooding the bank.
FLOOD_MARGIN = 0.1


def check_allocation_settings(floor_fraction: float, max_site_share: float | None) -> None:
    """ValueError unless 0 <= floor_fraction <= 1 and max_site_share is None or in (0, 1]."""
    if not (isinstance(floor_fraction, int | float) and 0.0 <= floor_fraction <= 1.0):
        raise ValueError(f"floor_fraction must be in [0, 1], got {floor_fraction!r}")
    if max_site_share is not None and not (
        isinstance(max_site_share, int | float) and 0.0 < max_site_share <= 1.0
    ):
        raise ValueError(f"max_site_share must be in (0, 1] or unset, got {max_site_share!r}")


@dataclass(frozen=True)
class SiteAllocation:
    """One site's part of a selected bank.

    Attributes:
        site_id: the site.
        num_patches: n_i, its training patches (latest SiteSummary.num_patches); 0 when the
            selection was not given patch counts.
        uploaded: rows it uploaded (all rounds held by the selector).
        kept: rows of the bank that are its.
        proportional: k x n_i / N, its share of the bank by patches (float rows).
        floor: rows guaranteed by the floor (after the upload and cap limits).
        cap: most rows it may keep (max_site_share), None when no cap is set.
        uncapped: rows it would have kept without the cap (== kept when no cap applied).
    """

    site_id: str
    num_patches: int
    uploaded: int
    kept: int
    proportional: float
    floor: int
    cap: int | None
    uncapped: int

    @property
    def capped(self) -> bool:
        """The cap took rows from this site."""
        return self.uncapped > self.kept

    @property
    def whole_upload_kept(self) -> bool:
        """Every uploaded row is in the bank: the site's upload, not the rule, limited it."""
        return self.kept == self.uploaded

    def as_dict(self) -> dict[str, object]:
        """JSON-ready fields (round reports)."""
        return {
            "site_id": self.site_id, "num_patches": self.num_patches,
            "uploaded": self.uploaded, "kept": self.kept,
            "proportional": self.proportional, "floor": self.floor, "cap": self.cap,
            "uncapped": self.uncapped, "capped": self.capped,
            "whole_upload_kept": self.whole_upload_kept,
        }


def _ranks_within_site(order: torch.Tensor, site_of: torch.Tensor, num_sites: int
                       ) -> torch.Tensor:
    """rank[p] = place of canonical row p in its site's ranking (0 = its largest separation),
    given ``order`` (canonical positions by decreasing separation, ties canonical)."""
    by_site = torch.sort(site_of[order], stable=True)
    grouped = order[by_site.indices]  # site 0's rows by rank, then site 1's, ...
    starts = torch.cumsum(torch.bincount(site_of, minlength=num_sites), 0) - torch.bincount(
        site_of, minlength=num_sites)
    position = torch.arange(grouped.numel(), device=order.device)
    rank = torch.empty_like(order)
    rank[grouped] = position - starts[site_of[grouped]]
    return rank


def _fill(order: torch.Tensor, taken: torch.Tensor, eligible: torch.Tensor, room: int
          ) -> torch.Tensor:
    """``taken`` plus the first ``room`` rows of ``order`` that are eligible and not taken."""
    candidates = order[(eligible & ~taken)[order]]
    out = taken.clone()
    out[candidates[: max(0, room)]] = True
    return out


def allocate(
    separations: torch.Tensor,
    site_of: torch.Tensor,
    sites: Sequence[str],
    k: int,
    *,
    num_patches: Mapping[str, int] | None = None,
    floor_fraction: float = 0.0,
    max_site_share: float | None = None,
) -> tuple[torch.Tensor, tuple[SiteAllocation, ...]]:
    """Choose the bank rows (module doc).

    Args:
        separations: [N] float32 separation of every uploaded row, in canonical order (sites
            by id, rounds in order, upload order); inf is allowed (a site's first row).
        site_of: [N] int64 index into ``sites`` of each row.
        sites: the site ids, sorted.
        k: bank size.
        num_patches: n_i per site (every site of ``sites``); needed when floor_fraction > 0.
        floor_fraction: f in [0, 1].
        max_site_share: cap per site as a fraction of k, or None.

    Returns:
        (kept canonical positions [<= k] int64, ascending; one SiteAllocation per site).
    """
    check_allocation_settings(floor_fraction, max_site_share)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n, num_sites = separations.numel(), len(sites)
    device = separations.device
    patches = [0] * num_sites
    if num_patches is not None:
        missing = [s for s in sites if s not in num_patches]
        if missing:
            raise ValueError(f"num_patches has no count for site(s) {missing}")
        patches = [int(num_patches[s]) for s in sites]
        if any(p < 1 for p in patches):
            raise ValueError(
                f"num_patches must be >= 1 per site, got {dict(zip(sites, patches, strict=True))}"
            )
    elif floor_fraction > 0:
        raise ValueError("a floor (floor_fraction > 0) needs each site's num_patches")
    total = sum(patches)
    uploaded = torch.bincount(site_of, minlength=num_sites)
    order = torch.sort(separations, descending=True, stable=True).indices
    rank = _ranks_within_site(order, site_of, num_sites)
    proportional = [k * p / total if total else 0.0 for p in patches]
    caps = None if max_site_share is None else [max(1, math.floor(max_site_share * k))] * num_sites
    floors = [
        min(math.ceil(floor_fraction * share - 1e-9) if floor_fraction > 0 else 0,
            int(uploaded[i]), caps[i] if caps else n)
        for i, share in enumerate(proportional)
    ]
    floor_t = torch.tensor(floors, dtype=torch.int64, device=device)
    in_floor = rank < floor_t[site_of]
    everything = torch.ones(n, dtype=torch.bool, device=device)
    nothing = torch.zeros(n, dtype=torch.bool, device=device)
    # Floor rows, cut by separation to k should they exceed it; then the fill.
    floored = _fill(order, nothing, in_floor, k)
    room = k - int(floored.sum())
    uncapped = _fill(order, floored, everything, room)
    if caps is None:
        kept = uncapped
    else:
        cap_t = torch.tensor(caps, dtype=torch.int64, device=device)
        kept = _fill(order, floored, rank < cap_t[site_of], room)
    kept_counts = torch.bincount(site_of[kept], minlength=num_sites).tolist()
    uncapped_counts = torch.bincount(site_of[uncapped], minlength=num_sites).tolist()
    allocation = tuple(
        SiteAllocation(
            site_id=site, num_patches=patches[i], uploaded=int(uploaded[i]),
            kept=int(kept_counts[i]), proportional=proportional[i], floor=floors[i],
            cap=None if caps is None else caps[i], uncapped=int(uncapped_counts[i]),
        )
        for i, site in enumerate(sites)
    )
    return torch.nonzero(kept).squeeze(1), allocation


def overrepresentation(allocation: Sequence[SiteAllocation]) -> dict[str, float]:
    """Per site: its bank rows per training patch over the other sites' together (1.0: as
    many rows per patch as the rest; inf: the rest keep nothing). Empty without patch counts
    or with one site."""
    bank = sum(a.kept for a in allocation)
    total = sum(a.num_patches for a in allocation)
    if bank == 0 or len(allocation) < 2 or any(a.num_patches < 1 for a in allocation):
        return {}
    out = {}
    for a in allocation:
        theirs = (bank - a.kept) / (total - a.num_patches)
        mine = a.kept / a.num_patches
        out[a.site_id] = math.inf if theirs == 0 else mine / theirs
    return out


def flooding(allocation: Sequence[SiteAllocation]) -> list[tuple[SiteAllocation, float]]:
    """Sites flagged as flooding the bank (module doc), each with its
    :func:`overrepresentation` ratio. Empty without patch counts or with one site."""
    ratios = overrepresentation(allocation)
    if not ratios:
        return []
    bank = sum(a.kept for a in allocation)
    total = sum(a.num_patches for a in allocation)
    return [
        (a, ratios[a.site_id]) for a in allocation
        if ratios[a.site_id] > FLOOD_RATIO
        and a.kept / bank - a.num_patches / total > FLOOD_MARGIN
    ]

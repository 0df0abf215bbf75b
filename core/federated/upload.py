"""How many rows a site uploads in round 1, and what to say when the bank comes out short.

One rule for the in-process API (:class:`~core.federated.FederatedPatchCore`), ``fedclient run``
and the Flower ClientApp, so every path sizes a site's upload alike.

The server keeps the k uploaded rows with the largest separations (plus a small per-site floor,
``core.federated.prefix``), so what a site must send depends on how diverse it is against the
others, which no site knows before the round. Sending min(n_i, k) rows always suffices (the bank
then equals the one from unlimited uploads) but costs S x k rows for S sites. The default sends
``factor`` x k / S rows per site (the sites together send about ``factor`` x k when every site can
fill its share): a site knows k, S (the round's expected sites) and its own patch count n_i, but
not the federation's N, so a share of k per *site* is what it can compute. Measured in
``benchmarks/upload_size.py`` (table in ``benchmarks/RESULTS.md``, "Upload size"); the docs'
section is docs/python-api.md, "How much each site sends".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["UPLOAD_FACTOR", "UploadBudget", "short_bank_note"]

#: Default upload multiplier: each site sends UPLOAD_FACTOR x k / S rows (at most its patches,
#: k and the server's per-site limit). 1x leaves the server almost no choice; at 2x the bank held
#: 84-100 % of the rows of the unlimited-upload bank, mean AUROC within 0.003 of it, for two
#: thirds of its bytes with 3 sites (``benchmarks/upload_size.py``, docs/python-api.md).
UPLOAD_FACTOR = 2.0


@dataclass(frozen=True)
class UploadBudget:
    """A site's round-1 upload size from the round's terms.

    Attributes:
        global_bank_size: k, rows of the global bank the server selects (RoundConfig field 6).
        num_sites: S, the sites the round waits for (RoundConfig.expected_sites); 0 when the
            round has no fixed set of sites: the site then sends min(n_i, k), the size that
            needs no assumption about the others.
        max_rows: the server's per-site limit (RoundConfig.max_rows_per_site), rows; 0: none.
        factor: upload multiplier f (> 0): a site sends ceil(f x k / S) rows.
    """

    global_bank_size: int
    num_sites: int
    max_rows: int = 0
    factor: float = UPLOAD_FACTOR

    def __post_init__(self) -> None:
        if self.global_bank_size < 1:
            raise ValueError(f"global_bank_size must be >= 1, got {self.global_bank_size}")
        if self.num_sites < 0:
            raise ValueError(f"num_sites must be >= 0, got {self.num_sites}")
        if self.max_rows < 0:
            raise ValueError(f"max_rows must be >= 0, got {self.max_rows}")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"upload factor must be a finite number > 0, got {self.factor}")

    @property
    def share(self) -> int:
        """ceil(f x k / S) rows (k when S is unknown), before the site's own limits."""
        if self.num_sites == 0:
            return self.global_bank_size
        return min(self.global_bank_size,
                   math.ceil(self.factor * self.global_bank_size / self.num_sites))

    def rows(self, num_patches: int) -> int:
        """Rows a site with ``num_patches`` training patches uploads: min(n_i, k, f x k / S,
        max_rows), at least 1. More than k never helps (the bank has k rows); more than
        ``max_rows`` would be refused (RESOURCE_EXHAUSTED)."""
        if num_patches < 1:
            raise ValueError(f"num_patches must be >= 1, got {num_patches}")
        rows = min(num_patches, self.share)
        if self.max_rows:
            rows = min(rows, self.max_rows)
        return max(1, rows)


def short_bank_note(global_bank_size: int, bank_rows: int, rows_uploaded: int) -> str | None:
    """One line saying the bank has fewer rows than asked, or None when it has k.

    Args:
        global_bank_size: k asked for (the server's ``global_bank_size``).
        bank_rows: rows of the bank the round produced.
        rows_uploaded: rows all sites uploaded in the round (its committed rows; in a later
            round only the novel rows, added to the bank of the round before).
    """
    if bank_rows >= global_bank_size:
        return None
    return (f"bank short: {bank_rows} of the k = {global_bank_size} rows asked; the sites "
            f"uploaded {rows_uploaded} rows in all this round")

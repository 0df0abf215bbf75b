"""Bank versions as row sets: stable order, deltas between versions, and their checksum.

A later round changes a few rows of a 10,000-row bank; re-sending all of it (8.5 MB for 13 new
rows in the demo's round 2) wastes the link. The server therefore stores every version in a
*stable order*: the rows it keeps from the previous version, in that version's order, followed by
the rows that are new. Then, for any older version ``base`` and newer ``target``, the rows of
``base`` that survive come first in ``target``, in ``base`` order, and

    target == concatenate([delete(base, removed), added])

where ``removed`` are the indices of base rows absent from target and ``added`` the rows after
the survivors. A site holding ``base`` receives only ``removed`` and ``added``. Bank order does
not matter to PatchCore (nearest-neighbour search over a set), so reordering changes no score.

Rows are identified by their exact float32 bits (hashed with XXH3-64, then compared exactly), so
the server side needs no row ids. The site side (``apply_delta``) works on whatever it decoded:
with element-wise value types (fp32/fp16/bf16) a row decodes the same whichever chunk carried it,
so ``bank_checksum`` of a rebuilt bank equals that of a full download.

Used by both fedserver (stable_order, bank_delta) and fedclient (apply_delta); imports no grpc.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import xxhash
from numpy.typing import NDArray

from core.codec import CodecConfig, decode_matrix, encode_matrix

logger = logging.getLogger(__name__)

__all__ = [
    "BankDelta",
    "DeltaError",
    "apply_delta",
    "bank_checksum",
    "bank_delta",
    "decoded_checksum",
    "stable_order",
]

#: Value types whose decoding is element-wise (independent of chunk boundaries).
ELEMENTWISE_VALUE_TYPES = frozenset({"fp32", "fp16", "bf16"})


class DeltaError(ValueError):
    """A delta does not fit the bank it is applied to, or versions are not in stable order."""


@dataclass(frozen=True)
class BankDelta:
    """What turns ``base`` into ``target``.

    removed: [r] int64 indices into base, strictly increasing.
    added: [a, D] float32 rows appended after the surviving base rows.
    """

    removed: NDArray[np.int64]
    added: NDArray[np.float32]


def _row_keys(bank: NDArray[np.float32]) -> list[int]:
    """XXH3-64 of each row's float32 bytes. [n] Python ints."""
    contiguous = np.ascontiguousarray(bank, dtype=np.float32)
    return [xxhash.xxh3_64_intdigest(row.tobytes()) for row in contiguous]


def _index(bank: NDArray[np.float32]) -> dict[int, list[int]]:
    index: dict[int, list[int]] = {}
    for position, key in enumerate(_row_keys(bank)):
        index.setdefault(key, []).append(position)
    return index


def _match(
    rows: NDArray[np.float32], reference: NDArray[np.float32]
) -> tuple[NDArray[np.bool_], NDArray[np.int64]]:
    """For each row of ``rows``: is it in ``reference`` (exact bits), and where.

    Duplicate rows are matched one to one (the i-th copy in rows to the i-th in reference).
    Returns (found [n] bool, position [n] int64, -1 where not found).
    """
    index = _index(reference)
    used: dict[int, int] = {}
    found = np.zeros(rows.shape[0], dtype=bool)
    position = np.full(rows.shape[0], -1, dtype=np.int64)
    for i, key in enumerate(_row_keys(rows)):
        candidates = index.get(key, ())
        start = used.get(key, 0)
        for slot in range(start, len(candidates)):
            j = candidates[slot]
            if np.array_equal(rows[i].view(np.uint32), reference[j].view(np.uint32)):
                found[i], position[i] = True, j
                used[key] = slot + 1
                break
    return found, position


def stable_order(
    previous: NDArray[np.float32] | None, new: NDArray[np.float32]
) -> NDArray[np.float32]:
    """``new`` [k, D] reordered: rows also in ``previous`` first (in previous order), then the rest
    (in ``new``'s order). Same rows, new array. ``previous`` None: ``new`` unchanged (a copy)."""
    new = np.ascontiguousarray(new, dtype=np.float32)
    if previous is None or previous.shape[0] == 0:
        return new.copy()
    if previous.shape[1] != new.shape[1]:
        raise DeltaError(f"D changed between versions: {previous.shape[1]} -> {new.shape[1]}")
    in_new, where = _match(previous, new)
    kept = where[in_new]
    rest = np.ones(new.shape[0], dtype=bool)
    rest[kept] = False
    return np.concatenate([new[kept], new[rest]], axis=0)


def bank_delta(base: NDArray[np.float32], target: NDArray[np.float32]) -> BankDelta:
    """The delta from ``base`` to ``target`` (both stored in stable order, target newer).

    Raises DeltaError if target does not start with base's surviving rows in base order (the
    versions were not produced by stable_order from one another).
    """
    if base.shape[1] != target.shape[1]:
        raise DeltaError(f"D differs: base {base.shape[1]}, target {target.shape[1]}")
    survives, where = _match(base, target)
    survivors = int(survives.sum())
    if not np.array_equal(where[survives], np.arange(survivors)):
        raise DeltaError(
            "target is not in stable order relative to base: its first rows are not base's "
            "surviving rows in base order"
        )
    removed = np.flatnonzero(~survives).astype(np.int64)
    return BankDelta(removed=removed, added=np.ascontiguousarray(target[survivors:]))


def apply_delta(
    base: NDArray[np.float32], removed: NDArray[np.integer], added: NDArray[np.float32]
) -> NDArray[np.float32]:
    """Rebuild a version: ``base`` [n, D] minus rows ``removed`` (order kept), then ``added``."""
    removed = np.asarray(removed, dtype=np.int64)
    if removed.size and (
        removed.min() < 0
        or removed.max() >= base.shape[0]
        or np.any(np.diff(removed) <= 0)
    ):
        raise DeltaError(
            f"removed indices must be strictly increasing in [0, {base.shape[0]}), got "
            f"{removed.size} indices in [{removed.min()}, {removed.max()}]"
        )
    if added.ndim != 2 or (added.shape[0] and added.shape[1] != base.shape[1]):
        raise DeltaError(f"added rows must be [a, {base.shape[1]}], got {added.shape}")
    keep = np.ones(base.shape[0], dtype=bool)
    keep[removed] = False
    parts = [base[keep]]
    if added.shape[0]:
        parts.append(added.astype(np.float32, copy=False))
    return np.concatenate(parts, axis=0)


def bank_checksum(bank: NDArray[np.float32]) -> int:
    """XXH64 (seed 0) of the bank's little-endian float32 bytes, row-major."""
    array = np.ascontiguousarray(bank, dtype="<f4")
    return xxhash.xxh64_intdigest(array.tobytes())


def decoded_checksum(bank: NDArray[np.float32], codec: CodecConfig) -> int:
    """bank_checksum of ``bank`` as a site decodes it under ``codec``; 0 for int8/int4 (their
    decoded values depend on chunk boundaries, so no single checksum describes them).

    Element-wise value types are encoded and decoded in row blocks of 4096 rows (any split
    gives the same values).
    """
    if codec.value_type not in ELEMENTWISE_VALUE_TYPES:
        return 0
    digest = xxhash.xxh64()
    for lo in range(0, bank.shape[0], 4096):
        block = np.ascontiguousarray(bank[lo : lo + 4096], dtype=np.float32)
        decoded = decode_matrix(encode_matrix(block, codec), max_decoded_bytes=block.nbytes)
        digest.update(np.ascontiguousarray(decoded, dtype="<f4").tobytes())
    return digest.intdigest()

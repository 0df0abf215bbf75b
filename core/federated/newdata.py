"""A site's new images in a later round: which of their patches to upload, and the radius that
the certificate then holds to.

A site that took part in round 1 uploaded its local coreset; every patch of its round-1 images
lies within r_i of it, and the server's r_S bounds every uploaded row's distance to the bank, so
``max_i r_i + r_S`` bounds every training patch. When the site later gets new images (a new
product variant, a new camera), the patches of those images are the only ones that can break
that bound. This module picks, among the new images' patches, the rows to upload so that every
new patch again lies within the site's radius of the rows it has uploaded:

1. the *cover* is every row the site has uploaded so far, as the server decoded them (its
   round-1 coreset and any later rows; the site decodes them itself, bit for bit as the server
   does, with core.serde.chunked_roundtrip);
2. a new patch farther than ``radius`` (the site's r_i) from the cover is *uncovered*; the
   others are never uploaded;
3. the uncovered patches are reduced by exact farthest-first, starting from their distances to
   the cover, until every one of them lies within ``radius`` of the cover or of a picked row:
   the picks are the upload, in pick order (the order the server's prefix selection expects);
4. the picks are decoded under the round's codec and chunking, and the radius that is reported
   is *measured*: the largest distance from any new patch to the decoded cover and picks. It is
   ``radius`` plus at most the picks' codec error (0 for float32).

Why the site's own uploads and not the bank it holds: the bank rows it holds are the server's
rows after the codec, with an error the site cannot know, and the server's novelty threshold
r_S is usually larger than r_i (demo: r_S 0.84, r_i 0.47-0.78): a patch left out because it
lies within r_S of the bank is only certified to r_S(round 1) + r_S(round 2), not to
``max_i r_i + r_S``. Against its own decoded uploads the site measures exactly what the
certificate needs, and on a variant that nobody in the federation has seen the two rules leave
out the same patches.

Memory: the uncovered patches are kept ([m, D] float32) for the exact selection; patches within
``radius`` of the cover are dropped as each batch of images is extracted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from core.codec import CodecConfig
from core.knn import NearestNeighbourIndex
from core.serde import chunked_roundtrip

logger = logging.getLogger(__name__)

__all__ = ["NewDataUpload", "cover_new_patches"]


@dataclass(frozen=True)
class NewDataUpload:
    """What a site sends for its new images in a later round.

    Attributes:
        features: [m, D] float32 rows to upload (m may be 0), in farthest-first pick order.
        decoded: [m, D] float32, ``features`` as the server decodes them (the site's new cover).
        radius: the largest distance from any new patch to the cover and ``decoded``: the r_i
            the site reports for its new images (Euclidean, feature units).
        num_patches: patches of the new images.
        num_uncovered: of those, the patches farther than the target radius from the cover
            before this upload (>= m).
    """

    features: np.ndarray
    decoded: np.ndarray
    radius: float
    num_patches: int
    num_uncovered: int


def cover_new_patches(
    batches: Iterable[np.ndarray],
    cover: np.ndarray,
    radius: float,
    *,
    codec: CodecConfig,
    max_chunk_bytes: int,
    knn_backend: str = "auto",
) -> NewDataUpload:
    """The rows that cover a site's new patches to ``radius`` (see the module doc).

    Args:
        batches: the new images' patch features, [n_b, D] float32 per batch.
        cover: [c, D] float32, every row the site uploaded so far as the server decoded them
            (c >= 1).
        radius: the target radius (the site's r_i), >= 0.
        codec / max_chunk_bytes: how the upload will be cut and encoded (the round's codec and
            RoundConfig.max_chunk_bytes): the reported radius is measured on decoded rows.
        knn_backend: nearest-neighbour backend for the distances to the cover (core.knn).
    """
    cover = np.ascontiguousarray(cover, dtype=np.float32)
    if cover.ndim != 2 or cover.shape[0] == 0:
        raise ValueError(f"cover must be a non-empty [c, D] matrix, got shape {cover.shape}")
    if not radius >= 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    index = NearestNeighbourIndex(cover, backend=knn_backend)  # type: ignore[arg-type]
    kept: list[np.ndarray] = []
    kept_distance: list[np.ndarray] = []
    num_patches = 0
    covered_max = 0.0  # largest distance to the cover among the patches left out
    for batch in batches:
        flat = np.ascontiguousarray(batch, dtype=np.float32).reshape(-1, cover.shape[1])
        num_patches += flat.shape[0]
        if flat.shape[0] == 0:
            continue
        distances = index.search(flat, 1)[0][:, 0]
        far = distances > radius
        if (~far).any():
            covered_max = max(covered_max, float(distances[~far].max()))
        if far.any():
            kept.append(flat[far])
            kept_distance.append(distances[far].astype(np.float32))
    dim = cover.shape[1]
    if not kept:
        empty = np.empty((0, dim), dtype=np.float32)
        return NewDataUpload(empty, empty.copy(), covered_max, num_patches, 0)
    uncovered = np.concatenate(kept)
    order = _farthest_first_to_radius(uncovered, np.concatenate(kept_distance), radius)
    features = np.ascontiguousarray(uncovered[order])
    decoded, _ = chunked_roundtrip(features, config=codec, max_chunk_bytes=max_chunk_bytes)
    # Exact: each uncovered patch's distance to the cover or to a decoded pick, whichever is
    # nearer (the covered patches' distances to the cover are covered_max at most).
    to_picks = NearestNeighbourIndex(decoded, backend=knn_backend)  # type: ignore[arg-type]
    nearest_pick = to_picks.search(uncovered, 1)[0][:, 0]
    reached = np.minimum(np.concatenate(kept_distance), nearest_pick)
    measured = max(covered_max, float(reached.max()))
    logger.info(
        "new images: %d patches, %d beyond r = %.4f of the site's uploads -> %d rows "
        "(measured radius %.4f)", num_patches, uncovered.shape[0], radius, features.shape[0],
        measured,
    )
    return NewDataUpload(features, decoded, measured, num_patches, uncovered.shape[0])


def _farthest_first_to_radius(
    points: np.ndarray, start_distance: np.ndarray, radius: float
) -> np.ndarray:
    """Exact farthest-first over ``points`` [m, D] whose distances to already-chosen rows are
    ``start_distance`` [m]: pick the farthest point until none is farther than ``radius``.
    Returns the picks' indices in pick order (>= 1 when some start distance exceeds radius).
    Cost O(m D) per pick, memory O(m)."""
    rows = torch.from_numpy(points)
    squared_norms = (rows * rows).sum(dim=1)
    nearest = torch.from_numpy(start_distance.astype(np.float32)).clone()
    picks: list[int] = []
    while True:
        best = int(torch.argmax(nearest))
        if float(nearest[best]) <= radius:
            break
        picks.append(best)
        pick = rows[best]
        squared = (squared_norms - 2.0 * (rows @ pick) + squared_norms[best]).clamp_min_(0.0)
        # Rounding of the expansion is ~1e-7 relative; the pick itself must leave the race.
        squared[best] = 0.0
        torch.minimum(nearest, squared.sqrt_(), out=nearest)
    return np.asarray(picks, dtype=np.int64)

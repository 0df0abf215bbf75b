"""Evaluation metrics for PatchCore-style anomaly detection (plain numpy, no torch).

All metrics are computed exactly over every distinct score value: the pixels (or images) are
sorted by score once and the curves are cumulative sums over that order, evaluated at the last
element of each run of equal scores. A threshold ``t`` counts a pixel as positive when
``score >= t``, so tied scores always switch together, as in sklearn's ``roc_curve`` and the
official MVTec AD evaluation code (``pro_curve_util.py``). Memory is O(pixels): a few arrays of
one score, index or flag per pixel, never a pixel-by-pixel or pixel-by-threshold structure.

Functions:
    image_auroc: ROC AUC of image scores.
    pixel_auroc: ROC AUC of all pixels pooled over all images.
    au_pro: MVTec AD area under the per-region-overlap curve up to a false-positive-rate limit.
    au_spro: MVTec LOCO / AutoVI area under the saturated-PRO curve at several FPR limits.
    roc_curve / pro_curve: the points of the image ROC and PRO curves (for plots); au_pro and
        pro_curve share one computation, so a report plots the curve its AU-PRO integrates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

logger = logging.getLogger(__name__)

__all__ = [
    "Curve",
    "DefectChannel",
    "SaturationSpec",
    "au_pro",
    "au_spro",
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "roc_curve",
]

DEFAULT_SPRO_FPR_LIMITS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.3, 1.0)

# 3x3x3 structure whose only non-zero plane is the middle one: labelling a [N, H, W] stack with it
# gives the 8-connected components of each image separately (no connection across images) in a
# single scipy call instead of N.
_EIGHT_CONNECTED_PER_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_PER_IMAGE[1] = True


@dataclass(frozen=True, eq=False)
class Curve:
    """Points of a curve over all thresholds, from the origin (highest threshold) up.

    fpr: [K] float64, non-decreasing false-positive rate in [0, 1], fpr[0] == 0.
    y: [K] float64, non-decreasing TPR (ROC) or PRO at those FPRs, y[0] == 0.
    ``eq=False``: numpy arrays have no boolean ``==``.
    """

    fpr: NDArray[np.float64]
    y: NDArray[np.float64]

    def area(self, fpr_limit: float = 1.0) -> float:
        """Trapezoid area from FPR 0 to ``fpr_limit`` divided by the limit (as au_pro)."""
        limit = _check_fpr_limit("fpr_limit", fpr_limit)
        return _normalised_area(self.fpr[1:], self.y[1:], limit)

    def thinned(self, max_points: int) -> Curve:
        """At most ``max_points`` (>= 2) points for plotting: the first and last points and the
        points nearest to evenly spaced FPRs. The exact curve has one point per distinct score
        (millions for pixel curves); a plot cannot show more than a few thousand."""
        if max_points < 2:
            raise ValueError(f"max_points must be >= 2, got {max_points}")
        if self.fpr.size <= max_points:
            return self
        targets = np.linspace(0.0, 1.0, max_points)
        picked = np.unique(np.clip(np.searchsorted(self.fpr, targets), 0, self.fpr.size - 1))
        # A vertical jump at one FPR keeps its top: add the last point of each picked FPR.
        last = np.searchsorted(self.fpr, self.fpr[picked], side="right") - 1
        picked = np.unique(np.concatenate(([0], picked, last, [self.fpr.size - 1])))
        return Curve(self.fpr[picked], self.y[picked])


@dataclass(frozen=True)
class SaturationSpec:
    """How much of one defect channel must be detected for full sPRO credit.

    threshold: a fraction of the channel area in (0, 1] when ``relative`` is True, otherwise an
        absolute area in pixels (> 0). AutoVI / MVTec LOCO ``defects_config.json`` field
        ``saturation_threshold``.
    relative: ``relative_saturation`` in the same file.
    """

    threshold: float
    relative: bool

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold) or self.threshold <= 0:
            raise ValueError(
                f"SaturationSpec.threshold must be finite and > 0, got {self.threshold!r}"
            )
        if self.relative and self.threshold > 1:
            raise ValueError(
                "SaturationSpec.threshold is a fraction of the channel area when relative=True "
                f"and must be <= 1, got {self.threshold!r}"
            )

    def saturation_area(self, channel_area: int) -> float:
        """Area in pixels at which a channel counts as fully detected.

        ``threshold * channel_area`` when relative, else ``min(threshold, channel_area)``, so the
        saturation area never exceeds the channel itself and full credit is always reachable.
        """
        if self.relative:
            return self.threshold * channel_area
        return min(self.threshold, float(channel_area))


@dataclass(frozen=True, eq=False)
class DefectChannel:
    """One ground-truth defect channel of one image, with its saturation spec.

    mask: bool [H, W], True on the defect pixels of this channel (AutoVI stores one PNG per
        channel, ``ground_truth/<defect>/<image stem>/0000.png, 0001.png, ...``; convert it with
        ``png > 0``; its anomaly map must have its size: core.evaluation upsamples the maps to
        the original size by default). Must contain at least one True pixel: an empty channel
        has no area to saturate.
    saturation: the spec of the channel's defect type.

    ``eq=False``: equality by identity, because numpy arrays have no boolean ``==``.
    """

    mask: NDArray[np.bool_]
    saturation: SaturationSpec

    def __post_init__(self) -> None:
        if not isinstance(self.mask, np.ndarray) or self.mask.dtype != np.bool_:
            got = self.mask.dtype if isinstance(self.mask, np.ndarray) else type(self.mask)
            raise ValueError(f"DefectChannel.mask must be a numpy bool array, got {got}")
        if self.mask.ndim != 2:
            raise ValueError(
                f"DefectChannel.mask must have shape [H, W], got shape {self.mask.shape}"
            )
        if not self.mask.any():
            raise ValueError(
                f"DefectChannel.mask of shape {self.mask.shape} has no defect pixel; an empty "
                "channel has no saturation area (drop it, or resize the ground truth so small "
                "defects survive)"
            )
        if not isinstance(self.saturation, SaturationSpec):
            raise ValueError(
                "DefectChannel.saturation must be a SaturationSpec, got "
                f"{type(self.saturation).__name__}"
            )


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC of image-level anomaly scores.

    Args:
        labels: [N], 0/False = good, 1/True = anomalous.
        scores: [N] float, higher = more anomalous.

    Returns:
        Area under the ROC curve in [0, 1]; equals ``sklearn.metrics.roc_auc_score`` (ties count
        one half).

    Raises:
        ValueError: if shapes differ, labels are not binary, scores are not finite, or only one
            class is present.
    """
    y = _as_binary("labels", labels)
    s = _as_finite_scores("scores", scores)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(
            f"labels and scores must both have shape [N], got {y.shape} and {s.shape}"
        )
    return _roc_auc(y, s, what="labels")


def roc_curve(labels: ArrayLike, scores: ArrayLike) -> Curve:
    """Image-level ROC curve: one point per distinct score, from (0, 0) to (1, 1).

    Args and Raises as :func:`image_auroc` (its area, ``curve.area()``, equals image_auroc up
    to float rounding).
    """
    y = _as_binary("labels", labels)
    s = _as_finite_scores("scores", scores)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(
            f"labels and scores must both have shape [N], got {y.shape} and {s.shape}"
        )
    tp, fp, n_pos, n_neg = _roc_counts(y, s, "a ROC curve", "labels")
    return Curve(np.concatenate(([0.0], fp / n_neg)), np.concatenate(([0.0], tp / n_pos)))


def pixel_auroc(masks: ArrayLike, anomaly_maps: ArrayLike) -> float:
    """ROC AUC of all pixels of all images pooled together.

    Args:
        masks: [N, H, W] bool (or 0/1), True on defect pixels; or a sequence of N [H_i, W_i]
            masks when images differ in size (evaluation at each image's original size).
        anomaly_maps: [N, H, W] float, higher = more anomalous (or a sequence, as ``masks``).

    Returns:
        Area under the ROC curve in [0, 1], identical to ``roc_auc_score(masks.ravel(),
        anomaly_maps.ravel())`` but computed by one sort, in O(pixels) memory.

    Raises:
        ValueError: if shapes differ or are not 3-D, masks are not binary, maps are not finite, or
            all pixels belong to one class.
    """
    m, s, _ = _flat_pixels(masks, anomaly_maps, label_regions=False)
    return _roc_auc(m, s, what="masks")


def au_pro(masks: ArrayLike, anomaly_maps: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve (MVTec AD definition), exact over all thresholds.

    Ground-truth regions are the 8-connected components of each image's mask. For a threshold
    ``t``: FPR = fraction of all OK pixels (mask False, pooled over images) with score >= t, and
    PRO = mean over all regions of all images of (region pixels with score >= t) / region size.
    The curve starts at (0, 0), has one point per distinct score, is integrated with the trapezoid
    rule from FPR 0 to ``fpr_limit`` (the point at exactly ``fpr_limit`` linearly interpolated), and
    is divided by ``fpr_limit`` so a perfect detector scores 1 and a constant map scores
    ``fpr_limit / 2``.

    Args:
        masks: [N, H, W] bool (or 0/1), True on defect pixels, or a sequence of N [H_i, W_i]
            masks when images differ in size. At least one image must have a defect and at
            least one pixel must be OK.
        anomaly_maps: [N, H, W] float, higher = more anomalous (or a sequence, as ``masks``).
        fpr_limit: upper integration limit, in (0, 1].

    Returns:
        AU-PRO in [0, 1].

    Raises:
        ValueError: on mismatched or non-3-D shapes, non-binary masks, non-finite scores, a limit
            outside (0, 1], no defect region, or no OK pixel.
    """
    limit = _check_fpr_limit("fpr_limit", fpr_limit)
    return pro_curve(masks, anomaly_maps).area(limit)


def pro_curve(masks: ArrayLike, anomaly_maps: ArrayLike) -> Curve:
    """The exact PRO curve that :func:`au_pro` integrates: (0, 0), then one point per distinct
    score, FPR over all OK pixels and PRO the mean per-region overlap (see au_pro).

    Args and Raises as :func:`au_pro` (without the limit).
    """
    m, s, labelled = _flat_pixels(masks, anomaly_maps, label_regions=True)
    assert labelled is not None
    regions, num_regions = labelled
    if num_regions == 0:
        raise ValueError(f"au_pro needs at least one defect region; all {m.size} mask pixels "
                         "are False")
    ok = regions == 0
    num_ok = int(np.count_nonzero(ok))
    if num_ok == 0:
        raise ValueError(f"au_pro needs OK pixels for the FPR; all {m.size} mask pixels are True")

    # Each pixel of region r adds 1 / |r| to the PRO sum once the threshold passes its score; OK
    # pixels add 0. [pixels] float64.
    region_sizes = np.bincount(regions, minlength=num_regions + 1).astype(np.float64)
    region_sizes[0] = np.inf  # OK pixels contribute 1 / inf = 0
    pro_change = 1.0 / region_sizes[regions]
    del regions, region_sizes

    order, last_of_tie = _descending_order(s)
    fpr = np.cumsum(ok[order], dtype=np.int64)[last_of_tie] / num_ok
    pro = np.cumsum(pro_change[order])[last_of_tie] / num_regions
    np.minimum(pro, 1.0, out=pro)  # float rounding of the cumulative sum can exceed 1 by an ulp
    logger.debug(
        "au_pro: %s pixels, %s regions, %s OK pixels, %s distinct scores",
        s.size, num_regions, num_ok, fpr.size,
    )
    return Curve(np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro)))


def au_spro(
    gt_channels: Sequence[Sequence[DefectChannel]],
    anomaly_maps: Sequence[ArrayLike] | NDArray[np.floating],
    *,
    fpr_limits: Sequence[float] = DEFAULT_SPRO_FPR_LIMITS,
) -> dict[float, float]:
    """Normalised area under the saturated-PRO curve (MVTec LOCO / AutoVI), exact.

    For a threshold ``t``: sPRO = mean over all channels of all images of
    ``min(TP_area(channel, t) / saturation_area(channel), 1)``, where TP_area counts the channel's
    pixels with score >= t; FPR = fraction of the pixels that are in no channel of their image,
    pooled over images, with score >= t. The curve starts at (0, 0), has one point per distinct
    score, and for each limit the trapezoid area from FPR 0 to the limit (interpolated at the
    limit) is divided by the limit.

    Unlike the official LOCO code, which evaluates a refined set of thresholds seeded by an
    unseeded random choice of scores, this is exact and deterministic: every distinct score is a
    threshold. Channels may overlap; an overlapping pixel counts for each channel it belongs to.

    Args:
        gt_channels: one sequence per image of its defect channels (empty for a good image).
            Each channel's mask must have its image's map shape.
        anomaly_maps: one [H, W] float map per image (an [N, H, W] array works too); images may
            differ in size.
        fpr_limits: integration limits, each in (0, 1]. Keyword-only.

    Returns:
        ``{limit: AU-sPRO}`` for each limit in ``fpr_limits``, in that order.

    Raises:
        ValueError: if the number of maps and channel lists differ, a map is not 2-D or not
            finite, a channel's shape differs from its map's, a limit is outside (0, 1], there is
            no channel at all, or no pixel is OK.
    """
    if isinstance(fpr_limits, (int, float)):
        raise ValueError(f"fpr_limits must be a sequence of floats, got the number {fpr_limits!r}")
    limits = [_check_fpr_limit("fpr_limits", lim) for lim in fpr_limits]
    if not limits:
        raise ValueError("fpr_limits must contain at least one limit, got an empty sequence")
    if len(gt_channels) != len(anomaly_maps):
        raise ValueError(
            f"gt_channels has {len(gt_channels)} images but anomaly_maps has {len(anomaly_maps)}"
        )

    flat_maps: list[NDArray[np.floating]] = []
    ok_parts: list[NDArray[np.bool_]] = []
    # Per channel: global flat pixel indices [area] intp, and the saturation area in pixels.
    channel_pixels: list[NDArray[np.intp]] = []
    saturation_areas: list[float] = []
    offset = 0
    for i, (channels, raw_map) in enumerate(zip(gt_channels, anomaly_maps, strict=True)):
        score_map = _as_finite_scores(f"anomaly_maps[{i}]", raw_map)
        if score_map.ndim != 2:
            raise ValueError(f"anomaly_maps[{i}] must have shape [H, W], got {score_map.shape}")
        defect = np.zeros(score_map.shape, dtype=bool)
        for c, channel in enumerate(channels):
            if not isinstance(channel, DefectChannel):
                raise ValueError(
                    f"gt_channels[{i}][{c}] must be a DefectChannel, got {type(channel).__name__}"
                )
            if channel.mask.shape != score_map.shape:
                raise ValueError(
                    f"gt_channels[{i}][{c}].mask has shape {channel.mask.shape} but "
                    f"anomaly_maps[{i}] has shape {score_map.shape}"
                )
            defect |= channel.mask
            pixels = np.flatnonzero(channel.mask) + offset
            channel_pixels.append(pixels)
            saturation_areas.append(channel.saturation.saturation_area(pixels.size))
        flat_maps.append(score_map.ravel())
        ok_parts.append(~defect.ravel())
        offset += score_map.size

    num_channels = len(channel_pixels)
    if num_channels == 0:
        raise ValueError(f"au_spro needs at least one defect channel; all {len(gt_channels)} "
                         "images have none")
    scores = np.concatenate(flat_maps)
    ok = np.concatenate(ok_parts)
    del flat_maps, ok_parts
    num_ok = int(np.count_nonzero(ok))
    if num_ok == 0:
        raise ValueError("au_spro needs OK pixels for the FPR; every pixel is in a defect channel")

    order, last_of_tie = _descending_order(scores)
    rank = np.empty_like(order)  # rank[p] = position of pixel p in the descending order
    rank[order] = np.arange(order.size, dtype=order.dtype)

    # The k-th pixel of a channel to pass the threshold (k = 1..area, in descending score order)
    # raises that channel's saturated credit from min(k-1, sat)/sat to min(k, sat)/sat. Ties inside
    # the channel are harmless: the curve is only read at the end of each tie run, where all tied
    # pixels have passed. spro_change: [pixels] float64, in sorted positions.
    spro_change = np.zeros(order.size, dtype=np.float64)
    for pixels, sat in zip(channel_pixels, saturation_areas, strict=True):
        positions = np.sort(rank[pixels])
        k = np.arange(1, positions.size + 1, dtype=np.float64)
        credit = (np.minimum(k, sat) - np.minimum(k - 1, sat)) / (sat * num_channels)
        spro_change[positions] += credit  # positions are unique within one channel
    del rank, channel_pixels

    fpr = np.cumsum(ok[order], dtype=np.int64)[last_of_tie] / num_ok
    spro = np.cumsum(spro_change)[last_of_tie]
    np.minimum(spro, 1.0, out=spro)
    logger.debug(
        "au_spro: %s images, %s pixels, %s channels, %s OK pixels, %s distinct scores",
        len(gt_channels), scores.size, num_channels, num_ok, fpr.size,
    )
    return {float(lim): _normalised_area(fpr, spro, lim) for lim in limits}


# --------------------------------------------------------------------------------------------
# Private helpers
# --------------------------------------------------------------------------------------------


def _as_binary(name: str, values: ArrayLike) -> NDArray[np.bool_]:
    """Convert bool or 0/1 integer input to a bool array; reject anything else (e.g. 0/255)."""
    arr = np.asarray(values)
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be bool or 0/1 numbers, got dtype {arr.dtype}")
    if not np.isin(arr, (0, 1)).all():
        bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5]
        raise ValueError(f"{name} must contain only 0 and 1, found e.g. {bad.tolist()}")
    return arr.astype(bool)


def _as_finite_scores(name: str, values: ArrayLike) -> NDArray[np.floating]:
    """Return scores as a float array and reject NaN/inf, which have no place in a ranking.

    float32/float64 input keeps its dtype (sorting float32 maps is faster and ties are the ties of
    the given values); integer and bool input becomes float64.
    """
    arr = np.asarray(values)
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float64)
    elif arr.dtype not in (np.float32, np.float64):
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)  # float16 / longdouble
    if not np.isfinite(arr).all():
        raise ValueError(
            f"{name} contains {int(np.count_nonzero(~np.isfinite(arr)))} non-finite values"
        )
    return arr


def _flat_pixels(
    masks: ArrayLike | Sequence[ArrayLike],
    anomaly_maps: ArrayLike | Sequence[ArrayLike],
    *,
    label_regions: bool,
) -> tuple[NDArray[np.bool_], NDArray[np.floating], tuple[NDArray[np.intp], int] | None]:
    """Masks and maps of all images as flat pixel arrays, plus (with ``label_regions``) each
    pixel's 8-connected defect region (0 = OK, 1..R numbered across images) and R.

    Takes one [N, H, W] stack each, or two sequences of per-image [H_i, W_i] arrays (images of
    different sizes, e.g. AutoVI at original resolution).
    """
    if isinstance(masks, np.ndarray) and isinstance(anomaly_maps, np.ndarray):
        m = _as_binary("masks", masks)
        s = _as_finite_scores("anomaly_maps", anomaly_maps)
        _check_stack_shapes(m, s)
        labelled = None
        if label_regions:
            regions, count = ndimage.label(m, structure=_EIGHT_CONNECTED_PER_IMAGE)
            labelled = (regions.ravel(), int(count))
        return m.ravel(), s.ravel(), labelled
    if len(masks) != len(anomaly_maps):  # type: ignore[arg-type]
        raise ValueError(
            f"masks has {len(masks)} images but anomaly_maps has "  # type: ignore[arg-type]
            f"{len(anomaly_maps)}"  # type: ignore[arg-type]
        )
    if len(masks) == 0:  # type: ignore[arg-type]
        raise ValueError("masks and anomaly_maps hold no image")
    flat_masks: list[NDArray[np.bool_]] = []
    flat_maps: list[NDArray[np.floating]] = []
    flat_regions: list[NDArray[np.intp]] = []
    num_regions = 0
    for i, (raw_mask, raw_map) in enumerate(zip(masks, anomaly_maps, strict=True)):  # type: ignore[call-overload]
        mask = _as_binary(f"masks[{i}]", raw_mask)
        score_map = _as_finite_scores(f"anomaly_maps[{i}]", raw_map)
        if mask.shape != score_map.shape or mask.ndim != 2:
            raise ValueError(
                f"masks[{i}] and anomaly_maps[{i}] must both have shape [H, W], got "
                f"{mask.shape} and {score_map.shape}"
            )
        flat_masks.append(mask.ravel())
        flat_maps.append(score_map.ravel())
        if label_regions:
            regions, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
            regions = regions.ravel().astype(np.intp)
            regions[regions > 0] += num_regions
            flat_regions.append(regions)
            num_regions += int(count)
    scores = np.concatenate(flat_maps)  # mixed float32 / float64 maps promote to float64
    labelled = (np.concatenate(flat_regions), num_regions) if label_regions else None
    return np.concatenate(flat_masks), scores, labelled


def _check_stack_shapes(masks: NDArray[np.bool_], maps: NDArray[np.floating]) -> None:
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(
            "masks and anomaly_maps must both have shape [N, H, W], got "
            f"masks {masks.shape} and anomaly_maps {maps.shape}"
        )


def _check_fpr_limit(name: str, limit: float) -> float:
    value = float(limit)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {limit!r}")
    return value


def _descending_order(scores: NDArray[np.floating]) -> tuple[NDArray[np.intp], NDArray[np.bool_]]:
    """Sort scores descending once (the dominant cost: ~0.8 s for 5M float64 scores on one core).

    The order among equal scores is irrelevant (curves are read at the end of each tie run), so
    the faster unstable sort is used.

    Returns:
        order: [P] intp, pixel indices from highest to lowest score.
        last_of_tie: [P] bool, True at the last sorted position of each run of equal scores: the
            positions at which ``cumsum(...)`` equals the count for threshold ``score >= t``.
    """
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    last_of_tie = np.empty(order.size, dtype=bool)
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=last_of_tie[:-1])
    last_of_tie[-1] = True
    return order, last_of_tie


def _roc_counts(
    labels: NDArray[np.bool_], scores: NDArray[np.floating], needed_by: str, what: str
) -> tuple[NDArray[np.int64], NDArray[np.int64], int, int]:
    """(tp, fp, n_pos, n_neg): cumulative true and false positives [G] at the last row of each
    tie group of ``scores``, highest score first, and the class sizes. Raises ValueError naming
    ``needed_by`` when ``labels`` ([N] bool, ``what`` in the message) hold one class only."""
    n_pos = int(np.count_nonzero(labels))
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"{needed_by} needs both classes, but all {labels.size} {what} are "
            f"{'anomalous' if n_neg == 0 else 'good'}"
        )
    order, last_of_tie = _descending_order(scores)
    tp = np.cumsum(labels[order], dtype=np.int64)[last_of_tie]
    fp = np.arange(1, labels.size + 1, dtype=np.int64)[last_of_tie] - tp
    return tp, fp, n_pos, n_neg


def _roc_auc(labels: NDArray[np.bool_], scores: NDArray[np.floating], what: str) -> float:
    """Exact ROC AUC via one sort, ties counted one half (sklearn's trapezoid over tie groups).

    Works on integer counts: the area is sum over tie groups of fp_group * (tp_before +
    tp_group / 2), divided by n_pos * n_neg once at the end.
    """
    tp, fp, n_pos, n_neg = _roc_counts(labels, scores, "AUROC", what)
    tp_prev = np.concatenate(([0], tp[:-1]))
    fp_prev = np.concatenate(([0], fp[:-1]))
    # 2 * area * n_pos * n_neg, as exact integers (values stay far below 2**63 for any image set).
    twice_area = int(np.sum((fp - fp_prev) * (tp + tp_prev)))
    return twice_area / (2.0 * n_pos * n_neg)


def _normalised_area(fpr: NDArray[np.float64], y: NDArray[np.float64], limit: float) -> float:
    """Trapezoid area under y(fpr) from 0 to ``limit``, divided by ``limit``.

    Args:
        fpr: [K] non-decreasing, ending at 1 (the lowest threshold passes every pixel).
        y: [K] non-decreasing curve values at those FPRs.
        limit: in (0, 1].

    The origin (0, 0) is prepended. Vertical steps (equal FPRs) add no area. When no point lies
    exactly at ``limit``, y at ``limit`` is interpolated linearly between its neighbours, which
    are the last point before and the first point after (as MVTec's ``trapezoid(x_max=...)``).
    """
    x = np.concatenate(([0.0], fpr))
    yy = np.concatenate(([0.0], y))
    end = int(np.searchsorted(x, limit, side="right"))  # x[:end] <= limit < x[end:]
    area = float(np.sum((x[1:end] - x[: end - 1]) * (yy[1:end] + yy[: end - 1])) / 2.0)
    if x[end - 1] < limit:
        # end < len(x) because x[-1] == 1 >= limit.
        x0, x1, y0, y1 = x[end - 1], x[end], yy[end - 1], yy[end]
        y_at_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_at_limit) / 2.0
    return area / limit

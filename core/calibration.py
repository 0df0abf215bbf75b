"""Calibrated decisions: a threshold, a normalised score and a defect mask from a site's own images.

A raw PatchCore score is a distance in feature units; what counts as "too far" depends on the
backbone, the bank and the part. A site turns scores into decisions with images it holds back
from its coreset (a *validation share* of its good training images, :func:`split_validation`),
scored against the global bank like any new image. Nothing leaves the site.

Image threshold (:func:`threshold_at_fpr`): with ``n`` good validation scores sorted
``s_(1) <= ... <= s_(n)`` and a target false-positive rate ``alpha``, the threshold is the order
statistic ``s_(k)``, ``k = ceil((n + 1)(1 - alpha))``, and an image is anomalous when its score
is *strictly greater*. If a new good image is exchangeable with the validation images (same
process, same bank) and scores have no ties, then

* ``P(new good image flagged) = (n + 1 - k) / (n + 1) <= alpha``, averaged over the draw of the
  validation set (the split-conformal guarantee); ``expected_fpr`` records this value;
* for the one validation set actually drawn, the false-positive rate is Beta(n + 1 - k, k)
  distributed; ``fpr_upper`` is its 95 % quantile (with 95 % probability the rate is below it).

It needs ``k <= n``, i.e. ``n >= (1 - alpha) / alpha`` good images (99 for 1 %). With fewer the
target cannot be supported: the threshold is then the largest validation score, the expected
rate is ``1 / (n + 1)``, and the estimate says so (``uncertain`` and ``note``) instead of
pretending.

With labelled defective validation images (:func:`threshold_at_f1`) the threshold maximises F1
over the validation set instead, as anomalib's F1AdaptiveThreshold does.

Pixel threshold: the same order statistic over every pixel of the good validation images' maps
(or the F1-optimal pixel threshold when defect masks are given). Pixels of one image are
correlated, so only the averaged statement holds for pixels (a good image's expected fraction
of flagged pixels is at most the pixel target); no per-set Beta bound is claimed.

Normalisation (:class:`Normalisation`), as anomalib's min-max normalisation:
``clip((x - threshold) / (max - min) + 0.5, 0, 1)`` with ``min``/``max`` the smallest and largest
validation score, so 0.5 is the threshold exactly and ``normalised > 0.5`` iff ``x > threshold``
(also for scores within rounding of the threshold).
When all validation scores are equal (``max == min``) the span is taken as ``|threshold|``
(1 if that is 0), so the map stays monotone and 0.5 stays the threshold.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PIXEL_TARGET_FPR",
    "DEFAULT_TARGET_FPR",
    "DEFAULT_VALIDATION_SHARE",
    "Calibration",
    "CalibrationError",
    "Normalisation",
    "ThresholdEstimate",
    "calibrate",
    "minimum_images",
    "split_validation",
    "threshold_at_f1",
    "threshold_at_fpr",
]

#: Default image-level false-positive rate the threshold aims at.
DEFAULT_TARGET_FPR = 0.01
#: Default share of a site's good pixels flagged in its defect masks.
DEFAULT_PIXEL_TARGET_FPR = 0.01
#: Default share of a site's training images held back from its coreset for calibration.
DEFAULT_VALIDATION_SHARE = 0.15
#: Confidence of ``ThresholdEstimate.fpr_upper``.
CONFIDENCE = 0.95

Method = Literal["fpr", "fpr-max", "f1"]


class CalibrationError(ValueError):
    """Calibration cannot be done as asked (no validation image, a bad target, ...)."""


def _check_rate(name: str, value: float) -> float:
    if not 0.0 < value < 1.0:
        raise CalibrationError(f"{name} must be in (0, 1), got {value}")
    return float(value)


def minimum_images(target_fpr: float) -> int:
    """Fewest good validation images whose order statistic supports ``target_fpr``:
    the smallest n with ceil((n + 1)(1 - target)) <= n, i.e. n >= (1 - target) / target."""
    _check_rate("target_fpr", target_fpr)
    n = max(1, math.floor((1.0 - target_fpr) / target_fpr) - 1)
    while math.ceil((n + 1) * (1.0 - target_fpr) - 1e-9) > n:
        n += 1
    return n


def split_validation(count: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices) of ``count`` images, both sorted; seeded.

    ``round(share * count)`` images are held out (at least 1 when share > 0, and at least one
    image is always left to fit on). share 0 holds out nothing.
    """
    if not 0.0 <= share < 1.0:
        raise CalibrationError(f"validation share must be in [0, 1), got {share}")
    if count < 1:
        raise CalibrationError("no images to split")
    held = 0 if share == 0 else min(count - 1, max(1, round(share * count)))
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[held:]), np.sort(order[:held])


@dataclass(frozen=True)
class ThresholdEstimate:
    """A threshold and what backs it.

    value: the threshold; scores strictly above it are anomalous.
    method: "fpr" (order statistic at the target), "fpr-max" (too few images for the target:
        the largest validation score), or "f1" (F1-optimal on labelled validation images).
    target_fpr: the false-positive rate asked for (None for "f1").
    num_good / num_defective: validation images (or pixels) behind it.
    rank: k of the order statistic s_(k) (1-based; None for "f1").
    expected_fpr: for "fpr"/"fpr-max", (n + 1 - k) / (n + 1), the rate a new exchangeable good
        image is flagged at, averaged over validation draws; for "f1", the rate on the good
        validation images.
    fpr_upper: 95 % upper bound on this validation set's false-positive rate (Beta quantile;
        image thresholds only, None for pixels and "f1").
    validation_fpr / validation_miss_rate: rates on the validation images themselves (the miss
        rate only with defective validation images).
    f1: F1 on the validation images ("f1" only).
    uncertain: the images cannot support the target (see ``note``).
    note: one sentence for people: what the threshold guarantees, or why it cannot.
    """

    value: float
    method: Method
    target_fpr: float | None
    num_good: int
    num_defective: int = 0
    rank: int | None = None
    expected_fpr: float | None = None
    fpr_upper: float | None = None
    validation_fpr: float | None = None
    validation_miss_rate: float | None = None
    f1: float | None = None
    uncertain: bool = False
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ThresholdEstimate:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CalibrationError(f"unknown threshold field(s) {unknown}")
        return cls(**data)  # type: ignore[arg-type]


def _finite(name: str, values: np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise CalibrationError(f"no {name} to calibrate on")
    if not np.isfinite(array).all():
        raise CalibrationError(f"{name} contain NaN or inf")
    return array


def _kth_smallest(values: np.ndarray, k: int) -> float:
    """s_(k), 1-based, without sorting everything (pixels: millions of values)."""
    return float(np.partition(values, k - 1)[k - 1])


def threshold_at_fpr(
    good_scores: np.ndarray | Sequence[float],
    target_fpr: float = DEFAULT_TARGET_FPR,
    *,
    what: str = "image",
    bound: bool = True,
) -> ThresholdEstimate:
    """The order-statistic threshold of the module docstring from ``good_scores`` [n].

    what: "image" or "pixel" (wording of the note; pixels get no Beta bound).
    bound: compute ``fpr_upper`` (the Beta quantile; images only).
    """
    alpha = _check_rate("target_fpr", target_fpr)
    scores = _finite(f"good {what} scores", np.asarray(good_scores))
    n = scores.size
    k = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)
    unit = "good images" if what == "image" else "good pixels"
    if k > n:
        needed = minimum_images(alpha)
        value = float(scores.max())
        expected = 1.0 / (n + 1)
        note = (
            f"calibration uncertain: {n} {unit} cannot support a {alpha:.4g} false-positive "
            f"rate (it needs at least {needed}); threshold = the largest validation score, "
            f"expected false-positive rate about {expected:.3g}"
        )
        logger.warning("%s", note)
        return ThresholdEstimate(
            value=value, method="fpr-max", target_fpr=alpha, num_good=n, rank=n,
            expected_fpr=expected, fpr_upper=_beta_upper(1, n) if bound else None,
            validation_fpr=0.0, uncertain=True, note=note,
        )
    value = _kth_smallest(scores, k)
    expected = (n + 1 - k) / (n + 1)
    upper = _beta_upper(n + 1 - k, k) if bound else None
    flagged = float(np.mean(scores > value))
    note = (
        f"threshold = the {k}-th smallest of {n} {unit}' scores: a new good "
        f"{'image' if what == 'image' else 'pixel'} is flagged with probability "
        f"{expected:.3g} <= {alpha:.4g} (averaged over validation draws)"
        + (f"; with {CONFIDENCE:.0%} confidence this set's rate is <= {upper:.3g}"
           if upper is not None else "")
    )
    return ThresholdEstimate(
        value=value, method="fpr", target_fpr=alpha, num_good=n, rank=k,
        expected_fpr=expected, fpr_upper=upper, validation_fpr=flagged, note=note,
    )


def _beta_upper(a: int, b: int) -> float:
    """CONFIDENCE quantile of Beta(a, b): the false-positive rate of s_(k) given the set."""
    from scipy.stats import beta

    return float(beta.ppf(CONFIDENCE, a, b))


def threshold_at_f1(
    scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int], *, what: str = "image"
) -> ThresholdEstimate:
    """The F1-optimal threshold on labelled validation scores (anomalous: score > threshold).

    Candidates cut between consecutive distinct scores (the threshold is the midpoint) or below
    the smallest (flagging everything); ties in F1 go to the higher threshold (fewer false
    positives).
    """
    values = _finite(f"{what} scores", np.asarray(scores))
    truth = np.asarray(labels).reshape(-1).astype(bool)
    if truth.shape != values.shape:
        raise CalibrationError(f"{truth.size} labels for {values.size} scores")
    positives = int(truth.sum())
    negatives = values.size - positives
    if positives == 0 or negatives == 0:
        raise CalibrationError("an F1 threshold needs both good and defective validation data")
    order = np.argsort(-values, kind="stable")
    ranked, hits = values[order], truth[order]
    # Flagging the top i (i = 1..n): tp = cumsum(hits). A threshold can only cut between
    # distinct values, so keep the last index of each tie group.
    tp = np.cumsum(hits)
    fp = np.arange(1, values.size + 1) - tp
    last = np.r_[ranked[1:] != ranked[:-1], True]
    tp, fp, ranked_cut = tp[last], fp[last], ranked[last]
    f1 = 2 * tp / (tp + fp + positives)
    best = int(np.flatnonzero(f1 == f1.max())[0])  # the first = the highest threshold
    # Flag the cut's tie group and everything above it: the threshold is half-way down to the
    # next lower score (just below the cut when there is none).
    below = values[values < ranked_cut[best]]
    cut = float(ranked_cut[best])
    value = 0.5 * (cut + float(below.max())) if below.size else float(np.nextafter(cut, -np.inf))
    fpr = float(fp[best] / negatives)
    miss = float(1 - tp[best] / positives)
    return ThresholdEstimate(
        value=value, method="f1", target_fpr=None, num_good=negatives,
        num_defective=positives, expected_fpr=fpr, validation_fpr=fpr,
        validation_miss_rate=miss, f1=float(f1[best]),
        note=(f"F1-optimal threshold on {negatives} good and {positives} defective validation "
              f"{what}s: F1 {f1[best]:.3f}, false-positive rate {fpr:.3g}, miss rate "
              f"{miss:.3g} on them"),
    )


@dataclass(frozen=True)
class Normalisation:
    """anomalib-style min-max normalisation around a threshold (module docstring)."""

    threshold: float
    minimum: float
    maximum: float

    @property
    def span(self) -> float:
        span = self.maximum - self.minimum
        if span > 0 and math.isfinite(span):
            return span
        return abs(self.threshold) or 1.0

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """Normalised scores in [0, 1] (float64, same shape): 0.5 at the threshold, and > 0.5
        exactly for the scores above it (a score a hair above the threshold would otherwise
        round to 0.5: it is moved to the next float above 0.5 so the two never disagree)."""
        array = np.asarray(values, dtype=np.float64)
        out = np.clip((array - self.threshold) / self.span + 0.5, 0.0, 1.0)
        above = array > self.threshold
        return np.where(above, np.maximum(out, np.nextafter(0.5, 1.0)), np.minimum(out, 0.5))


@dataclass(frozen=True)
class Calibration:
    """Everything needed to turn scores into decisions (saved in a site model file).

    image / pixel: the thresholds. image_range / pixel_range: (min, max) validation scores
    behind the normalisations. validation_share / seed: how the validation images were drawn
    (None when they were given whole). num_validation: images scored.
    """

    image: ThresholdEstimate
    pixel: ThresholdEstimate
    image_range: tuple[float, float]
    pixel_range: tuple[float, float]
    num_validation: int
    validation_share: float | None = None
    seed: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def threshold(self) -> float:
        return self.image.value

    @property
    def pixel_threshold(self) -> float:
        return self.pixel.value

    @property
    def uncertain(self) -> bool:
        return self.image.uncertain

    @property
    def image_normalisation(self) -> Normalisation:
        return Normalisation(self.image.value, *self.image_range)

    @property
    def pixel_normalisation(self) -> Normalisation:
        return Normalisation(self.pixel.value, *self.pixel_range)

    def decide(self, image_scores: np.ndarray) -> np.ndarray:
        """[N] bool: anomalous iff score > threshold."""
        return np.asarray(image_scores) > self.image.value

    def masks(self, anomaly_maps: np.ndarray) -> np.ndarray:
        """[..., H, W] bool: pixels above the pixel threshold."""
        return np.asarray(anomaly_maps) > self.pixel.value

    def summary(self) -> str:
        """One line for people: threshold, what backs it, and any warning."""
        image = self.image
        if image.method == "f1":
            basis = f"F1-optimal on {image.num_good} good + {image.num_defective} defective"
        else:
            basis = f"{image.target_fpr:.4g} target FPR from {image.num_good} good"
        line = f"threshold {image.value:.4f} ({basis} validation images)"
        if image.uncertain:
            line += f"; {image.note}"
        return line

    def to_dict(self) -> dict[str, object]:
        return {
            "image": self.image.to_dict(),
            "pixel": self.pixel.to_dict(),
            "image_range": list(self.image_range),
            "pixel_range": list(self.pixel_range),
            "num_validation": self.num_validation,
            "validation_share": self.validation_share,
            "seed": self.seed,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Calibration:
        try:
            return cls(
                image=ThresholdEstimate.from_dict(dict(data["image"])),  # type: ignore[call-overload]
                pixel=ThresholdEstimate.from_dict(dict(data["pixel"])),  # type: ignore[call-overload]
                image_range=tuple(float(v) for v in data["image_range"]),  # type: ignore[arg-type, attr-defined]
                pixel_range=tuple(float(v) for v in data["pixel_range"]),  # type: ignore[arg-type, attr-defined]
                num_validation=int(data["num_validation"]),  # type: ignore[call-overload]
                validation_share=data.get("validation_share"),  # type: ignore[arg-type]
                seed=data.get("seed"),  # type: ignore[arg-type]
                notes=tuple(str(n) for n in data.get("notes", ())),  # type: ignore[attr-defined]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"malformed calibration record: {exc}") from exc


def calibrate(
    image_scores: np.ndarray,
    anomaly_maps: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    target_fpr: float = DEFAULT_TARGET_FPR,
    pixel_target_fpr: float = DEFAULT_PIXEL_TARGET_FPR,
    validation_share: float | None = None,
    seed: int | None = None,
) -> Calibration:
    """Thresholds and normalisations from validation predictions.

    image_scores: [n] scores of the validation images; anomaly_maps: [n, H, W] their maps.
    labels: [n] 1 for defective images (None: all good). With defective images the image
        threshold is F1-optimal; otherwise it is the order statistic at ``target_fpr``.
    masks: [n, H, W] bool ground truth at the maps' geometry (None: no pixel labels). With
        defect pixels the pixel threshold is F1-optimal over all pixels; otherwise it is the
        order statistic of the good images' pixels at ``pixel_target_fpr``.
    """
    _check_rate("target_fpr", target_fpr)
    _check_rate("pixel_target_fpr", pixel_target_fpr)
    scores = _finite("validation image scores", np.asarray(image_scores))
    maps = np.asarray(anomaly_maps, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] != scores.size:
        raise CalibrationError(f"anomaly maps {maps.shape} for {scores.size} image scores")
    truth = np.zeros(scores.size, bool) if labels is None else np.asarray(labels).astype(bool)
    if truth.shape != scores.shape:
        raise CalibrationError(f"{truth.size} labels for {scores.size} scores")
    good = ~truth
    if not good.any():
        raise CalibrationError("calibration needs at least one good validation image")
    notes: list[str] = []
    image = (threshold_at_f1(scores, truth) if truth.any()
             else threshold_at_fpr(scores, target_fpr))
    if image.uncertain:
        notes.append(image.note)
    if masks is not None and np.asarray(masks).any():
        pixel_truth = np.asarray(masks, dtype=bool)
        if pixel_truth.shape != maps.shape:
            raise CalibrationError(f"masks {pixel_truth.shape} for maps {maps.shape}")
        pixel = threshold_at_f1(maps.reshape(-1), pixel_truth.reshape(-1), what="pixel")
    else:
        pixel = threshold_at_fpr(maps[good].reshape(-1), pixel_target_fpr, what="pixel",
                                 bound=False)
    if pixel.uncertain:
        notes.append(pixel.note)
    result = Calibration(
        image=image,
        pixel=pixel,
        image_range=(float(scores.min()), float(scores.max())),
        pixel_range=(float(maps.min()), float(maps.max())),
        num_validation=int(scores.size),
        validation_share=validation_share,
        seed=seed,
        notes=tuple(notes),
    )
    logger.info("calibrated: %s; pixel threshold %.4f", result.summary(), pixel.value)
    return result

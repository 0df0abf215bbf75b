"""Tests for core.metrics: AUROC vs sklearn, AU-PRO / AU-sPRO vs hand-worked values and a
brute-force threshold-by-threshold reference."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from core.metrics import (
    DefectChannel,
    SaturationSpec,
    au_pro,
    au_spro,
    image_auroc,
    pixel_auroc,
)

# --------------------------------------------------------------------------------------------
# Independent brute-force references: one pass over the pixels per distinct threshold.
# --------------------------------------------------------------------------------------------


def _clipped_trapezoid(xs: Sequence[float], ys: Sequence[float], limit: float) -> float:
    """Area under the piecewise-linear curve through (xs, ys) restricted to [0, limit] / limit."""
    area = 0.0
    for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:], strict=True):
        if x1 <= x0 or x0 >= limit:
            continue
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_lim) / 2
    return area / limit


def _brute_au_pro(masks: NDArray[np.bool_], maps: NDArray[np.float64], limit: float) -> float:
    regions: list[NDArray[np.bool_]] = []
    region_maps: list[NDArray[np.float64]] = []
    for mask, amap in zip(masks, maps, strict=True):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        for r in range(1, n + 1):
            regions.append(labels == r)
            region_maps.append(amap)
    ok_scores = maps[~masks]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        xs.append(float(np.mean(ok_scores >= t)))
        ys.append(float(np.mean([np.mean(m[r] >= t) for r, m in zip(regions, region_maps,
                                                                       strict=True)])))
    return _clipped_trapezoid(xs, ys, limit)


def _brute_au_spro(
    gt: Sequence[Sequence[DefectChannel]], maps: Sequence[NDArray[np.float64]], limit: float
) -> float:
    ok_scores = np.concatenate([
        m[~np.any([c.mask for c in chans], axis=0)] if chans else m.ravel()
        for chans, m in zip(gt, maps, strict=True)
    ])
    chans = [(c, m) for cs, m in zip(gt, maps, strict=True) for c in cs]
    all_scores = np.unique(np.concatenate([m.ravel() for m in maps]))
    xs, ys = [0.0], [0.0]
    for t in all_scores[::-1]:
        xs.append(float(np.mean(ok_scores >= t)))
        credits = []
        for c, m in chans:
            area = int(c.mask.sum())
            sat = (c.saturation.threshold * area if c.saturation.relative
                   else min(c.saturation.threshold, area))
            credits.append(min(np.count_nonzero(m[c.mask] >= t) / sat, 1.0))
        ys.append(float(np.mean(credits)))
    return _clipped_trapezoid(xs, ys, limit)


def _random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> NDArray[np.bool_]:
    """Blobby masks: a few random rectangles per image, some images defect-free."""
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if i % 3 == 0:
            continue  # good image
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
            masks[i, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
    masks[1, 0, 0] = True  # make sure there is at least one region
    return masks


# --------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [None, 3, 10])
def test_image_auroc_matches_sklearn(levels: int | None) -> None:
    rng = np.random.default_rng(0 if levels is None else levels)
    labels = rng.integers(0, 2, size=300)
    scores = rng.normal(size=300) + 0.7 * labels
    if levels is not None:  # heavy ties, also across classes
        scores = np.round(scores * levels / 4) / levels
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc(labels.astype(bool), scores) == image_auroc(labels, scores)


def test_image_auroc_hand_values() -> None:
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert image_auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    # One positive tied with one negative: pairs (p, n) = 4, one tie -> (3 + 0.5) / 4.
    assert image_auroc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == 0.875


def test_pixel_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(1)
    masks = _random_masks(rng, 7, 16, 16)
    maps = np.round(rng.normal(size=masks.shape) + masks, 1)  # ~60 levels, many ties
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(masks.astype(np.uint8), maps.astype(np.float32)) == pytest.approx(
        roc_auc_score(masks.ravel(), maps.astype(np.float32).ravel()), abs=1e-12
    )


def test_auroc_input_validation() -> None:
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        pixel_auroc(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        pixel_auroc(np.zeros((4, 4), bool), np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"both classes.*good"):
        pixel_auroc(np.zeros((2, 3, 3), bool), np.random.default_rng(0).random((2, 3, 3)))
    with pytest.raises(ValueError, match=r"both classes.*anomalous"):
        image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"only 0 and 1.*255"):
        pixel_auroc(np.full((1, 2, 2), 255, np.uint8), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        image_auroc([0, 1], [0.0, np.nan])
    with pytest.raises(ValueError, match=r"shape \[N\]"):
        image_auroc([0, 1, 0], [0.0, 1.0])


# --------------------------------------------------------------------------------------------
# AU-PRO
# --------------------------------------------------------------------------------------------


def _two_image_case() -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    """Two 4x4 images, one 2x2 region each; 24 OK pixels.

    Region A (image 0) scores 1.0 everywhere; region B (image 1) has 2 pixels at 1.0 and 2 at 0.0.
    Six OK pixels score 0.5, the other 18 score 0.0. Thresholds:
      t=1.0: FPR 0,       PRO (1 + 1/2)/2 = 3/4
      t=0.5: FPR 6/24,    PRO 3/4
      t=0.0: FPR 1,       PRO 1
    Curve (0,0) (0,3/4) (1/4,3/4) (1,1). To 0.3: 3/16 + 0.05 * (3/4 + 23/30)/2 = 541/2400,
    normalised 541/720. To 1: 3/16 + 3/4 * (3/4 + 1)/2 = 27/32.
    """
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, :2, :2] = True
    masks[1, 2:, 2:] = True
    maps = np.zeros((2, 4, 4))
    maps[0, :2, :2] = 1.0
    maps[1, 2, 2:] = 1.0
    maps[0, 3, :] = 0.5
    maps[1, 0, :2] = 0.5
    return masks, maps


def test_au_pro_hand_worked_two_images() -> None:
    masks, maps = _two_image_case()
    assert au_pro(masks, maps, fpr_limit=0.3) == pytest.approx(541 / 720, abs=1e-12)
    assert au_pro(masks, maps, fpr_limit=1.0) == pytest.approx(27 / 32, abs=1e-12)
    # Limit exactly on a curve point (FPR 1/4): 3/16 / (1/4) = 3/4, no interpolation needed.
    assert au_pro(masks, maps, fpr_limit=0.25) == pytest.approx(0.75, abs=1e-12)


def test_au_pro_perfect_detector_is_one() -> None:
    masks, _ = _two_image_case()
    assert au_pro(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_au_pro_constant_map_is_half_the_limit(limit: float) -> None:
    # One threshold only: curve (0,0) -> (1,1), area limit^2/2, normalised limit/2.
    masks, _ = _two_image_case()
    assert au_pro(masks, np.full(masks.shape, 0.7), fpr_limit=limit) == pytest.approx(limit / 2)


def test_au_pro_uses_eight_connectivity() -> None:
    # (0,0) touches (1,1) only diagonally: with 8-connectivity {(0,0),(1,1),(1,2)} is one region
    # of 3 pixels, PRO at t=1 is 1/3 (4-connectivity would give two regions, PRO 1/2).
    # Curve (0,0) (0,1/3) (1,1): y(0.3) = 1/3 + 0.3*2/3 = 8/15;
    # area 0.3*(1/3 + 8/15)/2, normalised by 0.3: 13/30.
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0] = 1.0
    assert au_pro(masks, maps) == pytest.approx(13 / 30, abs=1e-12)


def test_au_pro_regions_do_not_connect_across_images() -> None:
    # Same pixel position in two images: two regions (sizes 1 and 2), PRO at t=1 is (1 + 0)/2.
    # Curve (0,0) (0,1/2) (1,1): y(0.3) = 0.65, (0.5 + 0.65)/2 = 0.575.
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 0, 0] = True
    masks[1, 0, :2] = True
    maps = np.zeros((2, 3, 3))
    maps[0, 0, 0] = 1.0
    assert au_pro(masks, maps) == pytest.approx(0.575, abs=1e-12)


@pytest.mark.parametrize(("seed", "decimals"), [(0, None), (1, 1), (2, 0)])
@pytest.mark.parametrize("limit", [0.02, 0.3, 1.0])
def test_au_pro_matches_brute_force(seed: int, decimals: int | None, limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, 6, 10, 10)
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    assert au_pro(masks, maps, fpr_limit=limit) == pytest.approx(
        _brute_au_pro(masks, maps, limit), abs=1e-10
    )


def test_au_pro_input_validation() -> None:
    masks, maps = _two_image_case()
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(1, 4, 4\)"):
        au_pro(masks, maps[:1])
    with pytest.raises(ValueError, match="fpr_limit must be in"):
        au_pro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="fpr_limit must be in"):
        au_pro(masks, maps, fpr_limit=1.5)
    with pytest.raises(ValueError, match="at least one defect region"):
        au_pro(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="OK pixels"):
        au_pro(np.ones_like(masks), maps)
    with pytest.raises(ValueError, match="non-finite"):
        au_pro(masks, np.where(masks, np.inf, 0.0))


# --------------------------------------------------------------------------------------------
# AU-sPRO
# --------------------------------------------------------------------------------------------


def _one_channel_case(spec: SaturationSpec, channel_scores: Sequence[float]) -> dict[float, float]:
    """One 4x4 image, one channel = top-left 2x2 (area 4), 12 OK pixels: 3 at 0.5, 9 at 0.0."""
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True
    amap = np.zeros((4, 4))
    amap[3, :3] = 0.5
    amap[mask] = channel_scores
    return au_spro([[DefectChannel(mask, spec)]], [amap])


def test_au_spro_hand_worked_absolute_and_relative() -> None:
    # Channel scores (1, 0, 0, 0), saturation area 2: t=1: TP 1 -> credit 1/2, FPR 0;
    # t=0.5: FPR 3/12; t=0: TP 4 -> credit 1, FPR 1. Curve (0,0) (0,1/2) (1/4,1/2) (1,1).
    # Up to 1/4 the normalised area is 1/2. To 0.3: y(0.3) = 1/2 + 1/2 * 0.05/0.75 = 16/30,
    # (1/8 + 0.05 * (15/30 + 16/30)/2) / 0.3 = 181/360. To 1: 1/8 + 3/4 * 3/4 = 11/16.
    expected = {0.01: 0.5, 0.05: 0.5, 0.1: 0.5, 0.3: 181 / 360, 1.0: 11 / 16}
    for spec in (SaturationSpec(2.0, relative=False), SaturationSpec(0.5, relative=True)):
        result = _one_channel_case(spec, [1.0, 0.0, 0.0, 0.0])
        assert list(result) == [0.01, 0.05, 0.1, 0.3, 1.0]
        for lim, value in expected.items():
            assert result[lim] == pytest.approx(value, abs=1e-12), (spec, lim)


def test_au_spro_absolute_saturation_larger_than_channel_is_channel_area() -> None:
    # min(10, 4) = 4: credit 1/4 at t=1, the same as relative 1.0 (plain region overlap).
    absolute = _one_channel_case(SaturationSpec(10.0, relative=False), [1.0, 0.0, 0.0, 0.0])
    relative = _one_channel_case(SaturationSpec(1.0, relative=True), [1.0, 0.0, 0.0, 0.0])
    assert absolute == pytest.approx(relative, abs=1e-12)
    assert absolute[0.1] == pytest.approx(0.25, abs=1e-12)


def test_au_spro_credit_is_capped_at_one() -> None:
    # 3 of 4 pixels at t=1 with saturation area 2: min(3/2, 1) = 1 from FPR 0 on -> area 1.
    result = _one_channel_case(SaturationSpec(2.0, relative=False), [1.0, 1.0, 1.0, 0.0])
    assert result == pytest.approx(dict.fromkeys(result, 1.0), abs=1e-12)
    # Without the cap the mean credit would be 3/2 and the area above 1.
    assert all(v <= 1.0 for v in result.values())


def test_au_spro_caps_each_channel_before_averaging() -> None:
    # Two channels (2x2 each, saturation area 2) in one 4x4 image, OK pixels all 0.
    # A has 3 pixels at 1.0 -> min(3/2, 1) = 1; B has none -> 0. t=1: sPRO (1 + 0)/2 = 1/2, FPR 0;
    # t=0: sPRO 1, FPR 1. Curve (0,0) (0,1/2) (1,1): normalised area 1/2 + L/4.
    # Averaging uncapped credits would give (3/2 + 0)/2 = 3/4 at t=1 instead.
    spec = SaturationSpec(2.0, relative=False)
    mask_a = np.zeros((4, 4), dtype=bool)
    mask_a[:2, :2] = True
    mask_b = np.zeros((4, 4), dtype=bool)
    mask_b[2:, 2:] = True
    amap = np.zeros((4, 4))
    amap[0, :2] = amap[1, 0] = 1.0
    result = au_spro([[DefectChannel(mask_a, spec), DefectChannel(mask_b, spec)]], [amap],
                     fpr_limits=(0.3, 1.0))
    assert result == pytest.approx({0.3: 0.575, 1.0: 0.75}, abs=1e-12)


def test_au_spro_with_full_relative_saturation_equals_au_pro() -> None:
    # One channel per 8-connected region with relative saturation 1: sPRO == PRO and the OK
    # pixels are the same, so every AU-sPRO equals AU-PRO at that limit.
    rng = np.random.default_rng(4)
    masks = _random_masks(rng, 6, 12, 12)
    maps = np.round(rng.normal(size=masks.shape) + masks, 1)
    spec = SaturationSpec(1.0, relative=True)
    gt = []
    for mask in masks:
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        gt.append([DefectChannel(labels == r, spec) for r in range(1, n + 1)])
    result = au_spro(gt, maps, fpr_limits=(0.05, 0.3, 1.0))
    for lim, value in result.items():
        assert value == pytest.approx(au_pro(masks, maps, fpr_limit=lim), abs=1e-10)


def test_au_spro_matches_brute_force_with_overlaps_and_mixed_specs() -> None:
    rng = np.random.default_rng(5)
    specs = [SaturationSpec(0.3, True), SaturationSpec(5.0, False), SaturationSpec(1.0, True)]
    gt: list[list[DefectChannel]] = []
    maps: list[NDArray[np.float64]] = []
    for i in range(5):
        h, w = (8, 9) if i % 2 else (6, 7)  # images of different sizes
        channels = []
        for _ in range(0 if i == 0 else int(rng.integers(1, 4))):
            mask = np.zeros((h, w), dtype=bool)
            y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
            mask[y : y + rng.integers(1, 4), x : x + rng.integers(1, 5)] = True
            channels.append(DefectChannel(mask, specs[int(rng.integers(0, 3))]))
        defect = np.any([c.mask for c in channels], axis=0) if channels else np.zeros((h, w))
        gt.append(channels)
        maps.append(np.round(rng.normal(size=(h, w)) + defect, 1))
    assert sum(len(c) for c in gt) >= 4
    result = au_spro(gt, maps)
    for lim, value in result.items():
        assert value == pytest.approx(_brute_au_spro(gt, maps, lim), abs=1e-10), lim


def test_au_spro_is_deterministic_and_order_independent() -> None:
    spec = SaturationSpec(0.5, relative=True)
    rng = np.random.default_rng(6)
    masks = _random_masks(rng, 4, 8, 8)
    maps = list(rng.random((4, 8, 8)))
    gt = [[DefectChannel(m, spec)] if m.any() else [] for m in masks]
    first = au_spro(gt, maps)
    assert au_spro(gt, maps) == first
    assert au_spro(gt[::-1], maps[::-1]) == pytest.approx(first, abs=1e-12)


def test_au_spro_input_validation() -> None:
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = True
    spec = SaturationSpec(1.0, relative=True)
    channel = DefectChannel(mask, spec)
    amap = np.zeros((4, 4))
    with pytest.raises(ValueError, match="2 images but anomaly_maps has 1"):
        au_spro([[channel], []], [amap])
    with pytest.raises(ValueError, match=r"gt_channels\[0\]\[0\].mask has shape \(4, 4\) but "
                                         r"anomaly_maps\[0\] has shape \(4, 5\)"):
        au_spro([[channel]], [np.zeros((4, 5))])
    with pytest.raises(ValueError, match="at least one defect channel"):
        au_spro([[], []], [amap, amap])
    with pytest.raises(ValueError, match="OK pixels"):
        au_spro([[DefectChannel(np.ones((2, 2), bool), spec)]], [np.zeros((2, 2))])
    with pytest.raises(ValueError, match="fpr_limits must be in"):
        au_spro([[channel]], [amap], fpr_limits=(0.3, 0.0))
    with pytest.raises(ValueError, match="sequence of floats"):
        au_spro([[channel]], [amap], fpr_limits=0.3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"anomaly_maps\[0\] must have shape \[H, W\]"):
        au_spro([[channel]], [np.zeros((1, 4, 4))])
    with pytest.raises(ValueError, match="must be a DefectChannel"):
        au_spro([[(mask, spec)]], [amap])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        au_spro([[channel]], [amap], [spec])  # type: ignore[misc, list-item]


def test_saturation_spec_and_defect_channel_validation() -> None:
    with pytest.raises(ValueError, match="threshold must be finite and > 0"):
        SaturationSpec(0.0, relative=False)
    with pytest.raises(ValueError, match="threshold must be finite and > 0"):
        SaturationSpec(float("nan"), relative=True)
    with pytest.raises(ValueError, match="must be <= 1"):
        SaturationSpec(1.5, relative=True)
    assert SaturationSpec(1.5, relative=False).saturation_area(4) == 1.5
    assert SaturationSpec(0.25, relative=True).saturation_area(8) == 2.0
    spec = SaturationSpec(1.0, relative=True)
    with pytest.raises(ValueError, match="numpy bool array, got uint8"):
        DefectChannel(np.ones((2, 2), np.uint8), spec)
    with pytest.raises(ValueError, match=r"shape \[H, W\], got shape \(1, 2, 2\)"):
        DefectChannel(np.ones((1, 2, 2), bool), spec)
    with pytest.raises(ValueError, match="no defect pixel"):
        DefectChannel(np.zeros((2, 2), bool), spec)
    with pytest.raises(ValueError, match="must be a SaturationSpec"):
        DefectChannel(np.ones((2, 2), bool), 0.5)  # type: ignore[arg-type]

"""Anomaly maps at the input's size, and evaluation at original or model resolution."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from PIL import Image

from core.data import AutoVIDataset
from core.evaluation import evaluate, upsample_to_original
from core.features import FeatureConfig
from core.metrics import DefectChannel, SaturationSpec, au_pro, au_spro, pixel_auroc
from core.patchcore import PatchCore, PatchCoreConfig, Predictions
from core.preprocess import ImageTransform


@pytest.mark.parametrize("resize", [100, (100, 76)])
def test_maps_have_the_input_size_for_any_size(
    synthetic_root: Path, small_features: FeatureConfig, resize: int | tuple[int, int]
) -> None:
    # 100 is not a multiple of layer2's stride (8): the 13-cell grid spans 104 px
    features = replace(small_features, transform=ImageTransform(resize=resize, crop=None))
    train = AutoVIDataset(synthetic_root, objects=["washer"], split="train").subset(range(4))
    test = AutoVIDataset(synthetic_root, objects=["washer"], split="test")
    model = PatchCore(PatchCoreConfig(features=features, coreset_ratio=0.5)).fit(train)
    predictions = model.predict(test)
    expected = (100, 100) if resize == 100 else (100, 76)
    assert predictions.anomaly_maps.shape == (len(test), *expected)
    for resolution in ("original", "model"):
        result = evaluate(predictions, test, features.transform, resolution=resolution)
        assert result.pixel_auroc is not None and result.au_pro is not None
        assert result.resolution == resolution


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def small_defect_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """AutoVI layout, 120 x 160 images: one good test image and one whose defect channel is
    a 2 x 2 px speck (absolute saturation 3 px) plus a 30 x 30 px scratch (relative 0.5)."""
    root = tmp_path_factory.mktemp("autovi") / "data"
    obj = root / "part"
    rng = np.random.default_rng(0)
    image = lambda: rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)  # noqa: E731
    _write_png(obj / "train" / "good" / "000.png", image())
    _write_png(obj / "test" / "good" / "000.png", image())
    _write_png(obj / "test" / "mixed" / "000.png", image())
    speck = np.zeros((120, 160), np.uint8)
    speck[41:43, 101:103] = 10
    scratch = np.zeros((120, 160), np.uint8)
    scratch[60:90, 20:50] = 20
    _write_png(obj / "ground_truth" / "mixed" / "000" / "0000.png", speck)
    _write_png(obj / "ground_truth" / "mixed" / "000" / "0001.png", scratch)
    (obj / "defects_config.json").write_text(json.dumps([
        {"defect_name": "speck", "pixel_value": 10, "saturation_threshold": 3,
         "relative_saturation": False},
        {"defect_name": "scratch", "pixel_value": 20, "saturation_threshold": 0.5,
         "relative_saturation": True},
    ]))
    return root


def _maps(size: tuple[int, int]) -> np.ndarray:
    """Two maps [2, h, w] of a model input of ``size``: noise, plus a bump on the defects."""
    rng = np.random.default_rng(3)
    maps = rng.random((2, *size)).astype(np.float32)
    h, w = size
    maps[1, int(0.30 * h) : int(0.40 * h), int(0.60 * w) : int(0.68 * w)] += 1.0
    maps[1, int(0.50 * h) : int(0.75 * h), int(0.12 * w) : int(0.31 * w)] += 0.5
    return maps


def test_original_resolution_scores_every_channel_with_thresholds_in_original_pixels(
    small_defect_root: Path,
) -> None:
    test = AutoVIDataset(small_defect_root, split="test")
    transform = ImageTransform(resize=30, crop=None)  # 120 x 160 -> 30 x 40: a 2 px speck is
    maps = _maps((30, 40))  # a half-pixel, nearest resizing drops it
    predictions = Predictions(np.array([0.1, 0.9], np.float32), maps, (4, 5))

    original = evaluate(predictions, test, transform)
    assert original.resolution == "original" and original.dropped_channels == 0
    # the same numbers computed by hand: maps upsampled to 120 x 160, channels as stored
    up = F.interpolate(torch.from_numpy(maps)[:, None], size=(120, 160), mode="bilinear",
                       align_corners=False)[:, 0].numpy()
    channels = test.load_defect_channels(1)
    speck, scratch = (c.mask for c in channels)
    assert speck.sum() == 4 and scratch.sum() == 900
    gt = [[], [DefectChannel(speck, SaturationSpec(3, relative=False)),
               DefectChannel(scratch, SaturationSpec(0.5, relative=True))]]
    expected = au_spro(gt, list(up))
    assert original.au_spro == pytest.approx(expected, abs=1e-12)
    masks = np.stack([np.zeros_like(speck), speck | scratch])
    assert original.pixel_auroc == pytest.approx(pixel_auroc(masks, up), abs=1e-12)
    assert original.au_pro == pytest.approx(au_pro(masks, up), abs=1e-12)

    model = evaluate(predictions, test, transform, resolution="model")
    assert model.dropped_channels == 1  # the speck vanished at 30 x 40
    assert model.au_spro != pytest.approx(original.au_spro, abs=1e-6)


def test_model_resolution_scales_absolute_thresholds_and_original_refuses_a_crop(
    small_defect_root: Path,
) -> None:
    test = AutoVIDataset(small_defect_root, split="test")
    transform = ImageTransform(resize=60, crop=None)  # 120 x 160 -> 60 x 80: area ratio 1/4
    maps = _maps((60, 80))
    predictions = Predictions(np.array([0.1, 0.9], np.float32), maps, (8, 10))
    result = evaluate(predictions, test, transform, resolution="model")
    assert result.dropped_channels == 0
    speck, scratch = (transform.mask(c.mask) for c in test.load_defect_channels(1))
    gt = [[], [DefectChannel(speck, SaturationSpec(3 / 4, relative=False)),
               DefectChannel(scratch, SaturationSpec(0.5, relative=True))]]
    assert result.au_spro == pytest.approx(au_spro(gt, list(maps)), abs=1e-12)

    cropped = ImageTransform(resize=60, crop=56)
    with pytest.raises(ValueError, match=r"000\.png.*crops.*resolution='model'"):
        evaluate(Predictions(predictions.image_scores, maps[:, 2:58, 12:68], (7, 7)), test,
                 cropped)
    with pytest.raises(ValueError, match="resolution must be"):
        evaluate(predictions, test, transform, resolution="full")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not what the transform makes"):
        upsample_to_original(maps[0, :30], (120, 160), transform)


def test_pixel_metrics_take_images_of_different_sizes() -> None:
    rng = np.random.default_rng(5)
    masks = [rng.random((12, 9)) > 0.8, rng.random((7, 15)) > 0.7, np.zeros((5, 5), bool)]
    maps = [rng.random(m.shape) + m for m in masks]
    # pooled over pixels: as one flat image; regions: labelled per image, never across images
    flat_mask = np.concatenate([m.ravel() for m in masks])[None, None]
    flat_map = np.concatenate([s.ravel() for s in maps])[None, None]
    assert pixel_auroc(masks, maps) == pytest.approx(pixel_auroc(flat_mask, flat_map), abs=1e-12)
    padded_masks = np.zeros((3, 12, 15), bool)
    padded_maps = np.full((3, 12, 15), -1.0)  # padding: OK pixels below every real score
    for i, (m, s) in enumerate(zip(masks, maps, strict=True)):
        padded_masks[i, : m.shape[0], : m.shape[1]] = m
        padded_maps[i, : m.shape[0], : m.shape[1]] = s
    # the padding adds OK pixels only at the lowest threshold, so up to FPR 0.3 the curves of
    # the padded stack are the list's with FPR scaled by the OK-pixel counts
    ok_list = sum(int((~m).sum()) for m in masks)
    ok_padded = int((~padded_masks).sum())
    limit = 0.3 * ok_list / ok_padded
    assert au_pro(masks, maps) == pytest.approx(
        au_pro(padded_masks, padded_maps, fpr_limit=limit), abs=1e-9
    )
    with pytest.raises(ValueError, match=r"masks\[1\] and anomaly_maps\[1\]"):
        pixel_auroc(masks, [maps[0], maps[0], maps[2]])

"""A realistic-texture dataset cut from real photographs that ship with scikit-learn.

The synthetic categories (core.data.synthetic) are clean periodic patterns: PatchCore's image
AUROC saturates on them, so they cannot show a small loss of a federated bank. Here the normal
images are crops of real photographs (``sklearn.datasets.load_sample_images``: ``china.jpg``, a
temple with trees and sky, and ``flower.jpg``, both 427 x 640, bundled in the scikit-learn wheel,
no network), with the natural irregularity of real texture; the defect images carry the
synthetic generator's defects (:func:`~core.data.synthetic.paint_defect`), so the ground truth is
exact.

Categories (each a region of one photograph; crops of 0.3-0.45 x the region height at a random
position, random horizontal flip, resized to the image size, then sensor noise):

    china_left    the left half of china.jpg (roof, pillars, foliage)
    china_right   the right half of china.jpg (foliage, sky, building)
    flower        the whole of flower.jpg (petals, leaves, dark background)

Images are drawn from generators seeded by (seed, category, split, index), so the same seed
gives byte-identical files. Layout as the synthetic generator's ("autovi" or "mvtec").
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from core.data.defects import DEFECTS_CONFIG_FILENAME, defects_config_to_json
from core.data.sample import GOOD
from core.data.synthetic import (
    _CHANNEL_TYPES,
    LAYOUTS,
    SyntheticConfig,
    _save_png,
    paint_defect,
    synthetic_defect_types,
)

logger = logging.getLogger(__name__)

__all__ = ["PHOTO_CATEGORIES", "generate_photo_dataset", "render_photo_image"]

#: category -> (photograph file name, region (top, bottom, left, right) as fractions).
_REGIONS: dict[str, tuple[str, tuple[float, float, float, float]]] = {
    "china_left": ("china.jpg", (0.0, 1.0, 0.0, 0.5)),
    "china_right": ("china.jpg", (0.0, 1.0, 0.5, 1.0)),
    "flower": ("flower.jpg", (0.0, 1.0, 0.0, 1.0)),
}
PHOTO_CATEGORIES: tuple[str, ...] = tuple(_REGIONS)
_SPLIT_CODE = {"train": 0, "test": 1}

_PHOTOS: dict[str, np.ndarray] = {}


def _photo(name: str) -> np.ndarray:
    """uint8 [427, 640, 3] photograph from scikit-learn's bundled sample images (cached)."""
    if name not in _PHOTOS:
        from sklearn.datasets import load_sample_images  # heavy import, only when used

        sample = load_sample_images()
        for path, image in zip(sample.filenames, sample.images, strict=True):
            _PHOTOS[Path(path).name] = np.asarray(image, dtype=np.uint8)
    if name not in _PHOTOS:
        raise FileNotFoundError(f"scikit-learn ships no sample image {name!r}")
    return _PHOTOS[name]


def photo_image_rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split`` of ``category`` (crc32: not salted)."""
    return np.random.default_rng([seed, zlib.crc32(category.encode()), _SPLIT_CODE[split], index])


def render_photo_image(
    category: str, image_size: int, rng: np.random.Generator, defect: str = GOOD
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One crop of ``category``'s photograph region, with ``defect`` painted on it.

    Returns (uint8 [S, S, 3], one bool [S, S] mask per defect channel; empty for "good").
    Crop, flip and noise come from child generators apart from the defect's, so the same state
    with and without a defect differs only on the defect's mask (before noise).
    """
    if category not in _REGIONS:
        raise ValueError(f"unknown photo category {category!r}, expected one of {PHOTO_CATEGORIES}")
    crop_rng, noise_rng, defect_rng = rng.spawn(3)
    name, (top, bottom, left, right) = _REGIONS[category]
    photo = _photo(name)
    h, w = photo.shape[:2]
    y0, y1, x0, x1 = int(top * h), int(bottom * h), int(left * w), int(right * w)
    side = round(crop_rng.uniform(0.30, 0.45) * (y1 - y0))
    side = min(side, y1 - y0, x1 - x0)
    y = int(crop_rng.integers(y0, y1 - side + 1))
    x = int(crop_rng.integers(x0, x1 - side + 1))
    crop = photo[y : y + side, x : x + side]
    if crop_rng.uniform() < 0.5:
        crop = crop[:, ::-1]
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize(
        (image_size, image_size), Image.Resampling.BILINEAR
    )
    image = np.asarray(resized, dtype=np.uint8)
    channels: list[np.ndarray] = []
    if defect != GOOD:
        image, channels = paint_defect(image, defect, defect_rng)
    noise = noise_rng.normal(0.0, 3.0, size=image.shape)
    return np.clip(np.rint(image + noise), 0, 255).astype(np.uint8), channels


def generate_photo_dataset(
    root: str | Path,
    categories: Sequence[str] = PHOTO_CATEGORIES,
    num_train: int = 60,
    num_test: int = 100,
    image_size: int = 128,
    seed: int = 0,
    layout: str = "autovi",
) -> Path:
    """Write the photograph-crop dataset under ``root`` (must not exist or be empty).

    The same folder layout, test plan (first ceil(num_test / 2) good, then the defects in
    turn) and defects_config.json as :func:`~core.data.synthetic.generate_synthetic_dataset`.
    Raises ValueError for unknown categories or bad sizes, FileExistsError for a used root.
    """
    unknown = [c for c in categories if c not in _REGIONS]
    if unknown or not categories or len(set(categories)) != len(categories):
        raise ValueError(
            f"categories must be distinct names from {PHOTO_CATEGORIES}, got {list(categories)}"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    # Validates the counts, size and seed the same way as the synthetic generator.
    plan = SyntheticConfig(
        categories=("fabric",), num_train=num_train, num_test=num_test,
        image_size=image_size, seed=seed, layout=layout,
    ).test_plan()
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"photo dataset root {root} exists and is not an empty folder")
    root.mkdir(parents=True, exist_ok=True)
    types = synthetic_defect_types(image_size)
    pixel_value = {t.name: t.pixel_value for t in types}
    for category in categories:
        cat_dir = root / category
        for i in range(num_train):
            image, _ = render_photo_image(
                category, image_size, photo_image_rng(seed, category, "train", i)
            )
            _save_png(image, cat_dir / "train" / GOOD / f"{i:03d}.png")
        counters: dict[str, int] = {}
        for j, defect in enumerate(plan):
            image, channels = render_photo_image(
                category, image_size, photo_image_rng(seed, category, "test", j), defect
            )
            stem = f"{counters.get(defect, 0):03d}"
            counters[defect] = counters.get(defect, 0) + 1
            _save_png(image, cat_dir / "test" / defect / f"{stem}.png")
            if defect == GOOD:
                continue
            gt_dir = cat_dir / "ground_truth" / defect
            if layout == "mvtec":
                union = np.logical_or.reduce(channels)
                _save_png(union.astype(np.uint8) * np.uint8(255), gt_dir / f"{stem}_mask.png")
                continue
            for c, (channel, kind) in enumerate(zip(channels, _CHANNEL_TYPES[defect], strict=True)):
                value = np.uint8(pixel_value[kind])
                _save_png(channel.astype(np.uint8) * value, gt_dir / stem / f"{c:04d}.png")
        if layout == "autovi":
            (cat_dir / DEFECTS_CONFIG_FILENAME).write_text(
                defects_config_to_json(types), encoding="utf-8"
            )
    logger.info(
        "photo dataset in %s: %d categories, %d train + %d test images each, %d px",
        root, len(categories), num_train, num_test, image_size,
    )
    return root

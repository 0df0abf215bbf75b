"""Setup shared by the federated-parity and codec-tradeoff benchmarks.

* :class:`SyntheticSetting` / :func:`generate_setting`: one generated dataset (AutoVI layout, so
  AU-sPRO is defined) and its whole train / test splits.
* :func:`random_feature_config`: a seeded random-init backbone (no network on the benchmark
  machines), identical on every site through ``FeatureConfig.init_seed``.
* :class:`FeatureCache` / :func:`predict_cached`: the test set's patch features are extracted
  once and scored against many banks. Every bank here comes from the same frozen backbone, so
  re-running the backbone per bank would only repeat identical work (about 80 % of a predict).
  :func:`verify_cached_scoring` checks the shortcut against ``PatchCore.predict``.
* :func:`realised_radii`: the realised coverage radius of many banks over a dataset's training
  patches in one streaming pass (memory: one batch of features, never all training patches).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.data import AnomalyDataset, AutoVIDataset, generate_synthetic_dataset
from core.evaluation import EvaluationResult, evaluate
from core.features import FeatureConfig
from core.knn import NearestNeighbourIndex
from core.patchcore import ImageSource, PatchCore, Predictions
from core.preprocess import ImageTransform

logger = logging.getLogger(__name__)

__all__ = [
    "FeatureCache",
    "SyntheticSetting",
    "evaluate_cached",
    "generate_setting",
    "metric_row",
    "predict_cached",
    "random_feature_config",
    "realised_radii",
    "verify_cached_scoring",
]

#: sPRO integration limit reported in the tables (AutoVI's headline limit).
SPRO_LIMIT = 0.3


@dataclass(frozen=True)
class SyntheticSetting:
    """What the synthetic generator writes (see core.data.SyntheticConfig).

    categories: synthetic category names. num_train / num_test: images per category.
    image_size: side of the generated images, px. seed: generator seed.
    """

    categories: tuple[str, ...]
    num_train: int
    num_test: int
    image_size: int
    seed: int = 0

    def describe(self) -> str:
        return (
            f"{len(self.categories)} categories ({', '.join(self.categories)}), "
            f"{self.num_train} train + {self.num_test} test images each, "
            f"{self.image_size} px, seed {self.seed}"
        )


def generate_setting(
    root: Path, setting: SyntheticSetting
) -> tuple[AnomalyDataset, AnomalyDataset]:
    """Generate ``setting`` under ``root`` (AutoVI layout); return the whole (train, test)."""
    start = time.perf_counter()
    generate_synthetic_dataset(
        root,
        categories=setting.categories,
        num_train=setting.num_train,
        num_test=setting.num_test,
        image_size=setting.image_size,
        seed=setting.seed,
        layout="autovi",
    )
    logger.info("generated %s in %.1f s", setting.describe(), time.perf_counter() - start)
    return AutoVIDataset(root, split="train"), AutoVIDataset(root, split="test")


def random_feature_config(
    backbone: str,
    resize: int,
    crop: int | None = None,
    *,
    init_seed: int = 0,
) -> FeatureConfig:
    """Random-init ``backbone`` (layer2 + layer3, D = 1024) seeded by ``init_seed``."""
    return FeatureConfig(
        backbone=backbone,
        pretrained=False,
        transform=ImageTransform(resize=resize, crop=crop),
        init_seed=init_seed,
    )


@dataclass(frozen=True)
class FeatureCache:
    """Patch features of a whole image set, batch by batch, as ``PatchCore.iter_features``
    yields them.

    batches: per batch, features [b, h*w, D] float32 (CPU). grid: (h, w) of the patch grid.
    input_size: (H, W) of the transformed images (the anomaly maps' size).
    Memory is N x h*w x D x 4 bytes (a 64-image test set at 64 px: 17 MB; at 224 px: 206 MB).
    """

    batches: tuple[torch.Tensor, ...]
    grid: tuple[int, int]
    input_size: tuple[int, int]

    @classmethod
    def extract(cls, model: PatchCore, images: ImageSource) -> FeatureCache:
        batches: list[torch.Tensor] = []
        grids: set[tuple[tuple[int, int], tuple[int, int]]] = set()
        for _, features, grid, size in model._iter_batches(images):
            batches.append(features)
            grids.add((grid, size))
        if len(grids) != 1:
            raise ValueError(
                f"need one patch grid and input size for the whole image set, got {sorted(grids)}"
            )
        grid, size = grids.pop()
        return cls(tuple(batches), grid, size)

    @property
    def num_images(self) -> int:
        return sum(int(b.shape[0]) for b in self.batches)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.batches)


def predict_cached(model: PatchCore, cache: FeatureCache) -> Predictions:
    """``model.predict(images)`` from the cached features of ``images``, with ``model``'s
    current bank. :func:`verify_cached_scoring` checks the two agree."""
    scores: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    for features in cache.batches:
        patch_scores, image_scores = model.score_patches(features)
        scores.append(image_scores)
        # PatchCore.predict's own upsample + blur, so the maps cannot drift from it.
        maps.append(model._anomaly_maps(patch_scores, cache.grid, cache.input_size))
    return Predictions(
        image_scores=np.concatenate(scores),
        anomaly_maps=np.concatenate(maps),
        patch_grid=cache.grid,
    )


def verify_cached_scoring(model: PatchCore, cache: FeatureCache, images: ImageSource) -> None:
    """Raise AssertionError unless :func:`predict_cached` equals ``model.predict(images)``."""
    reference = model.predict(images)
    cached = predict_cached(model, cache)
    if not (
        np.allclose(reference.image_scores, cached.image_scores, rtol=1e-5, atol=1e-6)
        and np.allclose(reference.anomaly_maps, cached.anomaly_maps, rtol=1e-5, atol=1e-5)
    ):
        raise AssertionError("scoring from cached features differs from PatchCore.predict")
    logger.info("scoring from cached features matches PatchCore.predict")


def evaluate_cached(
    model: PatchCore, cache: FeatureCache, test: AnomalyDataset
) -> EvaluationResult:
    """Score ``test`` (cached as ``cache``) with ``model``'s bank and evaluate it."""
    return evaluate(
        predict_cached(model, cache), test, model.config.features.transform, resolution="model"
    )


def metric_row(result: EvaluationResult) -> list[object]:
    """[image AUROC, pixel AUROC, AU-PRO, AU-sPRO@0.3] ("n/a" where undefined)."""
    values = [result.image_auroc, result.pixel_auroc, result.au_pro,
              result.au_spro.get(SPRO_LIMIT)]
    return [float(v) if v is not None else "n/a" for v in values]


def realised_radii(
    model: PatchCore,
    images: ImageSource,
    banks: Mapping[str, np.ndarray],
) -> dict[str, float]:
    """Realised coverage radius of every bank: max over all patches of ``images`` of the
    Euclidean distance to the nearest bank row.

    One pass of ``model``'s backbone over ``images``; each batch of patch features [b*h*w, D] is
    searched against every bank (exact kNN), then dropped.
    """
    indexes = {
        name: NearestNeighbourIndex(bank, backend=model.config.knn_backend)
        for name, bank in banks.items()
    }
    radii = dict.fromkeys(banks, 0.0)
    for _, features, _ in model.iter_features(images):
        flat = features.reshape(-1, features.shape[-1])
        for name, index in indexes.items():
            distances, _ = index.search(flat, 1)
            radii[name] = max(radii[name], float(distances.max()))
    return radii

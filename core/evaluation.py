"""Score predictions against a labelled test set: image/pixel AUROC, AU-PRO, AU-sPRO.

Two resolutions (``evaluate(..., resolution=...)``):

* ``"original"`` (default), the official AutoVI / MVTec LOCO protocol: each anomaly map is
  upsampled (bilinear) to its image's original size and compared with the ground truth as
  stored, so every defect channel is scored and the ``defects_config.json`` saturation
  thresholds apply in the original pixels they are written in. It needs a transform without a
  centre crop: a crop discards border pixels the maps cannot cover.
* ``"model"``: the PatchCore paper's protocol (and what this project did before): ground truth
  is brought to the maps' geometry with the model's own transform (nearest resize + the same
  centre crop). Absolute saturation thresholds are scaled by the resize's area ratio so they
  still mean the same physical area; a channel that vanishes at this resolution cannot be scored
  and is dropped (counted in ``dropped_channels``, with a warning).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)

from core.data import AnomalyDataset
from core.data.imageio import image_size
from core.metrics import (
    Curve,
    DefectChannel,
    SaturationSpec,
    au_spro,
    image_auroc,
    pixel_auroc,
    pro_curve,
    roc_curve,
)
from core.patchcore import Predictions
from core.preprocess import ImageTransform

logger = logging.getLogger(__name__)

__all__ = [
    "AU_PRO_FPR_LIMIT",
    "EvaluationResult",
    "Resolution",
    "evaluate",
    "evaluate_per_category",
    "upsample_to_original",
]

#: FPR limit of the reported AU-PRO (the MVTec AD convention).
AU_PRO_FPR_LIMIT = 0.3

Resolution = Literal["original", "model"]


@dataclass(frozen=True)
class EvaluationResult:
    """Metrics of one test set; a metric is None where the test set cannot define it
    (e.g. AUROC without both good and defective images)."""

    image_auroc: float | None
    pixel_auroc: float | None
    au_pro: float | None
    au_spro: dict[float, float] = field(default_factory=dict)
    num_images: int = 0
    num_anomalous: int = 0
    dropped_channels: int = 0
    resolution: Resolution = "original"
    #: With ``evaluate(..., curves=True)``: "roc" (image ROC) and "pro" (the PRO curve au_pro
    #: integrates), each where its metric is defined. Not part of ``as_dict``.
    curves: dict[str, Curve] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "image_auroc": self.image_auroc,
            "pixel_auroc": self.pixel_auroc,
            "au_pro": self.au_pro,
            "num_images": self.num_images,
            "num_anomalous": self.num_anomalous,
            "resolution": self.resolution,
        }
        for limit, value in sorted(self.au_spro.items()):
            out[f"au_spro@{limit:g}"] = value
        return out


def upsample_to_original(
    anomaly_map: np.ndarray, original: tuple[int, int], transform: ImageTransform
) -> np.ndarray:
    """One anomaly map [h, w] at the model's input size -> [H, W] at the image's original size.

    Bilinear (``align_corners=False``), the inverse geometry of the transform's resize. Raises
    ValueError if the map is not the transform's output size for ``original``, or if the
    transform crops pixels away (the map then does not cover the whole image).
    """
    height, width = original
    expected = transform.output_shape(height, width)
    if anomaly_map.shape != expected:
        raise ValueError(
            f"anomaly map {anomaly_map.shape} is not what the transform makes of a "
            f"{height}x{width} image ({expected})"
        )
    if transform.crop is not None and expected != transform.resized_shape(height, width):
        raise ValueError(
            f"the transform crops the {transform.resized_shape(height, width)} resized image to "
            f"{expected}: the anomaly maps do not cover the original image, so it cannot be "
            "evaluated at original resolution. Use a transform without crop "
            "(ImageTransform(resize=..., crop=None)) or evaluate(..., resolution='model')"
        )
    tensor = torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=original, mode="bilinear", align_corners=False)[0, 0].numpy()


def evaluate(
    predictions: Predictions,
    dataset: AnomalyDataset,
    transform: ImageTransform,
    *,
    resolution: Resolution = "original",
    with_spro: bool = True,
    curves: bool = False,
) -> EvaluationResult:
    """Compare ``predictions`` (from ``PatchCore.predict(dataset)``) with ``dataset``'s labels.

    ``transform`` must be the model's (``config.features.transform``). ``resolution`` chooses
    the protocol (module docstring): "original" upsamples every map to its image's size (the
    official AutoVI protocol; needs a transform without crop), "model" resizes the ground truth
    to the maps. AU-sPRO uses each category's defects config. ``curves`` also returns the image
    ROC and the PRO curve (for a report's plots; the PRO curve costs nothing extra, AU-PRO is
    its area).
    """
    if resolution not in ("original", "model"):
        raise ValueError(f"resolution must be 'original' or 'model', got {resolution!r}")
    n = len(dataset)
    if predictions.image_scores.shape[0] != n:
        raise ValueError(
            f"{predictions.image_scores.shape[0]} predictions for a dataset of {n} images"
        )
    if predictions.anomaly_maps.shape[0] != n:
        raise ValueError(
            f"{predictions.anomaly_maps.shape[0]} anomaly maps for a dataset of {n} images"
        )
    labels = dataset.labels.astype(bool)
    if resolution == "original":
        masks, maps, channels, dropped = _at_original_resolution(predictions, dataset, transform)
    else:
        masks, maps, channels, dropped = _at_model_resolution(predictions, dataset, transform)
    both_classes = labels.any() and not labels.all()
    has_defect_pixels = any(m.any() for m in masks)
    found: dict[str, Curve] = {}
    if curves and both_classes:
        found["roc"] = roc_curve(labels, predictions.image_scores)
    if has_defect_pixels:
        found["pro"] = pro_curve(masks, maps)
    return EvaluationResult(
        image_auroc=image_auroc(labels, predictions.image_scores) if both_classes else None,
        pixel_auroc=pixel_auroc(masks, maps) if has_defect_pixels else None,
        au_pro=found["pro"].area(AU_PRO_FPR_LIMIT) if has_defect_pixels else None,
        au_spro=au_spro(channels, maps) if with_spro and has_defect_pixels else {},
        num_images=n,
        num_anomalous=int(labels.sum()),
        dropped_channels=dropped,
        resolution=resolution,
        curves=found if curves else {},
    )


def evaluate_per_category(
    predictions: Predictions,
    dataset: AnomalyDataset,
    transform: ImageTransform,
    *,
    resolution: Resolution = "original",
    with_spro: bool = True,
) -> dict[str, EvaluationResult]:
    """:func:`evaluate` on each category's images separately: {category: result}.

    Metrics are not averaged across categories in the literature but reported per category
    (scores of different objects are not comparable); this gives those rows.
    """
    categories = np.array([s.category for s in dataset])
    out: dict[str, EvaluationResult] = {}
    for category in dataset.categories:
        idx = np.flatnonzero(categories == category)
        part = Predictions(
            image_scores=predictions.image_scores[idx],
            anomaly_maps=predictions.anomaly_maps[idx],
            patch_grid=predictions.patch_grid,
        )
        out[category] = evaluate(part, dataset.subset(idx), transform, resolution=resolution,
                                 with_spro=with_spro)
    return out


_Prepared = tuple[
    np.ndarray | list[np.ndarray], np.ndarray | list[np.ndarray], list[list[DefectChannel]], int
]


def _at_original_resolution(
    predictions: Predictions, dataset: AnomalyDataset, transform: ImageTransform
) -> _Prepared:
    """Per image: map upsampled to the original size, masks and thresholds as stored."""
    masks: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    channels: list[list[DefectChannel]] = []
    for i in range(len(dataset)):
        sample = dataset[i]
        ground_truth = dataset.load_defect_channels(i) if sample.mask_paths else []
        size = ground_truth[0].mask.shape if ground_truth else image_size(sample.image_path)
        try:
            maps.append(upsample_to_original(predictions.anomaly_maps[i], size, transform))
        except ValueError as exc:
            raise ValueError(f"{sample.image_path}: {exc}") from exc
        mask = np.zeros(size, dtype=bool)
        image_channels = []
        for channel in ground_truth:
            mask |= channel.mask
            image_channels.append(DefectChannel(mask=channel.mask, saturation=channel.saturation))
        masks.append(mask)
        channels.append(image_channels)
    return masks, maps, channels, 0


def _at_model_resolution(
    predictions: Predictions, dataset: AnomalyDataset, transform: ImageTransform
) -> _Prepared:
    """Ground truth resized and cropped like the images; absolute thresholds scaled with it."""
    n = len(dataset)
    size = predictions.anomaly_maps.shape[1:]
    masks = np.zeros((n, *size), dtype=bool)
    channels: list[list[DefectChannel]] = []
    dropped = 0
    for i in range(n):
        image_channels: list[DefectChannel] = []
        for channel in dataset.load_defect_channels(i) if dataset[i].mask_paths else []:
            mask = transform.mask(channel.mask)
            if mask.shape != size:
                raise ValueError(
                    f"ground truth of {dataset[i].image_path} transforms to {mask.shape}, "
                    f"anomaly maps are {size}"
                )
            if not mask.any():
                dropped += 1
                continue
            masks[i] |= mask
            saturation = _scaled_saturation(channel.saturation, channel.mask.shape, transform)
            image_channels.append(DefectChannel(mask=mask, saturation=saturation))
        channels.append(image_channels)
    if dropped:
        logger.warning(
            "%d defect channel(s) vanished at %s and were not scored (evaluate at "
            "resolution='original' to score every channel)", dropped, size,
        )
    return masks, predictions.anomaly_maps, channels, dropped


def _scaled_saturation(
    spec: SaturationSpec, original: tuple[int, int], transform: ImageTransform
) -> SaturationSpec:
    """An absolute saturation area (original pixels) in the resized image's pixels.

    A relative threshold is a fraction of the channel and needs no change. An absolute one
    counts original pixels; after resizing H x W -> h x w a region covers h*w / (H*W) as many
    pixels, so the threshold is scaled by that ratio (the crop removes pixels, it does not
    rescale them).
    """
    if spec.relative:
        return spec
    h, w = transform.resized_shape(*original)
    ratio = (h * w) / (original[0] * original[1])
    return SaturationSpec(threshold=spec.threshold * ratio, relative=False)

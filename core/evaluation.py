"""Score predictions against a labelled test set: image/pixel AUROC, AU-PRO, AU-sPRO.

Ground truth is brought to the anomaly maps' geometry with the model's own transform (nearest
resize + the same centre crop), so every metric compares the pixels the model actually saw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from core.data import AnomalyDataset
from core.metrics import DefectChannel, au_pro, au_spro, image_auroc, pixel_auroc
from core.patchcore import Predictions
from core.preprocess import ImageTransform

logger = logging.getLogger(__name__)

__all__ = ["EvaluationResult", "evaluate"]


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

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "image_auroc": self.image_auroc,
            "pixel_auroc": self.pixel_auroc,
            "au_pro": self.au_pro,
            "num_images": self.num_images,
            "num_anomalous": self.num_anomalous,
        }
        for limit, value in sorted(self.au_spro.items()):
            out[f"au_spro@{limit:g}"] = value
        return out


def evaluate(
    predictions: Predictions,
    dataset: AnomalyDataset,
    transform: ImageTransform,
    *,
    with_spro: bool = True,
) -> EvaluationResult:
    """Compare ``predictions`` (from ``PatchCore.predict(dataset)``) with ``dataset``'s labels.

    ``transform`` must be the model's (``config.features.transform``). AU-sPRO uses each
    category's defects config; a defect channel that vanishes at the model's resolution (a
    defect smaller than a pixel after resizing) cannot be scored and is dropped with a warning.
    """
    n = len(dataset)
    if predictions.image_scores.shape[0] != n:
        raise ValueError(
            f"{predictions.image_scores.shape[0]} predictions for a dataset of {n} images"
        )
    labels = dataset.labels.astype(bool)
    size = predictions.anomaly_maps.shape[1:]
    masks = np.zeros((n, *size), dtype=bool)
    channels: list[list[DefectChannel]] = []
    dropped = 0
    for i in range(n):
        image_channels: list[DefectChannel] = []
        if labels[i]:
            for channel in dataset.load_defect_channels(i):
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
                image_channels.append(DefectChannel(mask=mask, saturation=channel.saturation))
        channels.append(image_channels)
    if dropped:
        logger.warning("%d defect channel(s) vanished at %s and were not scored", dropped, size)
    both_classes = labels.any() and not labels.all()
    has_defect_pixels = masks.any()
    maps = predictions.anomaly_maps
    return EvaluationResult(
        image_auroc=image_auroc(labels, predictions.image_scores) if both_classes else None,
        pixel_auroc=pixel_auroc(masks, maps) if has_defect_pixels else None,
        au_pro=au_pro(masks, maps) if has_defect_pixels else None,
        au_spro=au_spro(channels, maps) if with_spro and has_defect_pixels else {},
        num_images=n,
        num_anomalous=int(labels.sum()),
        dropped_channels=dropped,
    )

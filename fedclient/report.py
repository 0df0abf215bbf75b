"""What a site writes after scoring: ``metrics.json`` and anomaly-map overlay PNGs.

Overlays show the image as the model saw it (after the extractor's resize/crop, so pixels line
up with the anomaly map [H, W]) with the map blended on top in a blue -> red colour ramp. The
ramp is scaled by one range for all images of a run (``vmin``/``vmax``), so a brighter overlay
means a higher score across images, not only within one.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from PIL import Image

from core.preprocess import ImageTransform

logger = logging.getLogger(__name__)

__all__ = ["colorize", "overlay", "write_metrics", "write_overlays"]

# Anchors of the colour ramp (value in [0, 1] -> RGB): dark blue, cyan, yellow, red.
_RAMP_POINTS = np.array([0.0, 0.35, 0.65, 1.0])
_RAMP_COLOURS = np.array(
    [[0, 0, 140], [0, 200, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float64
)


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """[H, W] scores -> uint8 [H, W, 3] colours; values are clipped to [vmin, vmax]."""
    span = vmax - vmin
    scaled = np.clip((values - vmin) / span, 0.0, 1.0) if span > 0 else np.zeros_like(values)
    channels = [np.interp(scaled, _RAMP_POINTS, _RAMP_COLOURS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    transform: ImageTransform,
    *,
    vmin: float,
    vmax: float,
    alpha: float = 0.45,
) -> np.ndarray:
    """uint8 [H0, W0, 3] image + [H, W] map -> uint8 [H, W, 3] blend at the map's geometry."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    tensor = torch.tensor(image).permute(2, 0, 1).float()[None] / 255.0
    size = transform.resized_shape(*image.shape[:2])
    tensor = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)
    tensor = transform._crop(tensor)[0]  # the same geometry the model saw
    if tuple(tensor.shape[-2:]) != anomaly_map.shape:
        raise ValueError(
            f"image transforms to {tuple(tensor.shape[-2:])}, the anomaly map is "
            f"{anomaly_map.shape}"
        )
    base = (tensor.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).astype(np.float64)
    heat = colorize(anomaly_map, vmin, vmax).astype(np.float64)
    return ((1 - alpha) * base + alpha * heat).round().astype(np.uint8)


def write_overlays(
    out_dir: Path,
    names: Sequence[str],
    anomaly_maps: np.ndarray,
    transform: ImageTransform,
    *,
    load_image: Callable[[int], np.ndarray],
) -> list[Path]:
    """Write one ``<name>.png`` overlay per image into ``out_dir``; returns the paths.

    ``anomaly_maps`` [N, H, W]; ``load_image(i)`` gives image i as uint8 [H0, W0, 3] (one at a
    time, so a large test set is never held in memory). The colour range is the 1st to 99.9th
    percentile of all maps.
    """
    if len(names) != anomaly_maps.shape[0]:
        raise ValueError(f"{len(names)} names for {anomaly_maps.shape[0]} anomaly maps")
    out_dir.mkdir(parents=True, exist_ok=True)
    vmin, vmax = (float(v) for v in np.percentile(anomaly_maps, [1.0, 99.9]))
    paths = []
    for i, name in enumerate(names):
        blended = overlay(load_image(i), anomaly_maps[i], transform, vmin=vmin, vmax=vmax)
        path = out_dir / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(blended).save(path)
        paths.append(path)
    logger.info("wrote %d overlay(s) to %s (colour range %.4f .. %.4f)", len(paths), out_dir,
                vmin, vmax)
    return paths


def _json_safe(value: object) -> object:
    """JSON has no inf/NaN: write them as null (the key says what it would have been)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def write_metrics(path: Path, metrics: Mapping[str, object]) -> Path:
    """Write ``metrics`` as indented JSON atomically (temp file + rename): a reader never sees
    half a file, even if the site is killed while writing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_safe(metrics), indent=2, sort_keys=True) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)
    return path

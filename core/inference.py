"""A warm PatchCore scorer for inspection: one image (or one batch) at a time, timed by stage.

:class:`Inferencer` keeps the backbone, the bank's search structure and the transform in
memory and scores images as they come, the way anomalib's TorchInferencer does, but without a
pickled checkpoint: it wraps a :class:`~core.patchcore.PatchCore` (loaded from a safetensors
file whose extractor fingerprint was checked) and a nearest-neighbour search:

* ``"exact"``: the model's own index (core.knn): every patch against every bank row;
* ``"ivf"``: :class:`core.ivf.IVFIndex`, the ``nprobe`` nearest of ``C`` k-means cells. Scores
  can only come out higher than exact ones (never lower), by well under 1 % on image scores
  where it was measured (core.ivf); it is what keeps the search a small part of an image's
  time on a CPU at 100k bank rows.

Every call returns the time of each stage (:class:`StageTimes`): reading and transforming the
images, the backbone + embedding, the nearest-neighbour search, and the anomaly maps
(upsampling + gaussian), so a benchmark or a watcher can say where an image's time goes.
Scores and maps are those of ``PatchCore.predict`` for ``"exact"`` (the same functions run).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from core.features import iterate_batches
from core.ivf import IVFIndex
from core.patchcore import ImageSource, PatchCore, Predictions, _describe_image

logger = logging.getLogger(__name__)

__all__ = ["Inferencer", "Scored", "SearchMethod", "StageTimes"]

SearchMethod = Literal["exact", "ivf"]


@dataclass(frozen=True)
class StageTimes:
    """Seconds spent per stage (wall clock, summed over the images of a call)."""

    load: float = 0.0
    extract: float = 0.0
    knn: float = 0.0
    maps: float = 0.0

    @property
    def total(self) -> float:
        return self.load + self.extract + self.knn + self.maps

    def __add__(self, other: StageTimes) -> StageTimes:
        return StageTimes(self.load + other.load, self.extract + other.extract,
                          self.knn + other.knn, self.maps + other.maps)

    def as_dict(self) -> dict[str, float]:
        return {"load": self.load, "extract": self.extract, "knn": self.knn, "maps": self.maps,
                "total": self.total}


@dataclass(frozen=True)
class Scored:
    """A batch's scores: image_scores [b] float32, anomaly_maps [b, H, W] float32 (the model's
    input geometry), times for the whole batch."""

    image_scores: np.ndarray
    anomaly_maps: np.ndarray
    patch_grid: tuple[int, int]
    times: StageTimes


class Inferencer:
    """Scores images with ``model``'s bank through ``search``.

    Args:
        model: a PatchCore with its bank set (fitted or loaded).
        search: "exact" or "ivf" (module docstring).
        ivf: the index over ``model``'s bank for "ivf" (its rows must be the bank's rows).
        nprobe: cells searched per patch for "ivf".
    """

    def __init__(
        self,
        model: PatchCore,
        *,
        search: SearchMethod = "exact",
        ivf: IVFIndex | None = None,
        nprobe: int = 8,
    ) -> None:
        if search not in ("exact", "ivf"):
            raise ValueError(f"search must be 'exact' or 'ivf', got {search!r}")
        if search == "ivf":
            if ivf is None:
                raise ValueError("search='ivf' needs the IVF index of the bank")
            if model.config.num_neighbors != 1:
                raise ValueError("the IVF search scores with num_neighbors=1 only; use 'exact'")
            if ivf.rows.shape != model.memory_bank.shape:
                raise ValueError(f"IVF index of {ivf.rows.shape} rows for a bank of "
                                 f"{model.memory_bank.shape}")
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        self.model = model
        self.search = search
        self.ivf = ivf
        self.nprobe = nprobe
        self.transform = model.config.features.transform
        model.extractor  # noqa: B018 - build the backbone now: the first image must not pay it

    def warm_up(self, height: int = 256, width: int = 256) -> StageTimes:
        """Score one blank image of (height, width) and return its times: the first forward
        pass of a process builds the kernels (about 10x a later one on a CPU), and an
        inspection's first real image must not pay for it."""
        return self.score_arrays([np.zeros((height, width, 3), np.uint8)]).times

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, *, load_s: float = 0.0) -> Scored:
        """Score transformed images [b, 3, H, W] (already through the model's transform)."""
        t0 = time.perf_counter()
        features, grid = self.model.extractor(pixels.to(self.model.device))
        features = features.cpu()
        t1 = time.perf_counter()
        b, patches, dim = features.shape
        if self.search == "ivf":
            assert self.ivf is not None
            patch_scores = self.ivf.search(features.reshape(-1, dim), self.nprobe).reshape(
                b, patches
            )
            image_scores = patch_scores.max(axis=1).astype(np.float32)
        else:
            patch_scores, image_scores = self.model.score_patches(features)
        t2 = time.perf_counter()
        size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        maps = self.model._anomaly_maps(patch_scores, grid, size)
        t3 = time.perf_counter()
        return Scored(image_scores=image_scores, anomaly_maps=maps, patch_grid=grid,
                      times=StageTimes(load=load_s, extract=t1 - t0, knn=t2 - t1, maps=t3 - t2))

    def score_arrays(self, images: Sequence[np.ndarray]) -> Scored:
        """Score uint8 [H0, W0, 3] images (one size after the transform), as one batch."""
        t0 = time.perf_counter()
        pixels = torch.stack([self.transform.image(np.asarray(image)) for image in images])
        return self.score_pixels(pixels, load_s=time.perf_counter() - t0)

    def predict(
        self,
        images: ImageSource,
        indices: Sequence[int] | None = None,
        *,
        batch_size: int | None = None,
        on_batch: Callable[[list[int], Scored], None] | None = None,
    ) -> tuple[Predictions, StageTimes]:
        """Scores and maps of ``images`` (all, or ``indices``), ``batch_size`` at a time
        (default: the model's). ``on_batch(indices, scored)`` sees each batch as it is done."""
        indices = list(range(len(images))) if indices is None else list(indices)
        if not indices:
            raise ValueError("cannot predict on an empty dataset")
        scores: list[np.ndarray] = []
        maps: list[np.ndarray] = []
        times = StageTimes()
        grid = (0, 0)
        batches = iterate_batches(
            images.load_image, indices, self.transform,
            batch_size or self.model.config.batch_size,
            describe=lambda i: _describe_image(images, i),
        )
        t0 = time.perf_counter()
        for batch, pixels in batches:
            scored = self.score_pixels(pixels, load_s=time.perf_counter() - t0)
            scores.append(scored.image_scores)
            maps.append(scored.anomaly_maps)
            times = times + scored.times
            grid = scored.patch_grid
            if on_batch is not None:
                on_batch(batch, scored)
            t0 = time.perf_counter()
        return (Predictions(image_scores=np.concatenate(scores),
                            anomaly_maps=np.concatenate(maps), patch_grid=grid), times)

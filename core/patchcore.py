"""The single-site PatchCore model: fit a memory bank, score images, save and load.

``fit`` streams batches of patch features into an :class:`~core.coreset.IncrementalCoreset`, so
memory stays bounded by the selector's buffer (about k + one batch of rows) however many images a
site has: the full [N, D] training feature matrix is never built (anomalib issues #372, #2016).

``predict`` scores each test patch by its Euclidean distance to the nearest bank row; the image
score is the largest patch score (optionally reweighted as in the paper's Eq. 7, the way anomalib
implements it) and the anomaly map is the patch-score grid bilinearly upsampled to the model's
input size and smoothed with a gaussian (sigma 4 px).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from safetensors.numpy import load_file, save_file

from core.coreset import IncrementalCoreset
from core.features import (
    FeatureConfig,
    PatchFeatureExtractor,
    check_image_sizes,
    iterate_batches,
)
from core.knn import Backend, NearestNeighbourIndex
from core.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = [
    "FeatureMismatchError",
    "ImageSource",
    "ModelFileError",
    "PatchCore",
    "PatchCoreConfig",
    "Predictions",
    "gaussian_blur",
]

#: 2 added ``feature_fingerprint`` (the identity of the weights the bank was built with).
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)


class ModelFileError(ValueError):
    """A model file cannot be read: truncated, not safetensors, or not a FedPatchCore model.

    The message names the file (safetensors' own errors do not).
    """


def _read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata of ``path`` (ModelFileError naming it if unreadable)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return dict(handle.metadata() or {})
    except SafetensorError as exc:
        raise ModelFileError(
            f"{path} is not a readable model file (truncated, or not safetensors): {exc}"
        ) from exc


def _read_bank(path: Path) -> np.ndarray:
    """The [K, D] ``memory_bank`` tensor of ``path`` (ModelFileError naming it if unreadable)."""
    from safetensors import SafetensorError

    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise ModelFileError(f"{path}: cannot read the memory bank (truncated?): {exc}") from exc
    if "memory_bank" not in tensors:
        raise ModelFileError(f"{path} has no 'memory_bank' tensor (found {sorted(tensors)})")
    return tensors["memory_bank"]


def _read_json(path: Path, metadata: dict[str, str], key: str) -> object:
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: the {key!r} metadata is not valid JSON: {exc}") from exc


class FeatureMismatchError(ValueError):
    """A saved bank and the extractor given to load it do not compute the same features.

    Scoring would run, but every distance would be meaningless (a bank fitted with a weights
    file and scored with random weights gave scores about 4x too large), so loading refuses.
    """


class ImageSource(Protocol):
    """What PatchCore reads images from: any sized collection with ``load_image``."""

    def __len__(self) -> int: ...

    def load_image(self, index: int) -> np.ndarray: ...


@dataclass(frozen=True)
class PatchCoreConfig:
    """Everything that shapes a PatchCore model.

    Attributes:
        features: how patch features are computed.
        coreset_ratio: bank size as a fraction of the training patches, in (0, 1].
        coreset_size: absolute bank size; overrides ``coreset_ratio`` when set.
        projection_dim: random-projection dimension for coreset selection (None: none).
        buffer_rows: rows the incremental selector may buffer before reducing (None: its
            default, max(2k, k + 8192)). Peak memory of ``fit`` is about
            ``buffer_rows x D x 4`` bytes plus the backbone.
        num_neighbors: 1 scores an image by its largest patch score; > 1 applies the paper's
            Eq. 7 reweighting with that many bank neighbours (anomalib uses 9).
        gaussian_sigma: smoothing of the anomaly maps, in pixels of the model input.
        batch_size: images per backbone forward pass.
        seed: seeds projection and coreset start points.
        device: "cpu", "cuda", or None for CUDA when available.
        knn_backend: "auto", "faiss" or "torch" (see :class:`~core.knn.NearestNeighbourIndex`).
    """

    features: FeatureConfig = field(default_factory=FeatureConfig)
    coreset_ratio: float = 0.1
    coreset_size: int | None = None
    projection_dim: int | None = 128
    buffer_rows: int | None = None
    num_neighbors: int = 1
    gaussian_sigma: float = 4.0
    batch_size: int = 8
    seed: int = 0
    device: str | None = None
    knn_backend: Backend = "auto"

    def __post_init__(self) -> None:
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.coreset_size is not None and self.coreset_size < 1:
            raise ValueError(f"coreset_size must be >= 1, got {self.coreset_size}")
        if self.num_neighbors < 1:
            raise ValueError(f"num_neighbors must be >= 1, got {self.num_neighbors}")
        if self.gaussian_sigma < 0:
            raise ValueError(f"gaussian_sigma must be >= 0, got {self.gaussian_sigma}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def bank_size(self, num_patches: int) -> int:
        """Coreset size for ``num_patches`` training patches (at least 1, at most all)."""
        if self.coreset_size is not None:
            return min(self.coreset_size, num_patches)
        return max(1, min(num_patches, math.ceil(self.coreset_ratio * num_patches)))

    def resolved_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Predictions:
    """Scores of a set of images.

    Attributes:
        image_scores: [N] float32 image anomaly scores (Euclidean feature distance units).
        anomaly_maps: [N, H, W] float32 per-pixel scores at the model input size.
        patch_grid: (h, w) of the patch-score grid the maps were upsampled from.
    """

    image_scores: np.ndarray
    anomaly_maps: np.ndarray
    patch_grid: tuple[int, int]


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian smoothing of [B, 1, H, W] maps, reflect padding, radius 4 sigma.

    Matches ``scipy.ndimage.gaussian_filter(sigma=sigma)`` (truncate 4.0, mode "reflect"), the
    filter of the original PatchCore, up to float rounding.
    """
    if sigma <= 0:
        return maps
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    # scipy's "reflect" is torch's "symmetric" (edge sample repeated); pad by hand for it.
    padded = _symmetric_pad(maps, radius)
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


def _symmetric_pad(maps: torch.Tensor, radius: int) -> torch.Tensor:
    """Pad the last two dims by ``radius`` mirroring *including* the edge (scipy "reflect").

    A radius larger than the map repeats the mirroring (period 2 x size), as scipy does.
    """
    for dim in (-2, -1):
        left = right = radius
        while left > 0:
            step = min(left, maps.shape[dim])
            head = maps.narrow(dim, 0, step).flip(dim)
            maps = torch.cat([head, maps], dim=dim)
            left -= step
        while right > 0:
            step = min(right, maps.shape[dim])
            tail = maps.narrow(dim, maps.shape[dim] - step, step).flip(dim)
            maps = torch.cat([maps, tail], dim=dim)
            right -= step
    return maps


def _describe_image(images: ImageSource, index: int) -> str:
    """The image's file when the source knows it (AnomalyDataset samples), else its index."""
    try:
        path = images[index].image_path  # type: ignore[index]
    except (TypeError, AttributeError, IndexError, KeyError):
        return f"image {index}"
    return f"image {path}"


class PatchCore:
    """Single-site PatchCore.

    Example (with a dataset of uint8 images)::

        model = PatchCore(PatchCoreConfig()).fit(train_dataset)
        predictions = model.predict(test_dataset)
        model.save("bank.safetensors")
        same = PatchCore.load("bank.safetensors")
    """

    def __init__(self, config: PatchCoreConfig | None = None) -> None:
        self.config = config or PatchCoreConfig()
        self.device = self.config.resolved_device()
        self._extractor: PatchFeatureExtractor | None = None
        self._memory_bank: np.ndarray | None = None
        self._index: NearestNeighbourIndex | None = None
        self.coverage_radius: float | None = None
        self.num_training_patches = 0
        self.num_training_images = 0

    # -- features --------------------------------------------------------------------------

    @property
    def extractor(self) -> PatchFeatureExtractor:
        """The frozen backbone (built on first use: loading weights is slow)."""
        if self._extractor is None:
            self._extractor = PatchFeatureExtractor(self.config.features).to(self.device)
        return self._extractor

    def iter_features(
        self,
        images: ImageSource,
        indices: Sequence[int] | None = None,
        *,
        desc: str = "features",
    ) -> Iterator[tuple[list[int], torch.Tensor, tuple[int, int]]]:
        """Yield (indices, features [b, h*w, D] on CPU, grid) batch by batch.

        All images must have one size after the transform: a dataset with file paths is checked
        from the image headers before any pixel is read; any source is checked image by image.
        DatasetError names the file (or index) that differs. A progress bar labelled ``desc``
        counts images as the caller finishes each batch (core.progress says when it shows).
        """
        for batch, features, grid, _ in self._iter_batches(images, indices, desc=desc):
            yield batch, features, grid

    def _iter_batches(
        self,
        images: ImageSource,
        indices: Sequence[int] | None = None,
        *,
        desc: str = "features",
    ) -> Iterator[tuple[list[int], torch.Tensor, tuple[int, int], tuple[int, int]]]:
        """Like :meth:`iter_features`, plus the (H, W) of the transformed input pixels."""
        indices = list(range(len(images))) if indices is None else list(indices)
        samples = getattr(images, "samples", None)  # an AnomalyDataset: check headers first
        if samples is not None:
            paths = [samples[i].image_path for i in indices]
            check_image_sizes(paths, self.config.features.transform)
        batches = iterate_batches(
            images.load_image,
            indices,
            self.config.features.transform,
            self.config.batch_size,
            describe=lambda i: _describe_image(images, i),
        )
        with progress_bar(len(indices), desc, "img") as bar:
            for batch, pixels in batches:
                features, grid = self.extractor(pixels.to(self.device))
                yield batch, features.cpu(), grid, (int(pixels.shape[-2]), int(pixels.shape[-1]))
                bar.update(len(batch))

    # -- fitting ---------------------------------------------------------------------------

    def fit(
        self, images: ImageSource, *, bank_size: Callable[[int], int] | None = None
    ) -> PatchCore:
        """Build the memory bank from normal training images; returns self.

        ``bank_size``: the bank's rows as a function of the training patch count (known at
        the first batch: images x grid cells), instead of ``config.bank_size``; a federated
        site sizes its upload from the round's k this way (core.federated.upload).
        """
        if len(images) == 0:
            raise ValueError("cannot fit PatchCore on an empty dataset")
        selector: IncrementalCoreset | None = None
        # Visit images in a seeded random order: the streaming selector's radius depends on
        # order, and folders sorted by part or defect type are its worst case (on 156,800
        # patches of 5 categories: 1.37x offline greedy in category order, 1.18x shuffled).
        order = torch.randperm(
            len(images), generator=torch.Generator().manual_seed(self.config.seed)
        ).tolist()
        for _, features, grid in self.iter_features(images, order, desc="fit"):
            if selector is None:
                total = len(images) * grid[0] * grid[1]
                k = self.config.bank_size(total) if bank_size is None else bank_size(total)
                if not 1 <= k <= total:
                    raise ValueError(f"bank size {k} is outside [1, {total}] for {total} "
                                     "training patches")
                if self.config.coreset_size is not None and k < self.config.coreset_size:
                    logger.warning(
                        "coreset_size %d exceeds the %d training patches: the bank keeps all %d",
                        self.config.coreset_size, total, k,
                    )
                selector = IncrementalCoreset(
                    k,
                    capacity=self.config.buffer_rows,
                    projection_dim=self.config.projection_dim,
                    seed=self.config.seed,
                    device=self.device if self.device.type == "cuda" else None,
                )
                logger.info(
                    "fitting on %d images x %d patches -> bank of %d rows (buffer %d rows)",
                    len(images), grid[0] * grid[1], k, selector.capacity,
                )
            selector.add(features.reshape(-1, features.shape[-1]))
        assert selector is not None
        # release: the buffer shrinks into the bank in place instead of being copied out.
        selection = selector.select(release=True)
        del selector
        self.num_training_images = len(images)
        self.num_training_patches = selection.num_seen
        self.set_memory_bank(selection.features)
        self.coverage_radius = selection.radius_bound
        logger.info(
            "bank: %d x %d, coverage radius <= %.4f",
            *selection.features.shape, selection.radius_bound,
        )
        return self

    # -- the bank --------------------------------------------------------------------------

    @property
    def memory_bank(self) -> np.ndarray:
        """[K, D] float32 bank (raises if the model is not fitted)."""
        if self._memory_bank is None:
            raise RuntimeError("PatchCore has no memory bank yet: call fit() or load()")
        return self._memory_bank

    def set_memory_bank(self, bank: np.ndarray) -> None:
        """Replace the bank ([K, D] float32), e.g. with a federated global bank."""
        array = np.ascontiguousarray(bank, dtype=np.float32)
        expected = self.config.features.target_embed_dim
        if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != expected:
            raise ValueError(f"memory bank must be [K>0, {expected}], got shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("memory bank contains NaN or inf")
        self._memory_bank = array
        self._index = NearestNeighbourIndex(
            array, backend=self.config.knn_backend, device=self.device
        )

    # -- scoring ---------------------------------------------------------------------------

    def score_patches(self, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """features [b, L, D] -> (patch scores [b, L], image scores [b]), Euclidean."""
        if self._index is None:
            raise RuntimeError("PatchCore has no memory bank yet: call fit() or load()")
        b, num_patches, dim = features.shape
        flat = features.reshape(-1, dim)
        distances, nn_index = self._index.search(flat, 1)
        patch_scores = distances[:, 0].reshape(b, num_patches)
        image_scores = patch_scores.max(axis=1)
        if self.config.num_neighbors > 1:
            image_scores = self._reweight(flat.numpy(), patch_scores, nn_index[:, 0].reshape(b, -1))
        return patch_scores, image_scores.astype(np.float32)

    def _reweight(
        self, flat: np.ndarray, patch_scores: np.ndarray, nn_index: np.ndarray
    ) -> np.ndarray:
        """Paper Eq. 7 as anomalib implements it.

        For the highest-scoring test patch m* with score s* and nearest bank row b*, take the
        ``num_neighbors`` bank rows nearest to b* (b* itself first) and weight
        s* by 1 - softmax(-free distances of m* to them)[0].
        """
        assert self._index is not None
        b, num_patches = patch_scores.shape
        rows = np.arange(b)
        worst = patch_scores.argmax(axis=1)
        worst_features = flat.reshape(b, num_patches, -1)[rows, worst]  # [b, D]
        score = patch_scores[rows, worst]
        anchor = self.memory_bank[nn_index[rows, worst]]  # [b, D]
        k = min(self.config.num_neighbors, self.memory_bank.shape[0])
        _, support = self._index.search(anchor, k)  # [b, k]
        support_features = self.memory_bank[support]  # [b, k, D]
        distances = np.linalg.norm(support_features - worst_features[:, None, :], axis=2)
        weights = 1.0 - torch.softmax(torch.from_numpy(distances), dim=1)[:, 0].numpy()
        return weights * score

    def predict(self, images: ImageSource) -> Predictions:
        """Score every image: image scores [N] and anomaly maps [N, H, W] at the input size."""
        scores: list[np.ndarray] = []
        maps: list[np.ndarray] = []
        grid: tuple[int, int] = (0, 0)
        for _, features, grid, size in self._iter_batches(images, desc="scoring"):
            patch_scores, image_scores = self.score_patches(features)
            scores.append(image_scores)
            maps.append(self._anomaly_maps(patch_scores, grid, size))
        if not scores:
            raise ValueError("cannot predict on an empty dataset")
        return Predictions(
            image_scores=np.concatenate(scores),
            anomaly_maps=np.concatenate(maps),
            patch_grid=grid,
        )

    def _anomaly_maps(
        self, patch_scores: np.ndarray, grid: tuple[int, int], size: tuple[int, int]
    ) -> np.ndarray:
        """[b, h*w] patch scores -> [b, H, W] smoothed maps at the transformed input size.

        ``size`` is the input's own (H, W), not grid x stride: for a side that is not a multiple
        of the stride (100 px -> a 13-cell grid) the grid spans more than the image (104 px),
        and the maps must still match the image and its masks pixel for pixel. The original
        PatchCore likewise interpolates patch scores straight to the image size.
        """
        b = patch_scores.shape[0]
        tensor = torch.from_numpy(patch_scores).reshape(b, 1, *grid)
        upsampled = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)
        return gaussian_blur(upsampled, self.config.gaussian_sigma)[:, 0].numpy()

    # -- persistence -----------------------------------------------------------------------

    def metadata(self) -> dict[str, object]:
        """JSON-friendly description saved next to the bank.

        Includes the extractor's fingerprint (builds the backbone if it was not built yet: the
        weights' identity cannot be known without them).
        """
        return {
            "format_version": FORMAT_VERSION,
            "features": self.config.features.to_dict(),
            "feature_fingerprint": self.extractor.fingerprint(),
            "num_neighbors": self.config.num_neighbors,
            "gaussian_sigma": self.config.gaussian_sigma,
            "seed": self.config.seed,
            "coverage_radius": self.coverage_radius,
            "num_training_images": self.num_training_images,
            "num_training_patches": self.num_training_patches,
        }

    def save(self, path: str | Path, *, extra: dict[str, object] | None = None) -> Path:
        """Write the bank and its config to one .safetensors file (no pickle).

        ``extra`` (JSON-serialisable) is stored beside the metadata, e.g. a federation's round
        reports; :meth:`read_extra` returns it.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"fedpatchcore": json.dumps(self.metadata())}
        if extra is not None:
            metadata["extra"] = json.dumps(extra)
        save_file({"memory_bank": self.memory_bank}, str(path), metadata=metadata)
        return path

    @staticmethod
    def read_extra(path: str | Path) -> dict[str, object]:
        """The ``extra`` dict saved with a model ({} when none)."""
        path = Path(path)
        extra = _read_json(path, _read_metadata(path), "extra")
        if extra is None:
            return {}
        if not isinstance(extra, dict):
            raise ModelFileError(f"{path}: the 'extra' metadata is not a JSON object")
        return extra

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        pretrained: bool = True,
        weights: str | None = None,
        device: str | None = None,
        knn_backend: Backend = "auto",
    ) -> PatchCore:
        """Read a model written by :meth:`save`.

        The backbone weights are not in the file: ``pretrained`` / ``weights`` say where they come
        from. They must be the ones the bank was built with: the extractor is built here and its
        weights digest compared with the saved one (FeatureMismatchError if they differ; a
        format-1 file, saved before digests were recorded, is loaded with a warning).
        """
        path = Path(path)
        meta = _read_json(path, _read_metadata(path), "fedpatchcore")
        if meta is None:
            raise ModelFileError(
                f"{path} is not a FedPatchCore model (no 'fedpatchcore' metadata)"
            )
        if not isinstance(meta, dict):
            raise ModelFileError(f"{path}: the 'fedpatchcore' metadata is not a JSON object")
        if meta.get("format_version") not in _READABLE_VERSIONS:
            raise ModelFileError(
                f"{path}: unsupported format_version {meta.get('format_version')!r}, "
                f"expected one of {_READABLE_VERSIONS}"
            )
        try:
            saved_features = meta["features"]
            num_neighbors = int(meta["num_neighbors"])
            gaussian_sigma = float(meta["gaussian_sigma"])
            seed = int(meta["seed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: missing or malformed metadata field {exc}") from exc
        features = FeatureConfig.from_dict(saved_features, pretrained=pretrained, weights=weights)
        config = replace(
            PatchCoreConfig(),
            features=features,
            num_neighbors=num_neighbors,
            gaussian_sigma=gaussian_sigma,
            seed=seed,
            device=device,
            knn_backend=knn_backend,
        )
        model = cls(config)
        model._check_fingerprint(path, meta.get("feature_fingerprint"))
        model.set_memory_bank(_read_bank(path))
        model.coverage_radius = meta.get("coverage_radius")
        model.num_training_images = int(meta.get("num_training_images", 0))
        model.num_training_patches = int(meta.get("num_training_patches", 0))
        return model

    def _check_fingerprint(self, path: Path, saved: object) -> None:
        """Refuse an extractor whose weights differ from the ones the saved bank was built with."""
        if saved is None:
            logger.warning(
                "%s was saved before models recorded their weights (format 1): cannot check that "
                "the weights given to load() are the ones its bank was built with",
                path,
            )
            return
        if not isinstance(saved, dict) or "weights_sha256" not in saved:
            raise ValueError(f"{path}: malformed feature_fingerprint {saved!r}")
        current = self.extractor.fingerprint()
        if saved["weights_sha256"] != current["weights_sha256"]:
            raise FeatureMismatchError(
                f"{path} was fitted with features from {saved.get('weights_source')} (weights "
                f"sha256 {str(saved['weights_sha256'])[:12]}...), but load() was given "
                f"{current['weights_source']} (sha256 {str(current['weights_sha256'])[:12]}...): "
                "its scores would not be comparable. Pass the same weights (pretrained= / "
                "weights=) the model was fitted with."
            )

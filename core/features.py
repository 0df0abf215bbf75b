"""PatchCore patch embeddings on any timm CNN backbone.

For each image the backbone's intermediate maps (default ``layer2`` and ``layer3``) become one
feature vector per cell of the first layer's grid (28 x 28 for a 224 px input), exactly as the
original implementation (amazon-science/patchcore-inspection) computes them:

1. every layer: a 3 x 3 neighbourhood with stride 1 and zero padding is gathered around each cell
   (``Unfold``), giving C*9 values per cell, and adaptively average-pooled to
   ``pretrain_embed_dim`` values (the original's ``MeanMapper``);
2. deeper layers are bilinearly resized (``align_corners=False``) to the first layer's grid;
3. the per-layer vectors are concatenated and average-pooled to ``target_embed_dim`` (the
   original's ``Aggregator``).

The original resizes the unfolded C*9 maps before pooling; resizing and pooling are both linear
and act on different axes, so pooling first and resizing the pooled maps gives the same numbers
for 9x less memory and work on the deeper layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import nn

from core.data.errors import DatasetError
from core.preprocess import ImageTransform

logger = logging.getLogger(__name__)

__all__ = [
    "FeatureConfig",
    "PatchFeatureExtractor",
    "WeightsUnavailableError",
    "check_image_sizes",
    "check_weights",
    "file_sha256",
    "iterate_batches",
    "size_mismatch",
]

#: Seconds the reachability probe waits for the weights host before giving up. timm's own
#: download retries for about a minute offline and ends in a long huggingface traceback.
PROBE_TIMEOUT_S = 5.0


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but are neither cached nor downloadable.

    The message names the three ways out: ``pretrained=False`` (random weights, tests only),
    ``weights=FILE`` (a local state dict) and a warm cache (download once where there is network).
    ``problem`` is the first part alone (what is missing, where it was looked for and why it
    cannot be downloaded), so that a command line can name its own flags instead.
    """

    def __init__(self, problem: str, backbone: str) -> None:
        super().__init__(
            f"{problem}. Ways out: (1) pretrained=False for random weights (tests only); "
            "(2) weights=FILE, a local .safetensors/.pth state dict; (3) warm the cache where "
            f"there is network (python -c \"import timm; timm.create_model('{backbone}', "
            "pretrained=True)\") and copy it here"
        )
        self.problem = problem
        self.backbone = backbone


@dataclass(frozen=True)
class FeatureConfig:
    """How patch features are computed. Sites of one federation must share it exactly.

    Attributes:
        backbone: timm model name, e.g. "wide_resnet50_2" (timm's default weights) or
            "wide_resnet50_2.tv_in1k" (the torchvision weights of the PatchCore paper).
        layers: backbone stages to use, by timm module name, shallowest first.
        pretrained: load pretrained weights through timm: from the local huggingface / torch
            hub cache when they are there (no network needed), else downloaded; with neither,
            building the extractor raises WeightsUnavailableError at once.
        weights: path of a local .safetensors/.pth state dict for air-gapped sites; implies
            pretrained weights from that file. ``.pth`` is read with ``weights_only=True``.
        pretrain_embed_dim: per-layer dimension after the first pooling.
        target_embed_dim: final feature dimension D.
        patch_size: side of the local neighbourhood (3 in the paper).
        transform: resize/crop applied to images (and masks).
        init_seed: seeds the random initialisation when no pretrained weights are loaded, so
            every site of a federation (and a reloaded model) builds the *same* random backbone;
            features from differently initialised backbones are not comparable.
    """

    backbone: str = "wide_resnet50_2"
    layers: tuple[str, ...] = ("layer2", "layer3")
    pretrained: bool = True
    weights: str | None = None
    pretrain_embed_dim: int = 1024
    target_embed_dim: int = 1024
    patch_size: int = 3
    transform: ImageTransform = field(default_factory=ImageTransform)
    init_seed: int = 0

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("layers must name at least one backbone stage")
        if self.pretrain_embed_dim < 1 or self.target_embed_dim < 1:
            raise ValueError(
                f"embedding dims must be >= 1, got pretrain={self.pretrain_embed_dim}, "
                f"target={self.target_embed_dim}"
            )
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ValueError(f"patch_size must be a positive odd int, got {self.patch_size}")
        if self.weights is not None and not Path(self.weights).is_file():
            raise ValueError(f"weights file not found: {self.weights}")

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form (saved with a model, compared across federation sites)."""
        return {
            "backbone": self.backbone,
            "layers": list(self.layers),
            "pretrain_embed_dim": self.pretrain_embed_dim,
            "target_embed_dim": self.target_embed_dim,
            "patch_size": self.patch_size,
            "resize": self.transform.resize
            if isinstance(self.transform.resize, int)
            else list(self.transform.resize),
            "crop": self.transform.crop,
            "init_seed": self.init_seed,
        }

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the feature configuration and of where the weights come from.

        Sites whose fingerprints differ produce incomparable features; the server refuses to
        merge them. A local weights file is hashed by content (about 1 s for WRN-50); pretrained
        weights are identified by their timm name only and random ones by their seed, so equal
        fingerprints do not prove equal weights (another timm or torch version may build other
        ones). :meth:`PatchFeatureExtractor.weights_digest` hashes the weights themselves; a
        saved model records and checks that.
        """
        if self.weights is not None:
            source = f"file:sha256:{file_sha256(self.weights)}"
        elif self.pretrained:
            source = f"timm-pretrained:{self.backbone}"
        else:
            source = f"random-init:{self.init_seed}"
        description = {**self.to_dict(), "weights": source}
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()

    def weights_provenance(self) -> dict[str, object]:
        """Where the backbone's weights come from, for reports (JSON-friendly).

        ``kind``: "random" (seeded random init: features that mean nothing for detection;
        tests only), "pretrained" (timm's pretrained weights of ``model``) or "file" (a local
        state dict, with its ``sha256``); ``text``: one line for people.
        """
        if self.weights is not None:
            digest = file_sha256(self.weights)
            return {"kind": "file", "file": str(self.weights), "sha256": digest,
                    "text": f"weights file {Path(self.weights).name} (sha256 {digest[:16]}...)"}
        if self.pretrained:
            return {"kind": "pretrained", "model": self.backbone,
                    "text": f"pretrained {self.backbone} (timm)"}
        return {"kind": "random", "init_seed": self.init_seed,
                "text": f"RANDOM weights (seeded init {self.init_seed}, no pretraining): "
                "the features are not ImageNet features and these metrics say nothing about "
                "how well PatchCore detects defects"}

    @classmethod
    def from_dict(
        cls, data: dict[str, object], *, pretrained: bool = True, weights: str | None = None
    ) -> FeatureConfig:
        resize = data["resize"]
        return cls(
            backbone=str(data["backbone"]),
            layers=tuple(str(x) for x in data["layers"]),  # type: ignore[attr-defined]
            pretrained=pretrained,
            weights=weights,
            pretrain_embed_dim=int(data["pretrain_embed_dim"]),  # type: ignore[call-overload]
            target_embed_dim=int(data["target_embed_dim"]),  # type: ignore[call-overload]
            patch_size=int(data["patch_size"]),  # type: ignore[call-overload]
            transform=ImageTransform(
                resize=resize if isinstance(resize, int) else tuple(resize),  # type: ignore[arg-type]
                crop=None if data["crop"] is None else int(data["crop"]),  # type: ignore[call-overload]
            ),
            init_seed=int(data.get("init_seed", 0)),  # type: ignore[call-overload]
        )


_WARNED_RANDOM: set[str] = set()
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a weights file's bytes; remembered per (path, size, mtime), since a
    fingerprint and a report may both ask (about 1 s for WRN-50's 270 MB)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


def _unavailable(backbone: str, where: str, why: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"pretrained weights of {backbone!r} are not in the local cache ({where}) and cannot be "
        f"downloaded ({why})",
        backbone,
    )


def _probe(url: str) -> str | None:
    """None if ``url``'s host answers HTTP within PROBE_TIMEOUT_S (any status), else why not.

    Uses huggingface_hub's session, so proxies configured for the hub are honoured.
    """
    from huggingface_hub import get_session

    try:
        get_session().head(url, timeout=PROBE_TIMEOUT_S)
    except Exception as exc:  # any transport failure means: not reachable
        return f"{type(exc).__name__}: {exc}"
    return None


def _pretrained_overlay(backbone: str, pretrained_cfg: dict[str, Any]) -> dict[str, Any]:
    """Where timm should load pretrained weights from, checked before it tries.

    Returns a ``pretrained_cfg_overlay``: ``{"file": path}`` when the weights are already in
    the huggingface or torch hub cache (loaded from there without touching the network, so a
    warm cache works air-gapped), ``{}`` when they must be downloaded and the host answers.
    Raises WeightsUnavailableError at once when neither holds (HF_HUB_OFFLINE set, or the probe
    fails), instead of timm's minute of retries.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models._builder import _resolve_pretrained_source  # timm >= 1.0

    load_from, location = _resolve_pretrained_source(pretrained_cfg)
    if load_from in ("file", "state_dict", "local-dir"):
        return {}
    if load_from == "hf-hub":
        repo, _, revision = str(location if isinstance(location, str) else location[0]).partition(
            "@"
        )
        names = (
            [location[1]]
            if not isinstance(location, str)
            else ["model.safetensors", "pytorch_model.bin"]  # timm's order of preference
        )
        cache = str(constants.HF_HUB_CACHE)
        for name in names:
            cached = try_to_load_from_cache(
                repo, name, cache_dir=cache, revision=revision or None
            )
            if isinstance(cached, str):
                logger.info("loading %s weights from the hub cache %s", backbone, cached)
                return {"file": cached}
        where, url = f"huggingface cache {cache}, repo {repo}", str(constants.ENDPOINT)
        if constants.HF_HUB_OFFLINE:
            raise _unavailable(backbone, where, "HF_HUB_OFFLINE is set")
    elif load_from == "url":
        from urllib.parse import urlparse

        parsed = urlparse(str(location))
        cached_file = Path(torch.hub.get_dir()) / "checkpoints" / Path(parsed.path).name
        if cached_file.is_file():
            logger.info("loading %s weights from the torch hub cache %s", backbone, cached_file)
            return {"file": str(cached_file)}
        where, url = f"torch hub cache {cached_file.parent}", f"{parsed.scheme}://{parsed.netloc}"
    else:
        raise WeightsUnavailableError(
            f"{backbone!r} has no pretrained weights timm knows how to fetch ({load_from!r})",
            backbone,
        )
    reason = _probe(url)
    if reason is not None:
        raise _unavailable(backbone, where, f"{url}: {reason}")
    return {}


def _stage_indices(config: FeatureConfig) -> tuple[Any, tuple[int, ...]]:
    """(the backbone built on the meta device, out_indices of ``config.layers``): stage names
    and pretrained config without allocating any weight. ValueError for an unknown backbone or
    stage."""
    try:
        with torch.device("meta"):
            probe = timm.create_model(config.backbone, pretrained=False, features_only=True)
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise ValueError(f"backbone {config.backbone!r}: {error}") from None
    feature_info: Any = probe.feature_info
    names = list(feature_info.module_name())
    missing = [layer for layer in config.layers if layer not in names]
    if missing:
        raise ValueError(
            f"backbone {config.backbone!r} has no stage(s) {missing}; available: {names}"
        )
    out_indices = tuple(names.index(layer) for layer in config.layers)
    if list(out_indices) != sorted(out_indices):
        raise ValueError(f"layers must be ordered shallowest first, got {config.layers}")
    return probe, out_indices


def check_weights(config: FeatureConfig) -> str:
    """Check, without building the backbone, that ``config``'s weights can be had; returns
    where they will come from (for a log line).

    Milliseconds when the weights are a file, random, or in the local cache; when they must be
    downloaded, one HEAD request to the weights host (at most ``PROBE_TIMEOUT_S``). Raises
    WeightsUnavailableError (pretrained weights neither cached nor downloadable), ValueError
    (an unknown backbone or stage). A site calls it before it contacts the server, so that a
    missing download fails before any work rather than after it.
    """
    probe, _ = _stage_indices(config)
    if config.weights is not None:
        return f"weights file {config.weights}"
    if not config.pretrained:
        return f"random init (seed {config.init_seed})"
    overlay = _pretrained_overlay(config.backbone, probe.pretrained_cfg)
    return f"cached file {overlay['file']}" if overlay else "download through timm"


def _create_backbone(config: FeatureConfig) -> nn.Module:
    # Stage names only: the probe is built on the meta device (no weights allocated).
    probe, out_indices = _stage_indices(config)
    if config.weights is not None:
        logger.info("loading %s weights from local file %s", config.backbone, config.weights)
        return timm.create_model(
            config.backbone,
            pretrained=True,
            features_only=True,
            out_indices=out_indices,
            pretrained_cfg_overlay={"file": str(config.weights)},
        )
    if not config.pretrained and config.backbone not in _WARNED_RANDOM:
        _WARNED_RANDOM.add(config.backbone)  # once per process and backbone: loud, not noisy
        logger.warning(
            "BACKBONE %s HAS RANDOM WEIGHTS (pretrained=False, no weights file): features are "
            "not ImageNet features and detection quality will be far below published PatchCore",
            config.backbone,
        )
    overlay: dict[str, Any] = {}
    if config.pretrained:
        pretrained_cfg: Any = probe.pretrained_cfg
        overlay = _pretrained_overlay(config.backbone, pretrained_cfg)
    # Seeded init (pretrained weights overwrite it): identical random backbones everywhere.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        return timm.create_model(
            config.backbone,
            pretrained=config.pretrained,
            features_only=True,
            out_indices=out_indices,
            pretrained_cfg_overlay=overlay or None,
        )


class PatchFeatureExtractor(nn.Module):
    """Images -> PatchCore patch features. Frozen, always in eval mode.

    ``forward(images [B, 3, H, W]) -> (features [B, h*w, D] float32, (h, w))`` where (h, w) is
    the grid of the first chosen layer (H/8 x W/8 for layer2 of a ResNet) and D is
    ``config.target_embed_dim``.
    """

    def __init__(self, config: FeatureConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = _create_backbone(config).eval()
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)
        feature_info: Any = self.backbone.feature_info
        #: Input pixels per grid cell of the first chosen layer (8 for ResNet layer2).
        self.stride: int = int(feature_info.reduction()[0])
        self._weights_digest: str | None = None

    def weights_digest(self) -> str:
        """SHA-256 (hex) of the backbone's state dict: names, dtypes, shapes and bytes.

        Identifies the weights themselves, whatever their source (file, hub, seeded random
        init), so a saved bank can refuse an extractor whose features it was not built from.
        About 0.25 s for WRN-50 up to layer3 (100 MB) on a 2-core CPU; computed once.
        """
        if self._weights_digest is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.backbone.state_dict().items()):
                flat = tensor.detach().cpu().contiguous().reshape(-1)
                digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
                digest.update(flat.view(torch.uint8).numpy().tobytes())
            self._weights_digest = digest.hexdigest()
        return self._weights_digest

    def fingerprint(self) -> dict[str, object]:
        """What determines this extractor's features, for a saved model (JSON-friendly).

        ``config``: :meth:`FeatureConfig.to_dict` (backbone, layers, dims, image size, seed);
        ``weights_source``: where the weights came from, for messages; ``weights_sha256``:
        :meth:`weights_digest`, the identity that is compared.
        """
        config = self.config
        if config.weights is not None:
            source = f"weights file {Path(config.weights).name}"
        elif config.pretrained:
            source = f"timm pretrained {config.backbone}"
        else:
            source = f"random init (seed {config.init_seed})"
        return {
            "config": config.to_dict(),
            "weights_source": source,
            "weights_sha256": self.weights_digest(),
        }

    def train(self, mode: bool = True) -> PatchFeatureExtractor:
        # Batch-norm statistics must never move: the bank is only valid for one set of weights.
        return super().train(False)

    @property
    def feature_dim(self) -> int:
        return self.config.target_embed_dim

    def _embed_layer(self, feature_map: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, pretrain_embed_dim, h, w] (3x3 neighbourhood, then mean-pool)."""
        b, c, h, w = feature_map.shape
        p = self.config.patch_size
        patches = F.unfold(feature_map, kernel_size=p, padding=p // 2)  # [B, C*p*p, h*w]
        patches = patches.transpose(1, 2).reshape(b * h * w, 1, c * p * p)
        pooled = F.adaptive_avg_pool1d(patches, self.config.pretrain_embed_dim)
        return pooled.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        maps = self.backbone(images)
        grid = maps[0].shape[-2:]
        embedded = []
        for feature_map in maps:
            # One image at a time: the unfolded [C*9, h*w] patches are the largest temporary of
            # the pipeline (115 MB per 8 WRN-50 images at layer2), and fit() memory is bounded.
            layer = torch.cat([self._embed_layer(one.float()) for one in feature_map.split(1)])
            if layer.shape[-2:] != grid:
                layer = F.interpolate(layer, size=grid, mode="bilinear", align_corners=False)
            embedded.append(layer)
        b = images.shape[0]
        h, w = int(grid[0]), int(grid[1])
        # [B, L, Dp, h, w] -> [B*h*w, 1, L*Dp] -> pool -> [B, h*w, D]
        stacked = torch.stack(embedded, dim=1).permute(0, 3, 4, 1, 2).reshape(b * h * w, 1, -1)
        features = F.adaptive_avg_pool1d(stacked, self.config.target_embed_dim)
        return features.reshape(b, h * w, -1).contiguous(), (h, w)


def size_mismatch(
    image: str,
    raw_hw: Sequence[int],
    shape: tuple[int, int],
    first: str,
    expected: tuple[int, int],
) -> DatasetError:
    """The error for an image whose transformed size differs from the first image's."""
    return DatasetError(
        f"{image} is {raw_hw[0]}x{raw_hw[1]} (HxW), {shape[0]}x{shape[1]} after the transform, "
        f"but {first} gave {expected[0]}x{expected[1]}: all images of one fit or predict need "
        "one size after the transform. Set a fixed resize, ImageTransform(resize=(h, w)), or a "
        "crop"
    )


def check_image_sizes(paths: Sequence[Path], transform: ImageTransform) -> None:
    """Raise :func:`size_mismatch` for the first file whose transformed size differs from the
    first file's, reading image headers only (milliseconds per file, no pixels decoded): a
    mixed-size dataset is refused before a fit spends minutes on it."""
    from core.data.imageio import image_size

    expected: tuple[int, int] | None = None
    first = paths[0] if paths else None
    for path in paths:
        raw = image_size(path)
        shape = transform.output_shape(*raw)
        if expected is None:
            expected = shape
        elif shape != expected:
            raise size_mismatch(f"image {path}", raw, shape, f"image {first}", expected)


def iterate_batches(
    load_image: Callable[[int], np.ndarray],
    indices: Sequence[int],
    transform: ImageTransform,
    batch_size: int,
    *,
    describe: Callable[[int], str] | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (indices, images [b, 3, h, w]) batches, loading and transforming lazily.

    ``load_image(i)`` returns a uint8 [H, W, 3] image. Only one batch of pixels is in memory.
    Every image must have the first image's size after the transform (one patch grid, one map
    size): the first one that differs raises DatasetError naming it (``describe(i)``, e.g. its
    file path; "image i" without it) and the image that set the size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    name = describe if describe is not None else (lambda i: f"image {i}")
    expected: tuple[int, int] | None = None
    first = 0
    for lo in range(0, len(indices), batch_size):
        batch = list(indices[lo : lo + batch_size])
        images = []
        for i in batch:
            raw = np.asarray(load_image(i))
            image = transform.image(raw)
            shape = (int(image.shape[-2]), int(image.shape[-1]))
            if expected is None:
                expected, first = shape, i
            elif shape != expected:
                raise size_mismatch(name(i), raw.shape[:2], shape, name(first), expected)
            images.append(image)
        yield batch, torch.stack(images)

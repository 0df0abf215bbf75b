"""AnomalyDataset: an immutable, lazily-loaded sequence of ImageSample.

A dataset holds paths and labels only (plus the small per-category defect configs); images and
masks are read from disk on each ``load_*`` call. It is therefore cheap to build, to subset and to
hand to another process or federated site, and it never holds an open file.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

from core.data.defects import DefectType, saturation_by_name
from core.data.errors import DatasetError
from core.data.imageio import check_mask_size, image_size, read_channel, read_rgb
from core.data.sample import ImageSample
from core.metrics import SaturationSpec

logger = logging.getLogger(__name__)

#: Saturation of a channel whose category has no defects config (MVTec AD, plain folders): the
#: whole channel must be covered for full credit, i.e. sPRO degenerates to a per-channel overlap.
DEFAULT_SATURATION = SaturationSpec(threshold=1.0, relative=True)


@dataclass(frozen=True, eq=False)
class GroundTruthChannel:
    """One ground-truth channel of a defective image at full image resolution, with its type.

    mask: bool [H, W] (the image's size), True on defect pixels; never empty.
    defect: defect type name (from the defects config by pixel value, else the sample's defect).
    saturation: the saturation spec of that defect type (DEFAULT_SATURATION without a config).
    path: the channel / mask file.

    For ``core.metrics.au_spro`` bring ``mask`` and the anomaly map to one size and build
    ``core.metrics.DefectChannel(mask=..., saturation=channel.saturation)``; ``core.evaluation``
    does it (by default the map is upsampled to this mask's size, the AutoVI protocol).
    ``eq=False``: numpy arrays have no boolean ``==``.
    """

    mask: np.ndarray
    defect: str
    saturation: SaturationSpec
    path: Path


class AnomalyDataset(Sequence[ImageSample]):
    """Immutable sequence of ImageSample, possibly mixing categories, with per-category configs.

    samples: the images, in order (readers sort by category, defect, file name).
    defect_types: per category, the defect types of its ``defects_config.json`` (AutoVI / MVTec
        LOCO). Categories without an entry have no config (MVTec AD, plain folders). Entries for
        categories that no sample belongs to are dropped, so a subset only carries what it needs.
    """

    def __init__(
        self,
        samples: Iterable[ImageSample],
        defect_types: Mapping[str, Iterable[DefectType]] | None = None,
    ) -> None:
        self._samples: tuple[ImageSample, ...] = tuple(samples)
        for i, sample in enumerate(self._samples):
            if not isinstance(sample, ImageSample):
                raise TypeError(
                    f"AnomalyDataset sample {i} must be an ImageSample, got {type(sample).__name__}"
                )
        present = {s.category for s in self._samples}
        configs: dict[str, tuple[DefectType, ...]] = {}
        for category, types in (defect_types or {}).items():
            if category not in present:
                continue
            types = tuple(types)
            for t in types:
                if not isinstance(t, DefectType):
                    raise TypeError(
                        f"defect_types[{category!r}] must hold DefectType, got {type(t).__name__}"
                    )
            values = [t.pixel_value for t in types]
            names = [t.name for t in types]
            if len(set(values)) != len(values) or len(set(names)) != len(names):
                raise ValueError(
                    f"defect_types[{category!r}]: defect names and pixel values must be unique, "
                    f"got names {names} and pixel values {values}"
                )
            configs[category] = types
        self._defect_types = configs

    # -- Sequence protocol ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._samples)

    @overload
    def __getitem__(self, index: int) -> ImageSample: ...

    @overload
    def __getitem__(self, index: slice) -> AnomalyDataset: ...

    def __getitem__(self, index: int | slice) -> ImageSample | AnomalyDataset:
        """An int gives the ImageSample; a slice gives an AnomalyDataset (like ``subset``)."""
        if isinstance(index, slice):
            return AnomalyDataset(self._samples[index], self._defect_types)
        return self._samples[operator.index(index)]

    def __iter__(self) -> Iterator[ImageSample]:
        return iter(self._samples)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AnomalyDataset):
            return NotImplemented
        return self._samples == other._samples and self._defect_types == other._defect_types

    __hash__ = None  # type: ignore[assignment]  # equality is by value; datasets are not keys

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, categories={list(self.categories)}, "
            f"anomalous={int(self.labels.sum())})"
        )

    # -- metadata ------------------------------------------------------------------------------

    @property
    def samples(self) -> tuple[ImageSample, ...]:
        """All samples, in order."""
        return self._samples

    @property
    def categories(self) -> tuple[str, ...]:
        """Sorted distinct categories of the samples."""
        return tuple(sorted({s.category for s in self._samples}))

    @property
    def labels(self) -> np.ndarray:
        """Image labels, int64 [N]: 0 normal, 1 anomalous."""
        return np.fromiter((s.label for s in self._samples), dtype=np.int64, count=len(self))

    def subset(self, indices: Iterable[int] | np.ndarray) -> AnomalyDataset:
        """The samples at ``indices`` (in that order; negative indices count from the end).

        Raises IndexError naming the first index out of range. Per-category configs are kept for
        the categories that remain.
        """
        idx = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices))
        if idx.size == 0:
            return AnomalyDataset((), self._defect_types)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            # Bool masks are refused on purpose: [True, False] would silently mean [1, 0].
            raise TypeError(
                f"subset indices must be a 1-D sequence of ints, got dtype {idx.dtype} "
                f"and shape {idx.shape}"
            )
        n = len(self)
        picked: list[ImageSample] = []
        for raw in idx.tolist():
            if not -n <= raw < n:
                raise IndexError(f"subset index {raw} out of range for a dataset of {n} images")
            picked.append(self._samples[raw])
        return AnomalyDataset(picked, self._defect_types)

    def defect_types(self, category: str) -> tuple[DefectType, ...]:
        """Defect types of ``category`` from its defects config; empty if it has none."""
        self._check_category(category)
        return self._defect_types.get(category, ())

    def defect_config(self, category: str) -> dict[str, SaturationSpec]:
        """Defect name -> sPRO saturation spec for ``category`` (empty without a config)."""
        return saturation_by_name(self.defect_types(category))

    def _check_category(self, category: str) -> None:
        if category not in {s.category for s in self._samples}:
            raise DatasetError(
                f"category {category!r} is not in this dataset "
                f"(categories: {list(self.categories)})"
            )

    # -- loading -------------------------------------------------------------------------------

    def load_image(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 RGB [H, W, 3]; DatasetError naming the file if unreadable."""
        return read_rgb(self[index].image_path)

    def load_mask_channels(self, index: int) -> list[np.ndarray]:
        """Ground-truth channels of image ``index``, each bool [H, W] (empty list if good).

        A pixel is a defect where the channel file is non-zero (AutoVI marks defects with the
        defect type's pixel value, not necessarily 255). Each channel must have the image's size.
        """
        return [raw != 0 for raw, _ in self._read_channels(index)]

    def load_mask(self, index: int) -> np.ndarray:
        """Union of the ground-truth channels of image ``index``, bool [H, W].

        All False for a good image (its size is read from the image header).
        """
        sample = self[index]
        if not sample.mask_paths:
            return np.zeros(image_size(sample.image_path), dtype=bool)
        channels = self.load_mask_channels(index)
        return np.logical_or.reduce(channels)

    def load_defect_channels(self, index: int) -> list[GroundTruthChannel]:
        """Ground-truth channels of image ``index`` with their defect type and saturation.

        Every channel must have a defect pixel. With a defects config, a channel's defect type
        is the entry whose ``pixel_value`` the channel holds; the channel must hold exactly one
        non-zero value and it must be in the config. Without a config each channel gets the
        sample's defect name and DEFAULT_SATURATION.
        """
        sample = self[index]
        types = self._defect_types.get(sample.category)
        lookup = {t.pixel_value: t for t in types} if types else None
        channels: list[GroundTruthChannel] = []
        for raw, path in self._read_channels(index):
            mask = raw != 0
            if not mask.any():
                raise DatasetError(f"ground-truth channel {path} has no defect pixel (all zero)")
            if lookup is None:
                channels.append(GroundTruthChannel(mask, sample.defect, DEFAULT_SATURATION, path))
                continue
            values = np.unique(raw[mask])
            if values.size != 1:
                raise DatasetError(
                    f"ground-truth channel {path} must mark one defect with one non-zero pixel "
                    f"value, found values {values.tolist()}"
                )
            value = int(values[0])
            if value not in lookup:
                raise DatasetError(
                    f"ground-truth channel {path} uses pixel value {value}, which is not in the "
                    f"defects config of category {sample.category!r} "
                    f"(known pixel values: {sorted(lookup)})"
                )
            t = lookup[value]
            channels.append(GroundTruthChannel(mask, t.name, t.saturation, path))
        return channels

    def _read_channels(self, index: int) -> list[tuple[np.ndarray, Path]]:
        """Raw channel arrays [H, W] of image ``index``, size-checked against the image."""
        sample = self[index]
        if not sample.mask_paths:
            return []
        expected = image_size(sample.image_path)
        out: list[tuple[np.ndarray, Path]] = []
        for path in sample.mask_paths:
            raw = read_channel(path)
            check_mask_size(path, raw.shape, sample.image_path, expected)  # type: ignore[arg-type]
            out.append((raw, path))
        return out


def describe(dataset: Sequence[ImageSample]) -> dict[str, dict[str, int]]:
    """Counts per category and label, for logging: {category: {"good": n, "anomalous": m}}."""
    counts: dict[str, dict[str, int]] = {}
    for sample in dataset:
        entry = counts.setdefault(sample.category, {"good": 0, "anomalous": 0})
        entry["anomalous" if sample.is_anomalous else "good"] += 1
    return dict(sorted(counts.items()))

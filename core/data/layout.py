"""Walking the MVTec-style folder layout shared by MVTec AD, MVTec LOCO and AutoVI.

    <root>/<category>/train/good/*.png
    <root>/<category>/<split>/<defect>/*.png          (split: train, validation, test)
    <root>/<category>/ground_truth/<defect>/...       (format differs per dataset)

Only paths are listed here; nothing is decoded. Listings are sorted so that a dataset's order (and
so every seeded partition of it) is the same on every machine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from core.data.errors import DatasetError
from core.data.imageio import check_mask_size, image_size, is_image_file
from core.data.sample import GOOD, SPLITS, ImageSample

logger = logging.getLogger(__name__)

#: Given (category folder, defect name, image path), return the ground-truth files of a defective
#: image, or raise DatasetError naming what is missing.
MaskFinder = Callable[[Path, str, Path], tuple[Path, ...]]


def check_root(root: str | Path) -> Path:
    """The dataset root as a Path; DatasetError naming it if it is not a directory."""
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise DatasetError(f"dataset root {path} {what}")
    return path


def check_split(split: str) -> str:
    """Validate a split name ("train", "test", "validation")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (hidden files skipped)."""
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def resolve_categories(
    root: Path, categories: Iterable[str] | str | None, argument: str = "categories"
) -> list[str]:
    """The category names to read, each checked to be a valid category folder.

    ``None`` means every sub-folder of ``root`` that has a ``train`` or ``test`` folder (other
    folders, e.g. "license", are skipped); a single str means that one category. Every category
    must have ``train/good``: that folder is what identifies the layout.
    """
    if categories is None:
        names = sorted(
            p.name
            for p in root.iterdir()
            if p.is_dir()
            and not p.name.startswith(".")
            and ((p / "train").is_dir() or (p / "test").is_dir())
        )
        if not names:
            raise DatasetError(
                f"no categories found under {root} (expected <root>/<category>/train/good)"
            )
    else:
        names = [categories] if isinstance(categories, str) else list(categories)
        if not names:
            raise ValueError(f"{argument} must name at least one category, got an empty list")
        for name in names:
            if not isinstance(name, str) or not name or "/" in name or "\\" in name:
                raise ValueError(f"{argument}: invalid category name {name!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"{argument}: duplicate category names in {names}")
    for name in names:
        folder = root / name
        if not folder.is_dir():
            raise DatasetError(f"category folder {folder} does not exist")
        if not (folder / "train" / GOOD).is_dir():
            raise DatasetError(
                f"category folder {folder} has no {Path('train') / GOOD} folder "
                "(not an MVTec-style category)"
            )
    return names


def read_split(root: Path, category: str, split: str, find_masks: MaskFinder) -> list[ImageSample]:
    """Samples of ``<root>/<category>/<split>/<defect>/*``: "good" first, then defects by name.

    Reads the headers (not the pixels) of defect images and their masks: a mask whose size
    differs from its image's raises DatasetError naming both files.
    """
    split_dir = root / category / split
    if not split_dir.is_dir():
        raise DatasetError(f"split folder {split_dir} does not exist")
    defects = sorted(
        p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    # "good" first so that normal images lead, as users expect when browsing a dataset.
    defects.sort(key=lambda d: d != GOOD)
    samples: list[ImageSample] = []
    for defect in defects:
        images = list_images(split_dir / defect)
        if not images:
            logger.warning("no images in %s", split_dir / defect)
        for image in images:
            masks = () if defect == GOOD else find_masks(root / category, defect, image)
            if masks:  # headers only: a wrong-size mask is named now, not after fit and predict
                size = image_size(image)
                for mask in masks:
                    check_mask_size(mask, image_size(mask), image, size)
            samples.append(
                ImageSample(
                    image_path=image,
                    category=category,
                    split=split,
                    defect=defect,
                    mask_paths=masks,
                )
            )
    if not samples:
        raise DatasetError(f"no images found under {split_dir}")
    return samples

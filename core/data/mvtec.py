"""Reader for the MVTec AD folder layout.

<root>/<category>/train/good/*.png
<root>/<category>/test/<defect>/*.png                       ("good" = normal)
<root>/<category>/ground_truth/<defect>/<stem>_mask.png     (one binary mask per image)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from core.data.dataset import AnomalyDataset, describe
from core.data.errors import DatasetError
from core.data.layout import check_root, check_split, read_split, resolve_categories

logger = logging.getLogger(__name__)


def mvtec_mask_path(category_dir: Path, defect: str, image: Path) -> Path:
    """Where MVTec AD keeps the mask of ``image``: ground_truth/<defect>/<stem>_mask.png."""
    return category_dir / "ground_truth" / defect / f"{image.stem}_mask.png"


def _find_mvtec_mask(category_dir: Path, defect: str, image: Path) -> tuple[Path, ...]:
    mask = mvtec_mask_path(category_dir, defect, image)
    if not mask.is_file():
        raise DatasetError(f"no ground-truth mask for defect image {image}: expected {mask}")
    return (mask,)


class MVTecDataset(AnomalyDataset):
    """All images of one split of an MVTec AD dataset (one or several categories).

    root: the dataset folder holding one folder per category.
    categories: category names, a single name, or None for every category found under ``root``.
    split: "train" (normal images only) or "test" (good and defective images); "validation"
        is read the same way where the folder exists.

    Only paths and the headers of defect images and masks are read here (no image is
    decoded), so construction is cheap; unreadable files raise DatasetError when loaded. Raises
    DatasetError naming the folder or file for a missing root / category / train/good / split
    folder, a defect image without its mask, or a mask whose size differs from its image's.
    """

    def __init__(
        self,
        root: str | Path,
        categories: Iterable[str] | str | None = None,
        split: str = "train",
    ) -> None:
        self.root = check_root(root)
        self.split = check_split(split)
        names = resolve_categories(self.root, categories)
        samples = []
        for name in names:
            samples.extend(read_split(self.root, name, split, _find_mvtec_mask))
        super().__init__(samples)
        logger.info("MVTec %s split of %s: %s", split, self.root, describe(self))

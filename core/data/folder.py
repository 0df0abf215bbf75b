"""Reader for a plain folder of a site's own, unlabelled images."""

from __future__ import annotations

import logging
from pathlib import Path

from core.data.dataset import AnomalyDataset
from core.data.errors import DatasetError
from core.data.imageio import is_image_file
from core.data.layout import check_root
from core.data.sample import GOOD, ImageSample

logger = logging.getLogger(__name__)


class ImageFolderDataset(AnomalyDataset):
    """Every image under ``root`` (recursively), as normal "train" images of one category.

    root: the folder; images are found in it and all its sub-folders (png, jpg, jpeg, bmp,
        tif, tiff, any case), sorted by relative path. Hidden files and folders are skipped.
    category: the category name given to every image; default the folder's name.

    PatchCore fits on normal images, so a site's unlabelled images are treated as normal.
    Raises DatasetError naming ``root`` if it is missing or holds no image.
    """

    def __init__(self, root: str | Path, category: str | None = None) -> None:
        self.root = check_root(root)
        name = self.root.resolve().name if category is None else category
        if not isinstance(name, str) or not name:
            raise ValueError(f"category must be a non-empty str, got {name!r} (root {self.root})")
        images = sorted(
            (
                p
                for p in self.root.rglob("*")
                if not any(part.startswith(".") for part in p.relative_to(self.root).parts)
                and is_image_file(p)
            ),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not images:
            raise DatasetError(f"no images found under {self.root}")
        super().__init__(
            ImageSample(image_path=p, category=name, split="train", defect=GOOD) for p in images
        )
        self.split = "train"
        logger.info("image folder %s: %d images, category %r", self.root, len(images), name)

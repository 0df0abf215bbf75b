"""Reader for a plain folder of a site's own, unlabelled images."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from core.data.dataset import AnomalyDataset
from core.data.errors import DatasetError
from core.data.imageio import is_image_file
from core.data.layout import check_root
from core.data.sample import GOOD, ImageSample

logger = logging.getLogger(__name__)


#: Folder names of the MVTec / AutoVI layout that hold defective images or their masks. A plain
#: folder that contains one is refused: every image of a plain folder trains the model, and
#: PatchCore must never learn defects as normal.
HELD_OUT_FOLDERS: tuple[str, ...] = ("test", "ground_truth")


def held_out_folders(root: Path) -> list[Path]:
    """Folders named like :data:`HELD_OUT_FOLDERS` under ``root`` (hidden ones skipped),
    sorted; ``root`` itself is not included."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / d for d in dirnames if d in HELD_OUT_FOLDERS]
        # nothing under a held-out folder needs listing: the folder itself is the problem
        dirnames[:] = [d for d in dirnames if d not in HELD_OUT_FOLDERS]
    return found


class ImageFolderDataset(AnomalyDataset):
    """Every image under ``root`` (recursively), as normal "train" images of one category.

    root: the folder; images are found in it and all its sub-folders (png, jpg, jpeg, bmp,
        tif, tiff, any case), sorted by relative path. Hidden files and folders are skipped.
    category: the category name given to every image; default the folder's name.

    PatchCore fits on normal images, so a site's unlabelled images are treated as normal.
    Raises DatasetError naming ``root`` if it is missing or holds no image, and naming the
    folder if ``root`` contains a ``test`` or ``ground_truth`` folder (an MVTec / AutoVI layout
    read as a plain folder would train on its defective images and masks).
    """

    def __init__(self, root: str | Path, category: str | None = None) -> None:
        self.root = check_root(root)
        held_out = held_out_folders(self.root)
        if held_out:
            raise DatasetError(
                f"{self.root} holds {held_out[0].relative_to(self.root)}/"
                + (f" (and {len(held_out) - 1} more such folder(s))" if len(held_out) > 1 else "")
                + ": a plain image folder trains on every image in it, and test/ and "
                "ground_truth/ hold defects and masks. Give the MVTec / AutoVI dataset or "
                "category folder, or a folder of good images only"
            )
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

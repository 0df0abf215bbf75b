"""Reader for the AutoVI (and MVTec LOCO) folder layout.

    <root>/<object>/train/good/*.png
    <root>/<object>/test/<defect>/*.png                         ("good" = normal)
    <root>/<object>/ground_truth/<defect>/<image stem>/0000.png, 0001.png, ...
    <root>/<object>/defects_config.json

Each ground-truth PNG is one defect *channel*: non-zero pixels (holding the defect type's
``pixel_value`` from defects_config.json) mark one defect, and channels may overlap. The sPRO
metric scores each channel separately with its defect type's saturation threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from core.data.dataset import AnomalyDataset, describe
from core.data.defects import DEFECTS_CONFIG_FILENAME, DefectType, load_defects_config
from core.data.errors import DatasetError
from core.data.layout import check_root, check_split, read_split, resolve_categories

logger = logging.getLogger(__name__)

#: The six objects of the AutoVI dataset (Renault Group, 2024).
AUTOVI_OBJECTS: tuple[str, ...] = (
    "engine_wiring",
    "pipe_clip",
    "pipe_staple",
    "tank_screw",
    "underbody_pipes",
    "underbody_screw",
)


def autovi_channel_dir(object_dir: Path, defect: str, image: Path) -> Path:
    """Folder of the channel PNGs of ``image``: ground_truth/<defect>/<image stem>/."""
    return object_dir / "ground_truth" / defect / image.stem


def _find_autovi_channels(object_dir: Path, defect: str, image: Path) -> tuple[Path, ...]:
    folder = autovi_channel_dir(object_dir, defect, image)
    if not folder.is_dir():
        raise DatasetError(
            f"no ground-truth mask for defect image {image}: expected folder {folder}"
        )
    # Channel files are PNGs named 0000.png, 0001.png, ...: sorted by name = channel order.
    channels = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() == ".png" and not p.name.startswith(".") and p.is_file()
    )
    if not channels:
        raise DatasetError(
            f"no ground-truth mask for defect image {image}: folder {folder} has no PNG channels"
        )
    return tuple(channels)


class AutoVIDataset(AnomalyDataset):
    """All images of one split of an AutoVI / MVTec LOCO dataset (one or several objects).

    root: the dataset folder holding one folder per object.
    objects: object names (e.g. AUTOVI_OBJECTS), a single name, or None for every object found.
    split: "train", "test" or "validation".

    Every object must have a valid ``defects_config.json``; its defect types are kept per
    object (``defect_config(object)``, ``load_defect_channels(i)``). Only paths and the small
    JSON configs (and the headers of defect images and their channels, to check their sizes)
    are read here. Raises DatasetError naming the folder or file for a missing
    root / object / train/good / split folder or config, a malformed config, or a defect image
    without ground-truth channels.
    """

    def __init__(
        self,
        root: str | Path,
        objects: Iterable[str] | str | None = None,
        split: str = "train",
    ) -> None:
        self.root = check_root(root)
        self.split = check_split(split)
        names = resolve_categories(self.root, objects, argument="objects")
        configs: dict[str, tuple[DefectType, ...]] = {}
        samples = []
        for name in names:
            configs[name] = load_defects_config(self.root / name / DEFECTS_CONFIG_FILENAME)
            samples.extend(read_split(self.root, name, split, _find_autovi_channels))
        super().__init__(samples, configs)
        logger.info("AutoVI %s split of %s: %s", split, self.root, describe(self))

"""Check a site's data folder before a round and name every problem (``fedclient check --data``).

The readers (AutoVIDataset, MVTecDataset, ImageFolderDataset) stop at the first problem, and
some problems only surface after fitting (a truncated image, a mask of the wrong size) or never
(a grey image among colour ones, an anti-aliased mask). This walks the whole folder once,
decodes every image and mask, and returns all problems, each with the file and what is wrong:

* errors (the round would fail or its metrics would be wrong): no usable layout, a missing
  category / train/good folder, unreadable or zero-size images, a defective test image without
  its mask, a mask that is unreadable, of another size than its image, empty or not binary
  (MVTec AD: one non-zero value; AutoVI: one value of its defects config per channel), a
  missing or invalid ``defects_config.json`` (AutoVI), defect folders under train/;
* warnings (the round runs, but look): mixed image sizes or modes within a category, masks or
  ground-truth folders with no image, files that are not images, empty folders, no test split
  (no metrics then).

``resolve_site_folder`` is the one place that decides which reader a site folder needs
(fedclient.site.load_site_data uses it too). It accepts the folder at any level of the MVTec /
AutoVI layout: the dataset folder (one sub-folder per category), or one category folder
(``<category>/train/good``). It never lets anything under ``test/`` or ``ground_truth/`` be
read as training images: a folder inside a category's test or ground-truth folder, and a plain
folder that contains such folders, are refused.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from core.data.autovi import autovi_channel_dir
from core.data.defects import DEFECTS_CONFIG_FILENAME, DefectType, load_defects_config
from core.data.errors import DatasetError
from core.data.folder import HELD_OUT_FOLDERS, held_out_folders
from core.data.imageio import IMAGE_SUFFIXES, is_image_file, read_channel
from core.data.mvtec import mvtec_mask_path
from core.data.sample import GOOD, SPLITS

logger = logging.getLogger(__name__)

__all__ = [
    "DataCheck",
    "Layout",
    "Problem",
    "SiteFolder",
    "check_site_data",
    "detect_layout",
    "resolve_site_folder",
]

Layout = Literal["autovi", "mvtec", "folder"]

LAYOUT_NAMES: dict[str, str] = {
    "autovi": "AutoVI / MVTec LOCO",
    "mvtec": "MVTec AD",
    "folder": "plain image folder",
}


@dataclass(frozen=True)
class Problem:
    """One problem: ``severity`` "error" or "warning", the file or folder, what is wrong."""

    severity: Literal["error", "warning"]
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.message}"


@dataclass
class DataCheck:
    """What :func:`check_site_data` found.

    layout: the detected layout (None when the folder is unusable).
    counts: {category: {split: {defect: images}}}; a plain folder has one category, split
        "train", defect "good".
    problems: in the order found (folders sorted by name).
    """

    root: Path
    layout: Layout | None = None
    counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def images(self, split: str) -> int:
        """Images of ``split`` over all categories."""
        return sum(sum(s.get(split, {}).values()) for s in self.counts.values())

    def error(self, path: Path, message: str) -> None:
        self.problems.append(Problem("error", path, message))

    def warn(self, path: Path, message: str) -> None:
        self.problems.append(Problem("warning", path, message))


def _category_dirs(root: Path, categories: tuple[str, ...] | None) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (categories is None or p.name in categories))


def detect_layout(root: Path, categories: tuple[str, ...] | None = None) -> Layout:
    """Which reader ``root`` needs: "autovi" if a category folder has a defects_config.json,
    "mvtec" if one has train/good, else "folder" (a plain folder of normal images)."""
    dirs = _category_dirs(root, categories)
    if any((p / DEFECTS_CONFIG_FILENAME).is_file() for p in dirs):
        return "autovi"
    if any((p / "train" / GOOD).is_dir() for p in dirs):
        return "mvtec"
    return "folder"


def _is_category(folder: Path) -> bool:
    """Whether ``folder`` is one category of an MVTec AD / AutoVI dataset: it has train/good,
    or a defects config beside a train/ or test/ folder."""
    if (folder / "train" / GOOD).is_dir():
        return True
    return (folder / DEFECTS_CONFIG_FILENAME).is_file() and any(
        (folder / split).is_dir() for split in SPLITS
    )


@dataclass(frozen=True)
class SiteFolder:
    """How to read a site's data folder (:func:`resolve_site_folder`).

    root: the dataset folder the reader opens (the parent of a category folder given as data).
    layout: which reader. categories: the categories to read (None: every one under root).
    """

    root: Path
    layout: Layout
    categories: tuple[str, ...] | None


def resolve_site_folder(
    path: str | Path, categories: tuple[str, ...] | None = None
) -> SiteFolder:
    """Which reader, root and categories ``path`` (a site's ``--data``) needs.

    * a category folder (``brick/`` with ``train/good``): that one category, read from its
      parent with the MVTec AD reader (AutoVI when it has a defects config);
    * a dataset folder (categories as sub-folders): as detected by :func:`detect_layout`;
    * a folder inside a category's ``test/`` or ``ground_truth/``, or a plain folder that
      contains such a folder: DatasetError naming the folder to give instead (training on
      defective images or masks would teach the model that defects are normal);
    * any other folder: a plain folder of normal images.

    ``categories`` (``--categories``) must name that category for a category folder. Raises
    DatasetError for a missing folder.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DatasetError(
            f"site data folder {path} " + ("is not a folder" if path.exists() else "does not exist")
        )
    if _is_category(path):
        name = path.resolve().name
        if categories and tuple(categories) != (name,):
            raise DatasetError(
                f"{path} is the category folder {name!r}, but --categories names "
                f"{list(categories)}: give the dataset folder {path.resolve().parent} to choose "
                "categories, or leave --categories out"
            )
        layout: Layout = "autovi" if (path / DEFECTS_CONFIG_FILENAME).is_file() else "mvtec"
        return SiteFolder(path.resolve().parent, layout, (name,))
    resolved = path.resolve()
    for depth, ancestor in enumerate(resolved.parents):
        if depth >= 4:
            break
        if _is_category(ancestor):
            inside = resolved.relative_to(ancestor).parts[0]
            if inside in HELD_OUT_FOLDERS:
                raise DatasetError(
                    f"{path} is inside {inside}/ of the category folder {ancestor}: it holds "
                    "test images or masks, never training images. Give --data "
                    f"{ancestor} (its train/good images train the model, its test images are "
                    "scored)"
                )
            break
    layout = detect_layout(path, categories)
    if layout != "folder":
        return SiteFolder(path, layout, categories)
    held_out = held_out_folders(path)
    if held_out:
        nested = next((f.parent for f in held_out if _is_category(f.parent)), None)
        hint = (
            f"; it looks like an MVTec / AutoVI category at {nested}: give --data {nested} "
            f"(or its dataset folder {nested.parent})"
            if nested is not None else ""
        )
        raise DatasetError(
            f"{path} is not an MVTec / AutoVI folder but holds "
            f"{held_out[0].relative_to(path)}/: as a plain image folder every image in it would "
            f"train the model, defects and masks included{hint}"
        )
    return SiteFolder(path, "folder", None)


class _Images:
    """Decodes each image once and remembers its size and mode, per category."""

    def __init__(self, report: DataCheck) -> None:
        self.report = report
        self.sizes: dict[str, Counter[tuple[int, int]]] = {}
        self.modes: dict[str, Counter[str]] = {}
        self.example: dict[tuple[str, object], Path] = {}
        self.size_of: dict[Path, tuple[int, int]] = {}

    def check(self, path: Path, category: str) -> bool:
        """Decode ``path``; False (and an error) when it is empty or unreadable."""
        if path.stat().st_size == 0:
            self.report.error(path, "empty file (0 bytes)")
            return False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    image.load()  # decode everything: a truncated file fails here
                    width, height, mode = image.width, image.height, image.mode
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as error:
            self.report.error(path, f"cannot read the image: {error}")
            return False
        if width == 0 or height == 0:
            self.report.error(path, f"image has no pixels ({width}x{height})")
            return False
        self.sizes.setdefault(category, Counter())[(width, height)] += 1
        self.modes.setdefault(category, Counter())[mode] += 1
        self.example.setdefault((category, (width, height)), path)
        self.example.setdefault((category, mode), path)
        self.size_of[path] = (height, width)
        return True

    def warn_mixed(self, folder: Path, category: str) -> None:
        """Warnings for a category whose images differ in size or mode (most common first;
        an example file of each other kind)."""
        def name(path: Path) -> str:
            return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(
                path)

        sizes = self.sizes.get(category, Counter())
        if len(sizes) > 1:
            common = sizes.most_common()
            others = ", ".join(
                f"{w}x{h}: {n} (e.g. {name(self.example[(category, (w, h))])})"
                for (w, h), n in common[1:]
            )
            (w0, h0), n0 = common[0]
            self.report.warn(folder, f"mixed image sizes: {w0}x{h0}: {n0} image(s); {others} "
                             "(all are resized to the extractor's input, but one camera and "
                             "setting per category is what PatchCore assumes)")
        modes = self.modes.get(category, Counter())
        if len(modes) > 1:
            common_modes = modes.most_common()
            others = ", ".join(f"{m}: {n} (e.g. {name(self.example[(category, m)])})"
                               for m, n in common_modes[1:])
            self.report.warn(folder, f"mixed image modes: {common_modes[0][0]}: "
                             f"{common_modes[0][1]} image(s); {others} (all are converted to "
                             "RGB; a grey image among colour ones is usually a mistake)")


def _list_folder(folder: Path, report: DataCheck) -> list[Path]:
    """Image files of ``folder`` (sorted); warns about other files, which readers ignore."""
    images = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if is_image_file(path):
            images.append(path)
        elif path.is_file():
            report.warn(path, "not an image file (suffix not in "
                        f"{sorted(IMAGE_SUFFIXES)}): ignored")
        elif path.is_dir():
            report.warn(path, "unexpected folder here: ignored")
    if not images:
        report.warn(folder, "no images in this folder")
    return images


def _check_mask(report: DataCheck, mask: Path, image: Path, image_hw: tuple[int, int] | None,
                config: dict[int, DefectType] | None) -> None:
    """A mask / channel file: readable, its image's size, non-empty, binary (one value)."""
    if mask.stat().st_size == 0:
        report.error(mask, "empty mask file (0 bytes)")
        return
    try:
        raw = read_channel(mask)
    except DatasetError as error:
        report.error(mask, str(error))
        return
    if image_hw is not None and raw.shape != image_hw:
        report.error(mask, f"mask is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image "
                     f"{image.name} is {image_hw[1]}x{image_hw[0]}")
        return
    values = np.unique(raw)
    nonzero = [int(v) for v in values if v != 0]
    if not nonzero:
        report.error(mask, f"mask has no defect pixel (all zero) for defect image {image.name}")
    elif len(nonzero) > 1:
        shown = nonzero[:6]
        report.error(mask, f"mask is not binary: {len(nonzero)} non-zero values, e.g. {shown} "
                     "(anti-aliased or resized with interpolation? masks need one value)")
    elif config is not None and nonzero[0] not in config:
        report.error(mask, f"channel value {nonzero[0]} is not a pixel_value of "
                     f"{DEFECTS_CONFIG_FILENAME} (known: {sorted(config)})")


def _check_category(report: DataCheck, images: _Images, folder: Path, layout: Layout) -> None:
    category = folder.name
    counts = report.counts.setdefault(category, {})
    config: dict[int, DefectType] | None = None
    if layout == "autovi":
        config_path = folder / DEFECTS_CONFIG_FILENAME
        if not config_path.is_file():
            report.error(config_path, "missing: every object folder of an AutoVI / MVTec LOCO "
                         "dataset needs its defects config")
        else:
            try:
                config = {t.pixel_value: t for t in load_defects_config(config_path)}
            except DatasetError as error:
                report.error(config_path, f"invalid defects config: {error}")
    if not (folder / "train" / GOOD).is_dir():
        report.error(folder / "train" / GOOD, "missing: the training images (normal only) "
                     "of this category go here")
    if not (folder / "test").is_dir():
        report.warn(folder / "test", "no test split: the site fits and uploads, but computes "
                    "no metrics")
    masks_seen: set[Path] = set()
    test_defects: set[str] = set()
    for split in ("train", "validation", "test"):
        split_dir = folder / split
        if not split_dir.is_dir():
            continue
        for defect_dir in sorted(p for p in split_dir.iterdir() if not p.name.startswith(".")):
            if not defect_dir.is_dir():
                report.warn(defect_dir, f"file directly in {split}/ (images belong in "
                            f"{split}/<defect>/): ignored")
                continue
            defect = defect_dir.name
            if split == "train" and defect != GOOD:
                report.error(defect_dir, "defect folder under train/: training images must "
                             "all be normal (train/good)")
                continue
            files = _list_folder(defect_dir, report)
            counts.setdefault(split, {})[defect] = len(files)
            if split == "test":
                test_defects.add(defect)
            for path in files:
                readable = images.check(path, category)
                if defect == GOOD or split == "train":
                    continue
                hw = images.size_of.get(path) if readable else None
                masks_seen |= _check_masks_of(report, folder, defect, path, hw, layout, config)
    images.warn_mixed(folder, category)
    _extra_ground_truth(report, folder, test_defects, masks_seen, layout)


def _check_masks_of(report: DataCheck, folder: Path, defect: str, image: Path,
                    hw: tuple[int, int] | None, layout: Layout,
                    config: dict[int, DefectType] | None) -> set[Path]:
    """Check the ground truth of one defective image; returns the mask paths it has."""
    if layout == "mvtec":
        mask = mvtec_mask_path(folder, defect, image)
        if not mask.is_file():
            report.error(image, f"defect image without its mask: expected {mask}")
            return set()
        _check_mask(report, mask, image, hw, None)
        return {mask}
    channel_dir = autovi_channel_dir(folder, defect, image)
    if not channel_dir.is_dir():
        report.error(image, f"defect image without ground truth: expected folder {channel_dir} "
                     "with one PNG per defect channel")
        return set()
    channels = sorted(p for p in channel_dir.iterdir()
                      if p.suffix.lower() == ".png" and not p.name.startswith("."))
    if not channels:
        report.error(channel_dir, f"no PNG channel for defect image {image.name}")
    for channel in channels:
        _check_mask(report, channel, image, hw, config)
    return {channel_dir}


def _extra_ground_truth(report: DataCheck, folder: Path, test_defects: set[str],
                        seen: set[Path], layout: Layout) -> None:
    """Ground truth that belongs to no test image (a typo in a name, a moved image)."""
    truth = folder / "ground_truth"
    if not truth.is_dir():
        return
    for defect_dir in sorted(p for p in truth.iterdir() if not p.name.startswith(".")):
        if not defect_dir.is_dir():
            continue
        if defect_dir.name == GOOD or defect_dir.name not in test_defects:
            report.warn(defect_dir, f"ground truth for defect {defect_dir.name!r}, which has "
                        "no test/<defect> folder: not used")
            continue
        for entry in sorted(p for p in defect_dir.iterdir() if not p.name.startswith(".")):
            wanted = entry.is_dir() if layout == "autovi" else entry.is_file()
            if wanted and entry not in seen:
                report.warn(entry, "ground truth without a test image of that name: not used")


def _check_folder(report: DataCheck, images: _Images, root: Path) -> None:
    """A plain folder: every image under it (recursively) is a normal training image."""
    category = root.resolve().name
    found = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith("."):
                continue
            if not is_image_file(path):
                report.warn(path, "not an image file: ignored")
                continue
            found += 1
            images.check(path, category)
    report.counts[category] = {"train": {GOOD: found}}
    if not found:
        report.error(root, "no images found (looked for "
                     f"{', '.join(sorted(IMAGE_SUFFIXES))} in it and its sub-folders)")
        return
    images.warn_mixed(root, category)
    report.warn(root, "plain image folder: every image is a normal training image; there is "
                "no test split, so a round computes no metrics")


def check_site_data(root: str | Path, categories: tuple[str, ...] | None = None) -> DataCheck:
    """Walk ``root`` (a site's data folder) and report every problem (module docstring).

    ``categories`` restricts an AutoVI / MVTec folder to those category folders (each must
    exist). Never raises for bad data: everything wrong is a Problem.
    """
    given = Path(root).expanduser()
    report = DataCheck(given)
    if not given.is_dir():
        report.error(given, "does not exist" if not given.exists() else "is not a folder")
        return report
    try:
        site = resolve_site_folder(given, categories)
    except DatasetError as error:
        report.error(given, str(error))
        return report
    root, layout = site.root, site.layout
    if layout != "folder":
        categories = site.categories
    report.layout = layout
    images = _Images(report)
    if layout == "folder":
        if categories:
            report.error(root, f"no category folders {list(categories)} with train/good or "
                         f"{DEFECTS_CONFIG_FILENAME}: a plain image folder has no categories")
            return report
        _check_folder(report, images, root)
        return report
    if categories:
        for name in categories:
            if not (root / name).is_dir():
                report.error(root / name, "category folder does not exist")
    for folder in _category_dirs(root, categories):
        looks_like_category = any((folder / s).is_dir() for s in SPLITS) or (
            folder / DEFECTS_CONFIG_FILENAME).is_file()
        if not looks_like_category:
            report.warn(folder, "not a category folder (no train/ or test/): ignored")
            continue
        _check_category(report, images, folder, layout)
    logger.info("checked %s (%s): %d error(s), %d warning(s)", root, layout,
                len(report.errors), len(report.warnings))
    return report

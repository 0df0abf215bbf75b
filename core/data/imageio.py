"""Reading images and ground-truth channels from disk with errors that name the file.

Every function opens the file, reads it and closes it again: datasets hold paths only, never open
handles, so they stay plain data that can be copied between processes.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from core.data.errors import DatasetError

logger = logging.getLogger(__name__)

#: Lower-case file suffixes recognised as images by the readers.
IMAGE_SUFFIXES: frozenset[str] = frozenset({".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff"})

# What PIL raises for a truncated / corrupt / non-image file. DecompressionBombError is raised
# for absurd sizes (a corrupt header or a malicious file); PIL warns first at half that size.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def is_image_file(path: Path) -> bool:
    """True for a regular, non-hidden file with a recognised image suffix."""
    return (
        path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
    )


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image as uint8 RGB, shape [H, W, 3]. Grey images are replicated to 3 channels."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                rgb = img.convert("RGB")
    except FileNotFoundError as exc:
        raise DatasetError(f"image not found: {path}") from exc
    except (*_PIL_ERRORS, Image.DecompressionBombWarning) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc
    return np.asarray(rgb, dtype=np.uint8)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image from its header, without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError as exc:
        raise DatasetError(f"image not found: {path}") from exc
    except _PIL_ERRORS as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc
    return height, width


def read_channel(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask / channel PNG as its raw grey values, shape [H, W].

    Zero is defect-free; a defect pixel holds the defect type's ``pixel_value`` (255 in MVTec AD,
    other values in AutoVI / MVTec LOCO). For an RGB(A) file the first colour channel is used, as
    the reference MVTec LOCO evaluation code does, because converting to grey with luma weights
    would change the pixel value. Integer dtype (uint8, or wider for 16-bit files).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            mode = img.mode
            # Palette indices mean nothing by themselves; resolve the colours first.
            arr = np.asarray(img.convert("RGB") if mode == "P" else img)
    except FileNotFoundError as exc:
        raise DatasetError(f"mask not found: {path}") from exc
    except _PIL_ERRORS as exc:
        raise DatasetError(f"cannot read mask {path}: {exc}") from exc
    if arr.dtype == np.bool_:  # mode "1"
        arr = arr.astype(np.uint8) * np.uint8(255)
    if arr.ndim == 3:  # "LA", "RGB", "RGBA"
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise DatasetError(f"mask {path} has unsupported shape {arr.shape} (mode {mode})")
    if not np.issubdtype(arr.dtype, np.integer):
        # Mode "F": a float mask; only the zero / non-zero distinction is meaningful.
        arr = (arr != 0).astype(np.uint8) * np.uint8(255)
    return arr


def check_mask_size(
    mask: Path, mask_size: tuple[int, int], image: Path, image_hw: tuple[int, int]
) -> None:
    """DatasetError naming both files unless ``mask_size == image_hw`` ((height, width) each)."""
    if tuple(mask_size) != tuple(image_hw):
        raise DatasetError(
            f"mask {mask} has size {mask_size[1]}x{mask_size[0]} (WxH) but its image "
            f"{image} has size {image_hw[1]}x{image_hw[0]}"
        )

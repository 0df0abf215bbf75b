"""One image of an anomaly-detection dataset, described by paths only (nothing is read here)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

#: Defect name of a normal (defect-free) image, as in the MVTec AD / AutoVI folder layouts.
GOOD = "good"

#: Splits an ImageSample may belong to.
SPLITS: tuple[str, ...] = ("test", "train", "validation")


@dataclass(frozen=True)
class ImageSample:
    """Paths and labels of one image; plain data, cheap to copy and to send between processes.

    image_path: the RGB (or grey) image file.
    category: the product / object / texture the image shows (e.g. "bottle", "pipe_clip").
    split: "train", "test" or "validation".
    defect: the defect type, ``"good"`` for a normal image.
    mask_paths: ground-truth mask files. Empty for good images. MVTec AD has one mask per
        defective image; AutoVI / MVTec LOCO have one PNG per defect *channel* (one defect
        instance each), so a defective image may have several.

    A str path is accepted and converted to ``Path``; a list of mask paths to a tuple.
    """

    image_path: Path
    category: str
    split: str
    defect: str = GOOD
    mask_paths: tuple[Path, ...] = field(default=())

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__ so callers may pass str / list.
        if not isinstance(self.image_path, str | Path):
            raise TypeError(
                "ImageSample.image_path must be a str or Path, "
                f"got {type(self.image_path).__name__}"
            )
        object.__setattr__(self, "image_path", Path(self.image_path))
        if isinstance(self.mask_paths, str | Path):
            raise TypeError(
                f"ImageSample.mask_paths must be a sequence of paths, got a single path "
                f"{self.mask_paths!s} (image {self.image_path})"
            )
        object.__setattr__(self, "mask_paths", tuple(Path(p) for p in self.mask_paths))
        if not isinstance(self.category, str) or not self.category:
            raise ValueError(
                f"ImageSample.category must be a non-empty str, got {self.category!r} "
                f"(image {self.image_path})"
            )
        if self.split not in SPLITS:
            raise ValueError(
                f"ImageSample.split must be one of {SPLITS}, got {self.split!r} "
                f"(image {self.image_path})"
            )
        if not isinstance(self.defect, str) or not self.defect:
            raise ValueError(
                f"ImageSample.defect must be a non-empty str ('{GOOD}' for normal images), "
                f"got {self.defect!r} (image {self.image_path})"
            )
        if self.defect == GOOD and self.mask_paths:
            raise ValueError(
                f"good image {self.image_path} must have no mask paths, got "
                f"{[str(p) for p in self.mask_paths]}"
            )
        if self.defect != GOOD and not self.mask_paths:
            # Every pixel metric needs the ground truth; an anomalous image without it would make
            # load_mask silently return "no defect".
            raise ValueError(
                f"anomalous image {self.image_path} (defect {self.defect!r}) has no mask paths"
            )

    @property
    def is_anomalous(self) -> bool:
        """True for a defective image (defect != "good")."""
        return self.defect != GOOD

    @property
    def label(self) -> int:
        """Image-level label: 0 normal, 1 anomalous."""
        return int(self.is_anomalous)

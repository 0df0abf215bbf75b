"""Image and mask preprocessing shared by fitting, scoring and evaluation.

Images go through resize -> centre crop -> ImageNet normalisation, as in the original PatchCore
(Resize 256, CenterCrop 224). Ground-truth masks go through the same geometry with nearest
interpolation, so an anomaly map and its mask always cover the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageTransform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageTransform:
    """Resize, centre-crop and normalise images; resize and crop masks the same way.

    Attributes:
        resize: target size before cropping. An int resizes the *shorter* side to it, keeping the
            aspect ratio (torchvision ``Resize(int)``); a (height, width) pair resizes exactly.
        crop: side of the square centre crop, or None for no crop. Must not exceed the resized
            image.
    """

    resize: int | tuple[int, int] = 256
    crop: int | None = 224

    def __post_init__(self) -> None:
        sizes = (self.resize,) if isinstance(self.resize, int) else tuple(self.resize)
        if len(sizes) not in (1, 2) or any(int(s) < 1 for s in sizes):
            raise ValueError(f"resize must be a positive int or (h, w) pair, got {self.resize!r}")
        if self.crop is not None and self.crop < 1:
            raise ValueError(f"crop must be a positive int or None, got {self.crop!r}")

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) after the resize step for an input of (height, width)."""
        if isinstance(self.resize, int):
            short = min(height, width)
            return (
                max(1, round(height * self.resize / short)),
                max(1, round(width * self.resize / short)),
            )
        return int(self.resize[0]), int(self.resize[1])

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the transformed image for an input of (height, width)."""
        h, w = self.resized_shape(height, width)
        if self.crop is None:
            return h, w
        if self.crop > min(h, w):
            raise ValueError(f"crop {self.crop} exceeds the resized image {h}x{w}")
        return self.crop, self.crop

    def _crop(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.crop is None:
            return tensor
        h, w = tensor.shape[-2:]
        self.output_shape(h, w)  # validates
        top = round((h - self.crop) / 2.0)
        left = round((w - self.crop) / 2.0)
        return tensor[..., top : top + self.crop, left : left + self.crop]

    def image(self, image: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] RGB -> float32 [3, h, w], normalised with ImageNet statistics."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 [H, W, 3] RGB image, got {image.dtype} {image.shape}"
            )
        tensor = (
            torch.tensor(image).permute(2, 0, 1).float() / 255.0
        )  # copies: inputs may be read-only
        size = self.resized_shape(*image.shape[:2])
        tensor = F.interpolate(
            tensor[None], size=size, mode="bilinear", align_corners=False, antialias=True
        )[0]
        tensor = self._crop(tensor)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (tensor.clamp(0.0, 1.0) - mean) / std

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """bool [H, W] -> bool [h, w] with the image's geometry (nearest interpolation)."""
        if mask.ndim != 2:
            raise ValueError(f"expected a [H, W] mask, got shape {mask.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))[None, None].float()
        size = self.resized_shape(*mask.shape)
        tensor = F.interpolate(tensor, size=size, mode="nearest")[0, 0]
        return self._crop(tensor).numpy() > 0.5

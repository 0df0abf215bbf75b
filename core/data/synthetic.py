"""Deterministic synthetic industrial-inspection dataset (numpy + PIL only).

Six categories, each with its own normal appearance, so federated sites holding different
categories really hold different data:

    stripes  texture: diagonal navy / sand stripes
    mesh     texture: tilted grey wire grid
    fabric   texture: fine green weave with smooth low-frequency shading
    felt     texture: plain beige felt, only faint low-frequency shading (compact features:
             the smooth category beside busy ones, benchmarks/site_allocation.py)
    washer   object:  brass ring on a dark background
    screw    object:  threaded steel bar with a head on a light background

Normal images vary a little (shift, rotation / phase, brightness, sensor noise). Defect images
carry local defects (each well under 5 % of the image) with exact ground truth:

    scratch   a thin straight line of a contrasting colour (on the part, for objects)
    spot      an irregular blob of another colour (stain, corrosion, glue)
    missing   a piece cut out: the backing (textures) or the background (objects) shows
    combined  a scratch and a spot (two ground-truth channels in the AutoVI layout)

The image is built as: geometry -> defect paint (changes only its mask) -> global brightness ->
additive noise. Nuisance, noise and defect draws come from separate child generators, so the
same generator state rendered with and without a defect gives images that differ exactly on the
defect's mask (the tests check this).

Appearance and nuisance ranges are tuned so that a PatchCore with a *randomly initialised*
ResNet-18 (layer2 + layer3 features, full memory bank) ranks every defect image above every good
one at 64 and 128 px: 2-D periodic patterns are tilted and have periods that are not a multiple
of the CNN stride, parts keep their own texture phase, and defects have a minimum area.

Every image is drawn from its own generator seeded by (seed, category, split, index), so changing
``num_test`` does not change the train images, and the same seed gives byte-identical files.

A *variant* is a new version of the same product, as a plant gets it months later: the same
geometry, nuisance and defects, in a new finish. Both variants recolour the part's material (the
whole image for textures, the part only for objects, whose background stays) to a tint of the
same luminance: ``"anodised"`` to a blue one (a strong change: a brass washer becomes a
light-blue one on the same dark background), ``"bronze"`` to a warmer, redder one (a mild
change, like another alloy or supplier: the brass washer turns copper-coloured). A variant's
images are drawn from their own generators (its name is part of the seed), so they are new
images, not recoloured copies of the originals; they are all defect-free in train/ and carry
the usual defects in test/.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from core.data.defects import DEFECTS_CONFIG_FILENAME, DefectType, defects_config_to_json
from core.data.sample import GOOD
from core.metrics import SaturationSpec

logger = logging.getLogger(__name__)

SYNTHETIC_CATEGORIES: tuple[str, ...] = ("fabric", "felt", "mesh", "screw", "stripes", "washer")
DEFAULT_SYNTHETIC_CATEGORIES: tuple[str, ...] = ("mesh", "screw", "stripes", "washer")
#: Defect types of test images, in the order test images cycle through them.
SYNTHETIC_DEFECTS: tuple[str, ...] = ("scratch", "spot", "missing", "combined")
LAYOUTS: tuple[str, ...] = ("autovi", "mvtec")
#: Product variants ``render_synthetic_image`` can draw (see the module doc).
SYNTHETIC_VARIANTS: tuple[str, ...] = ("anodised", "bronze")


def _tint(gains: tuple[float, float, float]) -> np.ndarray:
    """Per-channel gains of the luminance, normalised so that the luminance is kept."""
    array = np.asarray(gains, np.float32)
    return array / np.float32(array @ np.asarray((0.299, 0.587, 0.114), np.float32))


_TINTS: dict[str, np.ndarray] = {"anodised": _tint((0.6, 0.85, 1.45)),
                                 "bronze": _tint((1.3, 0.9, 0.6))}

# Pixel values and saturation of the AutoVI-layout defects_config.json. Not 255 on purpose: the
# readers must honour pixel_value. "combined" images hold one scratch and one spot channel.
_AUTOVI_PIXEL_VALUE = {"scratch": 60, "spot": 120, "missing": 180}
_SPLIT_CODE = {"train": 0, "test": 1}

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class SyntheticConfig:
    """What ``generate_synthetic_dataset`` writes; validated on construction.

    categories: names from SYNTHETIC_CATEGORIES, distinct.
    num_train: normal train images per category (>= 1).
    num_test: test images per category (>= 0): the first ceil(num_test / 2) are good, the rest
        cycle through SYNTHETIC_DEFECTS.
    image_size: side of the square images in pixels, 32..1024.
    seed: non-negative int; same seed -> byte-identical files.
    layout: "mvtec" (one mask per defect image) or "autovi" (one PNG per defect channel and a
        defects_config.json per category).
    variant: None (the categories as they are) or one of SYNTHETIC_VARIANTS: every image is of
        that product variant (new images: see the module doc).
    """

    categories: tuple[str, ...] = DEFAULT_SYNTHETIC_CATEGORIES
    num_train: int = 20
    num_test: int = 12
    image_size: int = 128
    seed: int = 0
    layout: str = "mvtec"
    variant: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.categories, str):
            raise ValueError(
                f"categories must be a sequence of names, got the string {self.categories!r}"
            )
        object.__setattr__(self, "categories", tuple(self.categories))
        if not self.categories:
            raise ValueError("categories must not be empty")
        unknown = [c for c in self.categories if c not in SYNTHETIC_CATEGORIES]
        if unknown:
            raise ValueError(
                f"unknown categories {unknown}, expected some of {SYNTHETIC_CATEGORIES}"
            )
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"duplicate categories in {list(self.categories)}")
        for name, value, low in (
            ("num_train", self.num_train, 1),
            ("num_test", self.num_test, 0),
            ("seed", self.seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if (
            isinstance(self.image_size, bool)
            or not isinstance(self.image_size, int)
            or not 32 <= self.image_size <= 1024
        ):
            raise ValueError(f"image_size must be an int in 32..1024, got {self.image_size!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.variant is not None and self.variant not in SYNTHETIC_VARIANTS:
            raise ValueError(
                f"variant must be None or one of {SYNTHETIC_VARIANTS}, got {self.variant!r}"
            )

    def test_plan(self) -> list[str]:
        """Defect name of each test image, in index order ("good" first)."""
        n_defect = self.num_test // 2
        n_good = self.num_test - n_defect
        defects = [SYNTHETIC_DEFECTS[j % len(SYNTHETIC_DEFECTS)] for j in range(n_defect)]
        return [GOOD] * n_good + defects


# --------------------------------------------------------------------------------------------
# Scenes: the defect-free geometry of one image.


@dataclass(frozen=True)
class _Look:
    """Colours of a category: the defect colours are chosen far from the normal ones."""

    scratch: RGB
    spot: RGB
    hole: RGB  # what shows where material is missing (backing or background)


@dataclass(eq=False)
class _Scene:
    """A defect-free image under construction and where defects may go.

    image: float32 [S, S, 3] in 0..255. support: bool [S, S], where the part / material is.
    anchor: draws a defect centre (y, x) on the part. along: preferred scratch angle (radians)
    at a centre, or None for any angle.
    """

    image: np.ndarray
    support: np.ndarray
    look: _Look
    anchor: Callable[[np.random.Generator], tuple[float, float]]
    along: Callable[[float, float], float] | None = field(default=None)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx), float32 [S, S] each."""
    axis = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    return yy, xx


def _mix(c0: RGB, c1: RGB, t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of two colours, t in [0, 1] of shape [S, S] -> float32 [S, S, 3]."""
    a = np.asarray(c0, dtype=np.float32)
    b = np.asarray(c1, dtype=np.float32)
    return a + (b - a) * t[..., None].astype(np.float32)


def _rotated(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u, v) in a frame rotated by ``angle`` about (cy, cx): u along the angle."""
    c, s = math.cos(angle), math.sin(angle)
    dy, dx = yy - cy, xx - cx
    return dx * c + dy * s, -dx * s + dy * c


def _texture_anchor(size: int) -> Callable[[np.random.Generator], tuple[float, float]]:
    def anchor(rng: np.random.Generator) -> tuple[float, float]:
        y, x = rng.uniform(0.2 * size, 0.8 * size, size=2)
        return float(y), float(x)

    return anchor


def _stripes(size: int, rng: np.random.Generator) -> _Scene:
    yy, xx = _grid(size)
    angle = math.radians(35.0 + rng.uniform(-1.5, 1.5))
    period = size / 9.0 * rng.uniform(0.97, 1.03)
    u, _ = _rotated(yy, xx, size / 2, size / 2, angle)
    wave = np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    t = np.clip(0.5 + 0.8 * wave, 0.0, 1.0)  # flat-topped bands with soft edges
    image = _mix((35, 55, 125), (215, 195, 150), t)
    look = _Look(scratch=(250, 250, 250), spot=(185, 70, 15), hole=(8, 8, 8))
    return _Scene(image, np.ones((size, size), bool), look, _texture_anchor(size))


def _mesh(size: int, rng: np.random.Generator) -> _Scene:
    yy, xx = _grid(size)
    # Tilted: along an image border the wire phase then varies, so the border patches of the
    # normal images cover all phases (an axis-aligned grid gives each image one border phase).
    angle = math.radians(25.0 + rng.uniform(-1.0, 1.0))
    # Not a multiple of a CNN stride (8, 16 px at 128 px): the wire phase then cycles across
    # each image, so the normal images cover all phases instead of two.
    period = size / 7.0
    u, v = _rotated(yy, xx, size / 2, size / 2, angle)
    phase_u, phase_v = rng.uniform(size=2)
    # Rounded wire profile, moderate contrast: a hard, high-contrast grid makes random CNN
    # features so phase-sensitive that normal variation drowns the defects.
    across_u = np.abs(np.cos(np.pi * (u / period + phase_u)))
    across_v = np.abs(np.cos(np.pi * (v / period + phase_v)))
    wire = np.maximum(across_u, across_v) ** 6
    image = _mix((80, 80, 85), (140, 140, 145), wire)
    look = _Look(scratch=(250, 225, 60), spot=(200, 50, 160), hole=(110, 60, 30))
    return _Scene(image, np.ones((size, size), bool), look, _texture_anchor(size))


def _smooth_field(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random field in about [-1, 1], float32 [S, S]: bicubic upsampling of cells^2 noise."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    field_img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(field_img, dtype=np.float32)


def _fabric(size: int, rng: np.random.Generator) -> _Scene:
    yy, xx = _grid(size)
    angle = math.radians(rng.uniform(-2.0, 2.0))
    period = max(4.0, size / 20.0)
    u, v = _rotated(yy, xx, size / 2, size / 2, angle)
    phase_u, phase_v = rng.uniform(0, 2 * np.pi, size=2)
    weave = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + phase_u) * np.sin(
        2 * np.pi * v / period + phase_v
    )
    image = _mix((55, 115, 65), (115, 180, 100), weave)
    shade = 1.0 + 0.07 * _smooth_field(size, 5, rng)
    image *= shade[..., None]
    look = _Look(scratch=(240, 240, 215), spot=(70, 15, 75), hole=(15, 10, 5))
    return _Scene(image, np.ones((size, size), bool), look, _texture_anchor(size))


def _felt(size: int, rng: np.random.Generator) -> _Scene:
    """Plain felt: a fine random grain of low contrast on one beige, no pattern. Its patches'
    features are much tighter than a weave's or a grid's (the compact site of issue 17), yet
    the grain is random, so a bank needs more than a handful of its rows to cover it. Defects
    are of moderate contrast: a slightly too coarse bank makes good felt score like a defect."""
    grain = _smooth_field(size, max(4, size // 3), rng)
    shade = 1.0 + 0.03 * _smooth_field(size, 3, rng)
    image = _mix((178, 160, 132), (212, 194, 166), 0.5 + 0.5 * grain) * shade[..., None]
    look = _Look(scratch=(228, 212, 186), spot=(160, 138, 110), hole=(150, 128, 100))
    return _Scene(image, np.ones((size, size), bool), look, _texture_anchor(size))


def _washer(size: int, rng: np.random.Generator) -> _Scene:
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.uniform(-0.025, 0.025, size=2) * size
    r_out = 0.36 * size * rng.uniform(0.99, 1.01)
    r_in = 0.20 * size
    dy, dx = yy - cy, xx - cx
    r = np.sqrt(dy * dy + dx * dx)
    ring = (r >= r_in) & (r <= r_out)
    # Brass with a bevel (brighter mid-ring) and light from the top left.
    mid = (r - r_in) / (r_out - r_in)
    light = np.cos(np.arctan2(dy, dx) + math.radians(135.0 + rng.uniform(-5, 5)))
    shade = 0.8 + 0.15 * np.sin(np.pi * np.clip(mid, 0, 1)) + 0.08 * light
    brass = np.asarray((205, 165, 75), np.float32) * shade[..., None]
    background = np.asarray((30, 32, 40), np.float32)
    image = np.where(ring[..., None], brass, background).astype(np.float32)
    look = _Look(scratch=(60, 40, 15), spot=(40, 120, 165), hole=(30, 32, 40))
    r_mid = (r_in + r_out) / 2

    def anchor(g: np.random.Generator) -> tuple[float, float]:
        phi = g.uniform(0, 2 * np.pi)
        rad = r_mid + g.uniform(-0.15, 0.15) * (r_out - r_in)
        return float(cy + rad * math.sin(phi)), float(cx + rad * math.cos(phi))

    def along(y: float, x: float) -> float:
        # Tangential, so a chord stays on the ring.
        return math.atan2(y - cy, x - cx) + math.pi / 2

    return _Scene(image, ring, look, anchor, along)


def _screw(size: int, rng: np.random.Generator) -> _Scene:
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.uniform(-0.025, 0.025, size=2) * size
    angle = math.radians(20.0 + rng.uniform(-1.5, 1.5))
    u, v = _rotated(yy, xx, cy, cx, angle)
    length, width = 0.70 * size, 0.15 * size
    shaft = (np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)
    head = (u >= length / 2 - 0.12 * size) & (u <= length / 2) & (np.abs(v) <= 0.26 * size / 2)
    # The thread is part of the screw: its phase moves with the part, it is not a nuisance.
    thread = 0.5 + 0.5 * np.sin(2 * np.pi * u / (0.05 * size))
    roundness = 1.0 - 0.35 * (v / (width / 2)) ** 2  # cylinder shading across the shaft
    steel = _mix((70, 70, 80), (130, 130, 142), thread) * np.clip(roundness, 0.5, 1.0)[..., None]
    head_col = np.asarray((110, 110, 122), np.float32)
    part = shaft | head
    image = np.full((size, size, 3), (225, 225, 220), np.float32)
    image = np.where(shaft[..., None], steel, image)
    image = np.where(head[..., None], head_col, image).astype(np.float32)
    look = _Look(scratch=(240, 240, 245), spot=(250, 170, 30), hole=(225, 225, 220))
    c, s = math.cos(angle), math.sin(angle)

    def anchor(g: np.random.Generator) -> tuple[float, float]:
        t = g.uniform(-0.4, 0.3) * length  # on the shaft, short of the head
        w = g.uniform(-0.15, 0.15) * width
        return float(cy + t * s + w * c), float(cx + t * c - w * s)

    def along(_y: float, _x: float) -> float:
        return angle

    return _Scene(image, part, look, anchor, along)


_RENDERERS: dict[str, Callable[[int, np.random.Generator], _Scene]] = {
    "fabric": _fabric,
    "felt": _felt,
    "mesh": _mesh,
    "screw": _screw,
    "stripes": _stripes,
    "washer": _washer,
}


# --------------------------------------------------------------------------------------------
# Defects: each paints the scene in place and returns its mask, bool [S, S].


def _blob(size: int, cy: float, cx: float, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Irregular star-convex blob: radius modulated by two angular harmonics."""
    yy, xx = _grid(size)
    dy, dx = yy - cy, xx - cx
    phi = np.arctan2(dy, dx)
    a1, a2 = rng.uniform(0, 2 * np.pi, size=2)
    rr = radius * (1 + 0.2 * np.sin(3 * phi + a1) + 0.1 * np.sin(5 * phi + a2))
    return dy * dy + dx * dx <= rr * rr


def _segment(
    size: int, cy: float, cx: float, angle: float, length: float, half_width: float
) -> np.ndarray:
    """Pixels within ``half_width`` of a segment centred at (cy, cx)."""
    yy, xx = _grid(size)
    u, v = _rotated(yy, xx, cy, cx, angle)
    # Distance to the segment: beyond its ends, distance to the end point.
    du = np.maximum(np.abs(u) - length / 2, 0.0)
    return du * du + v * v <= half_width * half_width


def _place(
    scene: _Scene,
    rng: np.random.Generator,
    shape: Callable[[float, float, np.random.Generator], np.ndarray],
) -> np.ndarray:
    """Draw a shape at anchors until its part of the support is big enough (bounded retries)."""
    size = scene.image.shape[0]
    min_area = 0.004 * size * size  # ~65 px at 128 px: visible to a stride-8 feature map
    mask = np.zeros((size, size), bool)
    for _ in range(20):
        cy, cx = scene.anchor(rng)
        mask = shape(cy, cx, rng) & scene.support
        if mask.sum() >= min_area:
            return mask
    logger.debug("defect placement kept a small mask of %d px", int(mask.sum()))
    return mask


def _scratch(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.image.shape[0]

    def shape(cy: float, cx: float, g: np.random.Generator) -> np.ndarray:
        if scene.along is None:
            angle = g.uniform(0, np.pi)
        else:
            angle = scene.along(cy, cx) + math.radians(g.uniform(-12, 12))
        length = g.uniform(0.22, 0.32) * size
        return _segment(size, cy, cx, angle, length, max(1.0, size / 100))

    mask = _place(scene, rng, shape)
    scene.image[mask] = scene.look.scratch
    return mask


def _spot(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.image.shape[0]

    def shape(cy: float, cx: float, g: np.random.Generator) -> np.ndarray:
        # A floor in pixels keeps small images' spots visible to a stride-8 feature map.
        return _blob(size, cy, cx, max(4.5, g.uniform(0.05, 0.07) * size), g)

    mask = _place(scene, rng, shape)
    # Keep a trace of the surface under the stain so it is not a flat sticker.
    spot = np.asarray(scene.look.spot, np.float32)
    scene.image[mask] = 0.15 * scene.image[mask] + 0.85 * spot
    return mask


def _missing(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.image.shape[0]

    def shape(cy: float, cx: float, g: np.random.Generator) -> np.ndarray:
        return _blob(size, cy, cx, g.uniform(0.07, 0.09) * size, g)

    mask = _place(scene, rng, shape)
    scene.image[mask] = scene.look.hole
    return mask


_PAINTERS: dict[str, tuple[Callable[[_Scene, np.random.Generator], np.ndarray], ...]] = {
    "scratch": (_scratch,),
    "spot": (_spot,),
    "missing": (_missing,),
    "combined": (_scratch, _spot),
}

#: Defect type of each channel a painter writes, for the AutoVI pixel values.
_CHANNEL_TYPES: dict[str, tuple[str, ...]] = {
    "scratch": ("scratch",),
    "spot": ("spot",),
    "missing": ("missing",),
    "combined": ("scratch", "spot"),
}


def _refinish(scene: _Scene, variant: str) -> None:
    """A variant's finish: the part's material at the same luminance, in the variant's tint."""
    luminance = scene.image @ np.asarray((0.299, 0.587, 0.114), np.float32)
    tinted = np.clip(luminance[..., None] * _TINTS[variant], 0.0, 255.0)
    scene.image = np.where(scene.support[..., None], tinted, scene.image).astype(np.float32)


def render_synthetic_image(
    category: str,
    image_size: int,
    rng: np.random.Generator,
    defect: str = GOOD,
    variant: str | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render one image of ``category``; the generator behind ``generate_synthetic_dataset``.

    category: one of SYNTHETIC_CATEGORIES. defect: "good" or one of SYNTHETIC_DEFECTS.
    variant: None or one of SYNTHETIC_VARIANTS: the part in that finish (before any defect is
        painted, so defects keep their colours).
    rng: consumed here; three child generators (nuisance, noise, defect) are spawned from it,
        so the same state with and without a defect renders the same scene and noise.
    Returns (image uint8 [S, S, 3], channels): one bool [S, S] mask per defect channel, empty
    for "good" ("combined" gives a scratch channel and a spot channel; they may overlap).
    """
    if category not in _RENDERERS:
        raise ValueError(f"unknown category {category!r}, expected one of {SYNTHETIC_CATEGORIES}")
    if defect != GOOD and defect not in _PAINTERS:
        raise ValueError(
            f"unknown defect {defect!r}, expected 'good' or one of {SYNTHETIC_DEFECTS}"
        )
    if variant is not None and variant not in _TINTS:
        raise ValueError(f"unknown variant {variant!r}, expected one of {SYNTHETIC_VARIANTS}")
    nuisance_rng, noise_rng, defect_rng = rng.spawn(3)
    scene = _RENDERERS[category](image_size, nuisance_rng)
    if variant is not None:
        _refinish(scene, variant)
    channels = [paint(scene, defect_rng) for paint in _PAINTERS.get(defect, ())]
    brightness = nuisance_rng.uniform(0.94, 1.06)
    noise = noise_rng.normal(0.0, 3.0, size=scene.image.shape).astype(np.float32)
    image = np.clip(np.rint(scene.image * brightness + noise), 0, 255).astype(np.uint8)
    return image, channels


def synthetic_image_rng(
    seed: int, category: str, split: str, index: int, variant: str | None = None
) -> np.random.Generator:
    """The generator that renders image ``index`` of ``split`` ("train" or "test") of ``category``
    (of product ``variant``, whose images are drawn apart from the original's).

    ``index`` counts train images, or test images in ``SyntheticConfig.test_plan()`` order (good
    ones first, then defects), not the file number within a defect folder.
    """
    # crc32, not hash(): str hashes are salted per process and would break determinism.
    key = [seed, zlib.crc32(category.encode("utf-8")), _SPLIT_CODE[split], index]
    if variant is not None:
        key.append(zlib.crc32(variant.encode("utf-8")))
    return np.random.default_rng(key)


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # PIL writes no timestamp chunk, so equal arrays give byte-identical files.
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def synthetic_defect_types(image_size: int) -> tuple[DefectType, ...]:
    """The defects_config.json entries written by the AutoVI layout for ``image_size``."""
    return (
        DefectType("scratch", _AUTOVI_PIXEL_VALUE["scratch"], SaturationSpec(1.0, relative=True)),
        DefectType("spot", _AUTOVI_PIXEL_VALUE["spot"], SaturationSpec(0.5, relative=True)),
        # Absolute threshold (pixels) so both kinds of saturation are exercised.
        DefectType(
            "missing",
            _AUTOVI_PIXEL_VALUE["missing"],
            SaturationSpec(float(max(1, round(0.004 * image_size * image_size))), relative=False),
        ),
    )


def generate_synthetic_dataset(
    root: str | Path,
    categories: Sequence[str] = DEFAULT_SYNTHETIC_CATEGORIES,
    num_train: int = 20,
    num_test: int = 12,
    image_size: int = 128,
    seed: int = 0,
    layout: str = "mvtec",
    variant: str | None = None,
) -> Path:
    """Write a synthetic dataset under ``root`` (created; must not exist or be empty).

    See SyntheticConfig for the arguments. Layout "mvtec"::

        <root>/<category>/train/good/000.png
        <root>/<category>/test/<good|scratch|spot|missing|combined>/000.png
        <root>/<category>/ground_truth/<defect>/000_mask.png          (0 / 255)

    Layout "autovi": the same images, with ground_truth/<defect>/000/0000.png, 0001.png, ...
    (one channel each, defect pixels = the type's pixel value) and
    <root>/<category>/defects_config.json. Returns ``root`` as a Path.
    Raises FileExistsError if ``root`` holds anything (it never overwrites files).
    ``variant``: the images are of that product variant (SYNTHETIC_VARIANTS; module doc).
    """
    config = SyntheticConfig(
        categories=tuple(categories),
        num_train=num_train,
        num_test=num_test,
        image_size=image_size,
        seed=seed,
        layout=layout,
        variant=variant,
    )
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"synthetic dataset root {root} exists and is not an empty folder")
    root.mkdir(parents=True, exist_ok=True)
    size = config.image_size
    types = synthetic_defect_types(size)
    pixel_value = {t.name: t.pixel_value for t in types}
    for category in config.categories:
        cat_dir = root / category
        for i in range(config.num_train):
            image, _ = render_synthetic_image(
                category, size, synthetic_image_rng(config.seed, category, "train", i, variant),
                variant=variant,
            )
            _save_png(image, cat_dir / "train" / GOOD / f"{i:03d}.png")
        counters: dict[str, int] = {}
        for j, defect in enumerate(config.test_plan()):
            image, channels = render_synthetic_image(
                category, size, synthetic_image_rng(config.seed, category, "test", j, variant),
                defect, variant=variant,
            )
            k = counters.get(defect, 0)
            counters[defect] = k + 1
            stem = f"{k:03d}"
            _save_png(image, cat_dir / "test" / defect / f"{stem}.png")
            if defect == GOOD:
                continue
            gt_dir = cat_dir / "ground_truth" / defect
            if config.layout == "mvtec":
                union = np.logical_or.reduce(channels)
                _save_png(union.astype(np.uint8) * np.uint8(255), gt_dir / f"{stem}_mask.png")
            else:
                for c, (channel, kind) in enumerate(
                    zip(channels, _CHANNEL_TYPES[defect], strict=True)
                ):
                    value = np.uint8(pixel_value[kind])
                    _save_png(channel.astype(np.uint8) * value, gt_dir / stem / f"{c:04d}.png")
        if config.layout == "autovi":
            (cat_dir / DEFECTS_CONFIG_FILENAME).write_text(
                defects_config_to_json(types), encoding="utf-8"
            )
    logger.info(
        "synthetic %s dataset in %s: %d categories, %d train + %d test images each, %d px",
        config.layout,
        root,
        len(config.categories),
        config.num_train,
        config.num_test,
        size,
    )
    return root


def paint_defect(
    image: np.ndarray, defect: str, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Paint one of SYNTHETIC_DEFECTS on any RGB image (e.g. a photograph crop).

    The same painters as the generated categories; the whole image counts as material, the
    defect centres are drawn in its middle 60 %, and the defect colours are chosen far from the
    image's mean colour (scratch: its complement; spot: a saturated colour on the other side of
    the colour cube; hole: black on bright images, white on dark ones).

    Args:
        image: uint8 [S, S, 3] (square: the painters' geometry assumes it).
        defect: one of SYNTHETIC_DEFECTS.
        rng: consumed here.

    Returns:
        (uint8 [S, S, 3] image with the defect, one bool [S, S] mask per defect channel).
    """
    if defect not in _PAINTERS:
        raise ValueError(f"unknown defect {defect!r}, expected one of {SYNTHETIC_DEFECTS}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be a square RGB array [S, S, 3], got shape {image.shape}")
    size = image.shape[0]
    mean = image.reshape(-1, 3).astype(np.float32).mean(axis=0)
    complement = tuple(float(255.0 - c) for c in mean)
    spot = tuple(230.0 if c < 128 else 25.0 for c in mean[[1, 2, 0]])
    hole = (5.0, 5.0, 5.0) if float(mean.mean()) >= 100 else (250.0, 250.0, 250.0)
    look = _Look(scratch=complement, spot=spot, hole=hole)  # type: ignore[arg-type]
    scene = _Scene(
        image.astype(np.float32), np.ones((size, size), bool), look, _texture_anchor(size)
    )
    channels = [paint(scene, rng) for paint in _PAINTERS[defect]]
    return np.clip(np.rint(scene.image), 0, 255).astype(np.uint8), channels

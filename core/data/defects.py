"""Per-category defect types of the AutoVI / MVTec LOCO layout (``defects_config.json``).

The file is a JSON list with one entry per defect type::

    [{"defect_name": "missing", "pixel_value": 255,
      "saturation_threshold": 1.0, "relative_saturation": true}, ...]

(format of the MVTec LOCO / AutoVI evaluation code). ``pixel_value`` is the grey value that marks
this defect type in a ground-truth channel PNG, which is how a channel is matched to its defect type
(a folder such as "multiple" holds channels of several types). ``saturation_threshold`` is the
defect area (fraction of the channel if ``relative_saturation``, else pixels) whose overlap
gives full sPRO credit. A dict keyed by defect name, with the other three fields as values, is
accepted too.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.data.errors import DatasetError
from core.metrics import SaturationSpec

logger = logging.getLogger(__name__)

DEFECTS_CONFIG_FILENAME = "defects_config.json"

_FIELDS = ("defect_name", "pixel_value", "saturation_threshold", "relative_saturation")


@dataclass(frozen=True)
class DefectType:
    """One defect type of a category.

    name: defect name, e.g. "missing".
    pixel_value: grey value 1..255 that marks this defect in a ground-truth channel PNG.
    saturation: sPRO saturation of a channel of this type (see core.metrics.SaturationSpec).
    """

    name: str
    pixel_value: int
    saturation: SaturationSpec

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"DefectType.name must be a non-empty str, got {self.name!r}")
        if (
            isinstance(self.pixel_value, bool)
            or not isinstance(self.pixel_value, int)
            or not 1 <= self.pixel_value <= 255
        ):
            raise ValueError(
                f"DefectType.pixel_value of {self.name!r} must be an int in 1..255, "
                f"got {self.pixel_value!r}"
            )
        if not isinstance(self.saturation, SaturationSpec):
            raise TypeError(
                f"DefectType.saturation of {self.name!r} must be a SaturationSpec, "
                f"got {type(self.saturation).__name__}"
            )


def _entry_from_json(entry: Any, where: str) -> DefectType:
    """Validate one JSON entry (a dict with the four fields) into a DefectType."""
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [f for f in _FIELDS if f not in entry]
    if missing:
        raise DatasetError(f"{where}: missing field(s) {missing}")
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        # An unknown key is most likely a typo of a real one; do not silently ignore it.
        raise DatasetError(f"{where}: unknown field(s) {unknown}, expected {list(_FIELDS)}")
    name = entry["defect_name"]
    pixel_value = entry["pixel_value"]
    threshold = entry["saturation_threshold"]
    relative = entry["relative_saturation"]
    if not isinstance(name, str) or not name:
        raise DatasetError(f"{where}: 'defect_name' must be a non-empty string, got {name!r}")
    if isinstance(pixel_value, bool) or not isinstance(pixel_value, int):
        raise DatasetError(f"{where}: 'pixel_value' must be an integer, got {pixel_value!r}")
    if not isinstance(relative, bool):
        raise DatasetError(f"{where}: 'relative_saturation' must be true/false, got {relative!r}")
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not math.isfinite(threshold)
    ):
        raise DatasetError(
            f"{where}: 'saturation_threshold' must be a finite number, got {threshold!r}"
        )
    try:
        return DefectType(
            name=name,
            pixel_value=pixel_value,
            saturation=SaturationSpec(threshold=float(threshold), relative=relative),
        )
    except ValueError as exc:
        raise DatasetError(f"{where}: {exc}") from exc


def parse_defects_config(data: Any, source: str) -> tuple[DefectType, ...]:
    """Validate already-decoded JSON ``data`` (a list of entries or a dict keyed by defect name).

    source: names the origin (a file path) in error messages.
    Returns the defect types in file order. Names and pixel values must be unique.
    """
    entries: list[tuple[str, Any]]
    if isinstance(data, list):
        entries = [(f"{source}: entry {i}", e) for i, e in enumerate(data)]
    elif isinstance(data, dict):
        entries = []
        for key, value in data.items():
            if not isinstance(value, dict):
                raise DatasetError(
                    f"{source}: entry {key!r} must be an object, got {type(value).__name__}"
                )
            if "defect_name" in value and value["defect_name"] != key:
                raise DatasetError(
                    f"{source}: entry {key!r} has a different defect_name {value['defect_name']!r}"
                )
            entries.append((f"{source}: entry {key!r}", {"defect_name": key, **value}))
    else:
        raise DatasetError(
            f"{source}: expected a JSON list of defect entries (or an object keyed by defect "
            f"name), got {type(data).__name__}"
        )
    if not entries:
        raise DatasetError(f"{source}: no defect entries")
    types = tuple(_entry_from_json(entry, where) for where, entry in entries)
    names = [t.name for t in types]
    values = [t.pixel_value for t in types]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DatasetError(f"{source}: duplicate defect_name(s) {dup}")
    if len(set(values)) != len(values):
        dup_values = sorted({v for v in values if values.count(v) > 1})
        # The pixel value identifies a channel's defect type; duplicates make it ambiguous.
        raise DatasetError(f"{source}: duplicate pixel_value(s) {dup_values}")
    return types


def load_defects_config(path: str | Path) -> tuple[DefectType, ...]:
    """Read and validate a ``defects_config.json`` file; errors name ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DatasetError(f"defects config not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read defects config {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"malformed JSON in defects config {path}: {exc}") from exc
    types = parse_defects_config(data, str(path))
    logger.debug("read %d defect types from %s", len(types), path)
    return types


def defects_config_to_json(types: Iterable[DefectType]) -> str:
    """Serialise defect types in the list format that ``load_defects_config`` reads."""
    entries = [
        {
            "defect_name": t.name,
            "pixel_value": t.pixel_value,
            # The reference evaluation code expects an int for absolute thresholds (pixels).
            "saturation_threshold": (
                int(t.saturation.threshold)
                if not t.saturation.relative and t.saturation.threshold.is_integer()
                else t.saturation.threshold
            ),
            "relative_saturation": t.saturation.relative,
        }
        for t in types
    ]
    return json.dumps(entries, indent=2) + "\n"


def saturation_by_name(types: Iterable[DefectType]) -> dict[str, SaturationSpec]:
    """Map defect name -> saturation spec."""
    return {t.name: t.saturation for t in types}


def by_pixel_value(types: Iterable[DefectType]) -> Mapping[int, DefectType]:
    """Map pixel value -> defect type (pixel values are unique within a category)."""
    return {t.pixel_value: t for t in types}

"""Typed settings from environment variables and commented TOML examples, for both CLIs.

``fedserver`` and ``fedclient`` describe their settings as frozen dataclasses whose fields carry
a ``help`` string in their metadata. This module is the one implementation of what both need
on top of that:

* :func:`env_overrides` reads ``PREFIX_<FIELD>`` variables (``FEDSERVER_QUORUM=2``,
  ``FEDCLIENT_SITE_ID=plant-1``) and parses each into its field's type, so the precedence
  flag > environment > TOML > default can be applied by the caller. A variable with the prefix
  that names no setting is an error (a typo would otherwise be ignored silently).
* :func:`toml_example` writes a commented TOML file with every setting, its default and what
  it does, generated from the same fields, so the example cannot drift from the code.

No gRPC, no CLI: plain data in, plain data out. Every error is a :class:`SettingsError` that
names the variable or field.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

logger = logging.getLogger(__name__)

__all__ = ["SettingsError", "env_overrides", "field_help", "toml_example", "toml_value"]

_TRUE: Final[frozenset[str]] = frozenset({"1", "true", "yes", "on"})
_FALSE: Final[frozenset[str]] = frozenset({"0", "false", "no", "off"})


class SettingsError(ValueError):
    """An environment variable or setting cannot be parsed (the message names it)."""


def field_help(field: dataclasses.Field[Any]) -> str:
    """The ``help`` metadata of a settings field; SettingsError if it has none."""
    text = field.metadata.get("help")
    if not isinstance(text, str) or not text.strip():
        raise SettingsError(f"setting {field.name!r} has no help text")
    return text


def _settings_fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    """(field, resolved type) of every documented field (fields without help are internal)."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if "help" in f.metadata]


def _parse(name: str, raw: str, kind: Any) -> object:
    """Parse one environment string into ``kind`` (str, int, float, bool, Path, a Literal,
    tuple[str, ...] as a comma-separated list, or ``X | None`` where "" means None)."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if raw.strip() == "":
            return None
        if len(inner) != 1:
            raise SettingsError(f"{name}: cannot be set from the environment")
        return _parse(name, raw, inner[0])
    if origin is typing.Literal:
        if raw not in args:
            raise SettingsError(f"{name} must be one of {list(args)}, got {raw!r}")
        return raw
    if origin in (tuple, list) and args and args[0] is str:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise SettingsError(f"{name} must be true or false (1/0, yes/no), got {raw!r}")
    if kind is int:
        try:
            return int(raw.strip().replace("_", ""))
        except ValueError:
            raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if kind is float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise SettingsError(f"{name} must be finite, got {raw!r}")
        return value
    if kind is Path:
        if not raw.strip():
            raise SettingsError(f"{name} must be a path, got an empty string")
        return Path(raw)
    if kind is str:
        return raw
    raise SettingsError(f"{name}: cannot be set from the environment (set it in the TOML file)")


def env_overrides(
    prefix: str, cls: type, environ: Mapping[str, str], *, reserved: Sequence[str] = ()
) -> dict[str, object]:
    """Settings of dataclass ``cls`` found in ``environ`` as ``{prefix}_{FIELD}``, parsed.

    Args:
        prefix: e.g. "FEDSERVER"; variables are ``FEDSERVER_BIND``, ``FEDSERVER_QUORUM``, ...
        cls: the settings dataclass; only fields with ``help`` metadata are settable.
        environ: usually ``os.environ``.
        reserved: other variable names with the prefix that the caller reads itself
            (``FEDSERVER_CONFIG``); they are neither parsed nor refused.

    Returns: {field name: typed value} for each variable that is set.
    Raises: SettingsError for an unknown ``{prefix}_*`` variable or an unparsable value.
    """
    fields = {f.name: kind for f, kind in _settings_fields(cls)}
    start = prefix + "_"
    values: dict[str, object] = {}
    for variable in sorted(environ):
        if not variable.startswith(start) or variable in reserved:
            continue
        key = variable[len(start):].lower()
        if key not in fields:
            raise SettingsError(
                f"environment variable {variable} names no setting; known: "
                f"{', '.join(start + k.upper() for k in sorted(fields))}"
            )
        values[key] = _parse(variable, environ[variable], fields[key])
    if values:
        logger.debug("settings from the environment: %s", sorted(values))
    return values


def toml_value(value: object) -> str:
    """A Python value as a TOML literal (str, Path, bool, int, float, sequences of these)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise SettingsError(f"no TOML literal for {value!r}")


def toml_example(
    cls: type,
    values: Mapping[str, object],
    *,
    header: str,
    table: str | None = None,
    examples: Mapping[str, str] | None = None,
) -> str:
    """A commented TOML example of every documented field of ``cls``.

    Each setting gets its help text and its default as comments, then ``key = value`` with
    ``values[key]`` when given, else the field's default. A field whose value is None (no TOML
    literal) is written commented out, with ``examples[key]`` (a TOML literal) as the example.
    """
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    if table:
        lines.append(f"[{table}]")
    examples = examples or {}
    for field, _ in _settings_fields(cls):
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        lines.append("")
        lines.extend(f"# {line}" for line in field_help(field).splitlines())
        shown = "(required)" if default is dataclasses.MISSING else (
            "(none)" if default is None or default == () else toml_value(default)
        )
        lines.append(f"# default: {shown}")
        value = values.get(field.name, default)
        if value is None or value is dataclasses.MISSING:
            if field.name not in examples:
                raise SettingsError(f"setting {field.name!r} needs an example value")
            lines.append(f"# {field.name} = {examples[field.name]}")
        else:
            lines.append(f"{field.name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"

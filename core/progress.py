"""Progress bars for the long steps: feature extraction, coreset selection, scoring.

A WRN-50 fit on a CPU spends minutes in each of these; a bar says that work is happening and
how long it will take. Bars go to stderr and are shown only where someone watches: by default
only when stderr is a terminal (so logs, CI and tests stay clean). ``set_progress(False)`` (the
CLIs' ``--no-progress``) or the environment variable ``FEDPATCHCORE_PROGRESS=0`` turns them
off everywhere; ``set_progress(True)`` / ``FEDPATCHCORE_PROGRESS=1`` forces them on.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm

logger = logging.getLogger(__name__)

__all__ = ["progress_bar", "progress_enabled", "set_progress"]

_ENV = "FEDPATCHCORE_PROGRESS"
_setting: bool | None = None


def set_progress(enabled: bool | None) -> None:
    """Show bars (True), hide them (False) or show them only on a terminal (None, default)."""
    global _setting
    _setting = enabled


def progress_enabled() -> bool:
    """Whether bars are shown now: set_progress, else $FEDPATCHCORE_PROGRESS, else a tty."""
    if _setting is not None:
        return _setting
    env = os.environ.get(_ENV)
    if env is not None:
        if env not in ("0", "1"):
            raise ValueError(f"{_ENV} must be 0 or 1, got {env!r}")
        return env == "1"
    return sys.stderr.isatty()


def progress_bar(total: int, desc: str, unit: str) -> tqdm:  # type: ignore[type-arg]
    """A tqdm bar on stderr (a no-op object when bars are off); use as a context manager."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not progress_enabled(),
        leave=False,
        dynamic_ncols=True,
        file=sys.stderr,
    )

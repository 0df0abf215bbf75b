"""Exceptions raised by the dataset readers, the synthetic generator and the partitioners."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset on disk (or a description of one) is missing, malformed or inconsistent.

    Subclasses ValueError because it is always bad input, never a bug in the caller's logic.
    The message names the offending file or folder so that a site operator can fix it without
    reading code.
    """

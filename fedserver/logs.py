"""Logging set-up of the fedserver process: text lines or one JSON object per line.

``--log-format json`` is for log collectors (Loki, Elasticsearch, CloudWatch): each record is
one line ``{"time": ISO-8601 UTC, "level", "logger", "message"}`` (plus ``"exception"`` with
the traceback when there is one). Bearer tokens never reach the log: the server never logs a
token, and the formatter also masks anything of the form ``Bearer <token>`` in case a library
message carries request metadata.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from typing import Final, Literal

__all__ = ["JsonFormatter", "configure_logging"]

TEXT_FORMAT: Final[str] = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_BEARER: Final[re.Pattern[str]] = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")


def _mask(text: str) -> str:
    return _BEARER.sub(r"\1***", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (json.dumps escapes newlines)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": _mask(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = _mask(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class _MaskingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _mask(super().format(record))


def configure_logging(level: str, log_format: Literal["text", "json"] | str) -> None:
    """Root handler on stderr in the given format (called once, from the CLI's main)."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log_format must be 'text' or 'json', got {log_format!r}")
    handler = logging.StreamHandler()
    formatter = JsonFormatter() if log_format == "json" else _MaskingFormatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler], force=True)

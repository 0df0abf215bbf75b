"""Self-contained HTML pages for the reports a site and the server write.

One small page builder for both reports (``fedclient.report`` per site, ``fedserver.report``
per round): escaped tables, sections, images embedded as ``data:image/png;base64`` URIs, inline
CSS. A report is one file that opens anywhere (no external file, script, font or network
request), so it can be mailed or archived as it is. Numbers are written with a fixed number of
decimals (``fmt``) so that a reader (or a test) can compare them with the JSON the same run
wrote.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "fmt", "image_tag", "json_safe", "page", "png_data_uri", "section", "table", "write_atomic",
]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;
max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;
border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}
.sub{color:#666;font-size:.9em}.bad{color:#b00020;font-weight:600}
figure{display:inline-block;margin:.4em;vertical-align:top;text-align:center}
figcaption{font-size:.8em;color:#444;max-width:260px;word-break:break-all}
img.plot{max-width:480px}img.thumb{width:240px;image-rendering:pixelated}
"""


def fmt(value: object, digits: int = 4) -> str:
    """A table cell's text: floats with ``digits`` decimals, None / non-finite as "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        return f"{float(value):.{digits}f}" if math.isfinite(value) else "n/a"
    return str(value)


def json_safe(value: object) -> object:
    """``value`` with inf/NaN as None and numpy scalars as Python numbers: JSON has no
    inf/NaN tokens (the key says what the value would have been)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def png_data_uri(image: np.ndarray | bytes) -> str:
    """``data:image/png;base64,...`` of a uint8 [H, W] / [H, W, 3] array or of PNG bytes."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(
                f"an embedded image must be uint8 [H, W] or [H, W, 3], got {image.dtype} "
                f"{image.shape}"
            )
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", optimize=False)
        data = buffer.getvalue()
    else:
        data = image
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("png_data_uri: the bytes are not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_tag(image: np.ndarray | bytes, alt: str, *, css_class: str = "thumb",
              caption: str | None = None) -> str:
    """An embedded ``<img>`` (in a ``<figure>`` with ``caption`` when given)."""
    tag = (f'<img class="{css_class}" alt="{html.escape(alt)}" '
           f'src="{png_data_uri(image)}">')
    if caption is None:
        return tag
    return f"<figure>{tag}<figcaption>{html.escape(caption)}</figcaption></figure>"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, table_id: str = "",
          digits: int = 4) -> str:
    """An HTML table; cells go through :func:`fmt` and are escaped. Numbers align right."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for value in row:
            numeric = isinstance(value, int | float | np.number) and not isinstance(value, bool)
            cls = ' class="num"' if numeric else ""
            cells.append(f"<td{cls}>{html.escape(fmt(value, digits))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{html.escape(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def section(title: str, *parts: str, note: str | None = None) -> str:
    """``<h2>title</h2>`` then the parts (already HTML); ``note`` is escaped text under it."""
    text = f'<p class="sub">{html.escape(note)}</p>' if note else ""
    return f"<section><h2>{html.escape(title)}</h2>{text}{''.join(parts)}</section>"


def page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    """A complete HTML document (UTF-8, inline CSS, nothing fetched)."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class=\"sub\">{html.escape(subtitle)}</p>"
        + "".join(sections)
        + "</body></html>\n"
    )


def write_atomic(path: Path, text: str, *, private: bool = False) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader (a browser
    refreshing the page, another thread rewriting it) never sees half a file.

    private: owner-only (file 0600, a created folder 0700), for files inside a server's state
        directory; otherwise the file is 0644, a report for people to read.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700 if private else 0o777, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o600 if private else 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.debug("wrote %s (%d bytes)", path, len(text))
    return path

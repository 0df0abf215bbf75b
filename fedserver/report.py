"""The round report fedserver writes when a round closes: ``<state_dir>/reports/round-N.json``
and ``round-N.html`` (the same facts, one self-contained page for people).

What it holds (built by :meth:`fedserver.federation.Federation.round_report`):

* the round's outcome: state (ready / failed and why), expected, included and cut-off sites,
  quorum; the bank version and rows; the coverage certificate ``max_i r_i + r_S`` with its parts
  (each site's r_i, the server's r_S including the codec's error);
* selection: seconds from the last upload to the stored bank, on which device, which strategy;
* per site: rows and r_i of its summary, chunks committed and resent, messages and bytes
  received (serialized UploadFeaturesRequest messages, rejected ones included), rejections
  with their reasons, bytes sent back in bank downloads of this round's bank (serialized
  DownloadBankResponse messages), and the times join -> upload complete -> bank ready.

The report is written when the round closes (ready or failed) and rewritten as sites download
its bank, so the bytes-down column fills in as downloads finish. Times are unix seconds from
this server's clock; a round that was partly collected before a restart says so (its joins
before the restart are not known: the journal keeps what a replay needs, not timings).
"""

from __future__ import annotations

import html
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.htmlreport import json_safe, page, section, table, write_atomic

logger = logging.getLogger(__name__)

__all__ = ["REPORT_DIR", "render_round_report", "write_round_report"]

REPORT_DIR = "reports"


def _clock(value: object) -> str | None:
    if not isinstance(value, int | float):
        return None
    return time.strftime("%H:%M:%S", time.gmtime(value)) + f".{int(value % 1 * 1000):03d}"


def _seconds(later: object, earlier: object) -> float | None:
    if isinstance(later, int | float) and isinstance(earlier, int | float):
        return float(later) - float(earlier)
    return None


def render_round_report(report: Mapping[str, Any]) -> str:
    """The HTML page of a round report dict (the JSON file's content)."""
    number = report["round"]
    certificate = report.get("certificate") or {}
    selection = report.get("selection") or {}
    bank = report.get("bank") or {}
    outcome_rows = [
        ("state", report["state"]),
        ("message", report.get("message") or None),
        ("expected sites", ", ".join(report["expected_sites"])),
        ("quorum", report["quorum"]),
        ("included sites", ", ".join(report["included_sites"])
         if report.get("included_sites") is not None else None),
        ("cut off at the deadline", ", ".join(report["cut_off_sites"])
         if report.get("cut_off_sites") else None),
        ("bank version", bank.get("version")),
        ("bank rows", bank.get("rows")),
        ("codec", bank.get("codec")),
        ("opened (UTC)", _clock(report.get("opened_at"))),
        ("last upload complete (UTC)", _clock(report.get("uploads_complete_at"))),
        ("bank ready (UTC)", _clock(report.get("ready_at"))),
        ("partly collected before a restart", True if report.get("restarted") else None),
    ]
    sections = [section("Outcome", table(["", "value"],
                                         [(k, v) for k, v in outcome_rows if v is not None],
                                         table_id="outcome"))]
    if certificate:
        radii = certificate.get("site_radii") or {}
        sections.append(section(
            "Coverage certificate",
            table(["", "value"], [
                ("max r_i (largest site coverage radius)", certificate.get("max_site_radius")),
                ("r_S (server coverage radius, codec error included)",
                 certificate.get("server_radius")),
                ("of which codec error", certificate.get("codec_error")),
                ("certificate max r_i + r_S", certificate.get("certificate")),
            ], table_id="certificate"),
            table(["site", "r_i"], sorted(radii.items()), table_id="site-radii"),
            note="Every training patch of every included site lies within the certificate "
            "(feature distance units) of a bank row.",
        ))
    if selection:
        sections.append(section("Selection", table(["", "value"], [
            ("seconds (last upload complete -> bank stored)", selection.get("seconds")),
            ("device", selection.get("device")),
            ("strategy", selection.get("strategy")),
            ("server selection", selection.get("server_selection")),
        ], table_id="selection")))
    headers = ["site", "rows", "chunks", "chunks resent", "messages up", "bytes up",
               "downloads", "bytes down", "join -> upload complete s",
               "upload complete -> bank ready s", "rejected"]
    rows = []
    for site in report["sites"]:
        rows.append([
            site["site_id"], site.get("rows"), site.get("chunks_committed"),
            site.get("chunks_resent"), site.get("messages_up"), site.get("bytes_up"),
            len(site.get("downloads", [])), site.get("bytes_down"),
            _seconds(site.get("upload_complete_at"), site.get("joined_at")),
            _seconds(report.get("ready_at"), site.get("upload_complete_at")),
            site.get("rejected_count"),
        ])
    totals = report.get("totals") or {}
    rows.append(["all sites", totals.get("rows"), totals.get("chunks_committed"),
                 totals.get("chunks_resent"), totals.get("messages_up"), totals.get("bytes_up"),
                 totals.get("downloads"), totals.get("bytes_down"), None, None,
                 totals.get("rejected_count")])
    sections.append(section(
        "Sites", table(headers, rows, table_id="sites", digits=3),
        note="Bytes are serialized gRPC messages: uploads received (rejected ones included), "
        "bank downloads of this round's bank sent; n/a where a time is unknown. A site "
        "joins before it fits (to learn the extractor), so join -> upload complete includes "
        "its local fit.",
    ))
    failures = [(site["site_id"], reason) for site in report["sites"]
                for reason in site.get("rejected", [])]
    if report["state"] == "failed" or failures:
        parts = []
        if report["state"] == "failed":
            message = html.escape(str(report.get("message", "")))
            parts.append(f'<p class="bad">round failed: {message}</p>')
        if failures:
            parts.append(table(["site", "rejected message (latest first)"], failures,
                               table_id="failures"))
        sections.append(section("Failures", *parts))
    subtitle = (f"{report['state']}; written "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(report['written_at']))}")
    return page(f"FedPatchCore round {number}", subtitle, sections)


def write_round_report(state_dir: Path, report: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``round-N.json`` and ``round-N.html`` under ``state_dir/reports`` (atomically;
    rewritten when the round's downloads add to it; owner-only like the rest of the state
    directory). Returns (json path, html path)."""
    folder = Path(state_dir) / REPORT_DIR
    stem = f"round-{report['round']}"
    json_path = write_atomic(folder / f"{stem}.json",
                             json.dumps(json_safe(report), indent=2, sort_keys=True) + "\n",
                             private=True)
    html_path = write_atomic(folder / f"{stem}.html", render_round_report(report), private=True)
    logger.debug("round %s report written to %s", report["round"], folder)
    return json_path, html_path

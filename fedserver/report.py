"""The round report fedserver writes when a round closes: ``<state_dir>/reports/round-N.json``
and ``round-N.html`` (the same facts, one self-contained page for people).

What it holds (built by :func:`build_round_report` from the round, under the federation's lock,
then rendered and written by :class:`ReportWriter` off every lock):

* the round's outcome: state (ready / failed and why), expected, included and cut-off sites,
  quorum; the bank version and rows, the k asked for, and a line when the uploads could not fill
  k (``bank.short``); the coverage certificate ``max_i r_i + r_S`` with its parts
  (each site's r_i, the server's r_S including the codec's error);
* selection: seconds from the last upload to the stored bank, on which device, which strategy;
* bank allocation (prefix selection): per site its patches, rows uploaded (all rounds) and
  kept, proportional share k x n_i / N, floor, whether max_site_share capped it, whether its
  whole upload was kept (then its upload limited the bank), and the flooding flag
  (core.federated.allocation);
* per site: rows and r_i of its summary, chunks committed and resent, messages and bytes
  received (serialized UploadFeaturesRequest messages, rejected ones included), rejections
  with their reasons, bytes sent back in bank downloads of this round's bank (serialized
  DownloadBankResponse messages), and the times join -> upload complete -> bank ready.

The report is written when the round closes (ready or failed) and rewritten as sites download
its bank, so the bytes-down column fills in as downloads finish: downloads are aggregated per
site (count, bytes, seconds, the latest one), and rewrites are debounced (at most one per
``ReportWriter.debounce_s`` per round, however many sites download). Times are unix seconds from
this server's clock; a round that was partly collected before a restart says so (its joins
before the restart are not known: the journal keeps what a replay needs, not timings).
"""

from __future__ import annotations

import html
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.federated.upload import short_bank_note
from core.htmlreport import json_safe, page, section, table, write_atomic

if TYPE_CHECKING:
    from fedserver.rounds import Round

logger = logging.getLogger(__name__)

__all__ = [
    "REPORT_DIR",
    "ReportWriter",
    "build_round_report",
    "render_round_report",
    "write_round_report",
]

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
        ("bank rows asked (k)", bank.get("rows_asked")),
        ("bank short", bank.get("short")),
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
    allocation = report.get("allocation")
    if allocation:
        flagged = allocation.get("flooding") or {}
        alloc_rows = [
            [site["site_id"], site.get("num_patches"), site.get("rows_uploaded_all_rounds"),
             site.get("bank_rows_kept"), site.get("proportional_share"), site.get("floor"),
             site.get("capped_from"), "yes" if site.get("whole_upload_kept") else "no",
             (f"FLOODING ({flagged[site['site_id']]:.1f} x the others' rows per patch)"
              if site["site_id"] in flagged else "")]
            for site in report["sites"] if site.get("bank_rows_kept") is not None
        ]
        cap = allocation.get("max_site_share")
        applied = allocation.get("cap_applied_to") or []
        sections.append(section(
            "Bank allocation",
            table(["site", "patches", "rows uploaded (all rounds)", "rows kept",
                   "proportional share k n_i/N", "floor", "capped from", "whole upload kept",
                   "flag"], alloc_rows, table_id="allocation", digits=4),
            note=f"floor_fraction {allocation.get('floor_fraction')}; max_site_share "
            f"{cap if cap is not None else 'unset'}"
            + (f" (applied to {', '.join(applied)})" if applied else "")
            + ". A site whose whole upload is kept limited the bank by its upload. FLOODING: "
            "more than 5 x the other sites' bank rows per patch and a bank share over 10 "
            "points above its share of patches (random rows, a broken camera or extractor "
            "look like that; so can a genuinely far more diverse site).",
        ))
    headers = ["site", "rows", "chunks", "chunks resent", "messages up", "bytes up",
               "downloads", "bytes down", "join -> upload complete s",
               "upload complete -> bank ready s", "rejected"]
    rows = []
    for site in report["sites"]:
        rows.append([
            site["site_id"], site.get("rows"), site.get("chunks_committed"),
            site.get("chunks_resent"), site.get("messages_up"), site.get("bytes_up"),
            site.get("downloads"), site.get("bytes_down"),
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


def _allocation_fields(share: Mapping[str, Any] | None) -> dict[str, Any]:
    """A site's report fields from its SiteAllocation.as_dict (all None without one)."""
    return {
        "bank_rows_kept": share["kept"] if share else None,
        "rows_uploaded_all_rounds": share["uploaded"] if share else None,
        "num_patches": share["num_patches"] if share else None,
        "proportional_share": share["proportional"] if share else None,
        "floor": share["floor"] if share else None,
        "capped_from": share["uncapped"] if share and share["capped"] else None,
        "whole_upload_kept": share["whole_upload_kept"] if share else None,
    }


def build_round_report(
    rnd: Round,
    meta: Mapping[str, Any] | None,
    *,
    device: str,
    strategy: str,
    server_selection: str,
    codec: str,
    global_bank_size: int,
    floor_fraction: float = 0.0,
    max_site_share: float | None = None,
) -> dict[str, Any]:
    """What round ``rnd``'s report holds, as a JSON-ready dict (a snapshot: call it under the
    federation's lock; nothing in it refers back to live state). ``meta``: its bank version's
    metadata (None when the round has no bank); ``global_bank_size``: the k asked for, so a
    bank the uploads could not fill says so (``bank.short``)."""
    allocation = {a["site_id"]: a for a in rnd.allocation}
    sites = []
    for site_id in sorted(set(rnd.expected) | set(rnd.stats) | set(rnd.sites)):
        stats = rnd.stats.get(site_id)
        progress = rnd.sites.get(site_id)
        summary = progress.summary if progress is not None else None
        sites.append({
            "site_id": site_id,
            "expected": site_id in rnd.expected,
            "rows": progress.committed_rows if progress else 0,
            "rows_announced": summary.coreset_rows if summary else None,
            "coverage_radius": summary.coverage_radius if summary else None,
            "chunks_committed": progress.committed_sequence if progress else 0,
            "upload_complete": bool(progress and progress.complete),
            "chunks_resent": stats.chunks_resent if stats else 0,
            "messages_up": stats.messages_up if stats else 0,
            "bytes_up": stats.bytes_up if stats else 0,
            "downloads": stats.downloads if stats else 0,
            "downloads_complete": stats.downloads_complete if stats else 0,
            "bytes_down": stats.bytes_down if stats else 0,
            "download_seconds": stats.download_seconds if stats else 0.0,
            "last_download": dict(stats.last_download) if stats and stats.last_download else None,
            "joined_at": stats.joined_at if stats else None,
            "upload_complete_at": stats.upload_complete_at if stats else None,
            "rejected_count": stats.rejected_count if stats else 0,
            "rejected": list(stats.rejected) if stats else [],
            # The selection's share for the site (prefix selection; None otherwise): rows it
            # uploaded over all rounds and kept, k x n_i / N, its floor, whether the cap took
            # rows from it, whether its whole upload is in the bank (its upload limited it).
            **_allocation_fields(allocation.get(site_id)),
            "flooding_ratio": rnd.flooding.get(site_id),
        })
    included = list(rnd.included) if rnd.included is not None else None
    counted = [s for s in sites if included is None or s["site_id"] in included]
    radii = {s["site_id"]: s["coverage_radius"] for s in counted
             if s["coverage_radius"] is not None}
    return {
        "round": rnd.number,
        "state": rnd.phase.value,
        "message": rnd.message,
        "expected_sites": list(rnd.expected),
        "quorum": rnd.quorum,
        "included_sites": included,
        "cut_off_sites": sorted(set(rnd.expected) - set(included)) if included else [],
        "opened_at": rnd.opened_at,
        "uploads_complete_at": rnd.uploads_complete_at,
        "ready_at": rnd.ready_unix,
        "restarted": rnd.restarted,
        # sites withdrawn while this round's bank was the latest (docs/operator.md)
        "withdrawals": [dict(w) for w in rnd.withdrawals],
        "selection": {
            "seconds": rnd.selection_seconds,
            "device": device,
            "strategy": strategy,
            "server_selection": server_selection,
        } if rnd.selection_seconds is not None else None,
        "bank": {
            "version": rnd.bank_version,
            "rows": rnd.bank_rows,
            "rows_asked": global_bank_size,
            # None, or the line saying the uploads could not fill k
            "short": short_bank_note(global_bank_size, rnd.bank_rows,
                                     sum(int(s["rows"]) for s in sites)),
            "codec": codec,
        } if meta is not None else None,
        "certificate": {
            "server_radius": float(meta["server_radius"]),
            "codec_error": float(meta.get("bank_codec_error", 0.0)),
            "max_site_radius": float(meta["max_site_radius"]),
            "certificate": float(meta["server_radius"]) + float(meta["max_site_radius"]),
            "site_radii": radii,
        } if meta is not None else None,
        "allocation": {
            "floor_fraction": floor_fraction,
            "max_site_share": max_site_share,
            "cap_applied_to": sorted(a["site_id"] for a in rnd.allocation if a["capped"]),
            "flooding": dict(rnd.flooding),
            "upload_limited": sorted(a["site_id"] for a in rnd.allocation
                                     if a["whole_upload_kept"]),
        } if rnd.allocation else None,
        "sites": sites,
        "totals": {
            key: sum(s[key] for s in sites)
            for key in ("rows", "chunks_committed", "chunks_resent", "messages_up",
                        "bytes_up", "bytes_down", "rejected_count", "downloads")
        },
        "written_at": time.time(),
    }


class ReportWriter:
    """Writes round reports on a thread of its own, debounced.

    ``request(n)`` marks round n's report as due; the writer thread waits ``debounce_s``, then
    asks ``snapshot(n)`` for the report dict (the only step that takes the federation's lock,
    briefly) and renders and writes it with no lock held. Requests that arrive meanwhile for
    the same round are folded into one write. ``write_now`` writes a closing round's report at
    once, so it exists before READY is announced; ``stop`` writes what is still due.
    """

    def __init__(self, state_dir: Path, snapshot: Callable[[int], dict[str, Any] | None],
                 *, debounce_s: float = 0.5) -> None:
        self._state_dir = Path(state_dir)
        self._snapshot = snapshot
        self.debounce_s = debounce_s
        self._due: dict[int, float] = {}  # round -> monotonic time it is due at
        self._condition = threading.Condition()
        self._write_lock = threading.Lock()  # one write at a time (writer thread or flush)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fedserver-reports", daemon=True)
        self._thread.start()

    def request(self, round_number: int) -> None:
        with self._condition:
            self._due.setdefault(round_number, time.monotonic() + self.debounce_s)
            self._condition.notify()

    def _flush(self) -> None:
        """Write every due report now."""
        with self._condition:
            rounds = sorted(self._due)
            self._due.clear()
        for number in rounds:
            self._write(number)

    def write_now(self, report: dict[str, Any]) -> None:
        """Write an already built report now (a round closing: before READY is announced);
        a request for the same round that is due is folded into it."""
        with self._condition:
            self._due.pop(int(report["round"]), None)
        with self._write_lock:
            self._write_report(report)

    def stop(self) -> None:
        """Write what is due, then end the thread."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._thread.join()
        self._flush()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._stopping:
                    now = time.monotonic()
                    ready = [n for n, at in self._due.items() if at <= now]
                    if ready:
                        break
                    wait = min(self._due.values(), default=now + 3600) - now
                    self._condition.wait(timeout=max(wait, 0.01))
                if self._stopping:
                    return
                for number in ready:
                    del self._due[number]
            for number in ready:
                self._write(number)

    def _write(self, round_number: int) -> None:
        with self._write_lock:
            report = self._snapshot(round_number)
            if report is not None:
                self._write_report(report)

    def _write_report(self, report: dict[str, Any]) -> None:
        """Render and write (write lock held); a failure is logged, never raised: the bank and
        the journal are what the federation needs."""
        try:
            json_path, _ = write_round_report(self._state_dir, report)
        except OSError as error:
            logger.error("round %s: cannot write its report: %s", report["round"], error)
            return
        logger.info("round %s report: %s (and .html)", report["round"], json_path)

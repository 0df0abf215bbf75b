"""The HTML reports: a site's report.html (fedclient run / score) and the server's round report.

No browser runs here, so the check is a parse: every <img> is a data: URI holding a PNG that
Pillow opens, nothing refers to another file or the network, and the tables hold the numbers of
the JSON the same run wrote.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import grpc
import numpy as np
import pytest
from fedserver_testing import (
    TestClient,
    make_config,
    round_failed_below_quorum,
    site_rows,
    upload_messages,
)
from PIL import Image

from core.data import AutoVIDataset
from core.htmlreport import fmt, png_data_uri, table, write_atomic
from core.metrics import Curve, au_pro, image_auroc, pro_curve, roc_curve
from core.patchcore import PatchCore, PatchCoreConfig
from core.serde import upload_request_to_proto
from fedclient import cli
from fedpatchcore.v1 import federation_pb2 as fpb
from fedserver.daemon import create_server
from fedserver.federation import Federation, Phase
from fedserver.journal import Journal
from tests.conftest import SMALL_FEATURES


class ReportParser(HTMLParser):
    """Collects images, links and the text of every table (by id) of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.external: list[str] = []
        self.tags: set[str] = set()
        self.tables: dict[str, list[list[str]]] = {}
        self.headings: list[str] = []
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._in_h2 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        values = dict(attrs)
        if tag == "img":
            self.images.append(values)
        for key in ("src", "href"):
            value = values.get(key)
            if value is not None and not value.startswith("data:"):
                self.external.append(value)
        if tag == "table":
            self._table = values.get("id") or f"table-{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "h2":
            self._in_h2 = True
            self.headings.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "h2":
            self._in_h2 = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_h2:
            self.headings[-1] += data


def parse_report(path: Path) -> ReportParser:
    """Parse a report and check it is self-contained: every image an embedded PNG that Pillow
    decodes, no script, stylesheet link, frame or reference to another file."""
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    assert parser.external == [], f"{path} refers to other files: {parser.external[:3]}"
    assert not parser.tags & {"script", "link", "iframe", "object", "embed"}
    for image in parser.images:
        src = image["src"] or ""
        assert src.startswith("data:image/png;base64,"), src[:40]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))) as png:
            assert png.format == "PNG"
            png.load()  # decodes the whole image: a truncated PNG fails here
            assert png.width > 0 and png.height > 0
    return parser


def rows_by_first_cell(rows: list[list[str]]) -> dict[str, dict[str, str]]:
    header, *body = rows
    return {row[0]: dict(zip(header, row, strict=True)) for row in body}


def assert_metrics_table(parser: ReportParser, test: dict[str, object]) -> None:
    """The metrics table holds exactly the numbers of metrics.json's "test" entry."""
    table_rows = rows_by_first_cell(parser.tables["metrics"])
    expected = dict(test.get("per_category") or {})  # type: ignore[arg-type]
    expected["all"] = test
    assert set(table_rows) == set(expected)
    columns = {"images": "num_images", "anomalous": "num_anomalous",
               "image AUROC": "image_auroc", "pixel AUROC": "pixel_auroc",
               "AU-PRO@0.3": "au_pro"}
    spro = [k for k in test if k.startswith("au_spro@")]
    assert spro, "synthetic AutoVI data has defects configs: AU-sPRO must be reported"
    columns.update({f"AU-sPRO@{k.split('@')[1]}": k for k in spro})
    for name, values in expected.items():
        row = table_rows[name]
        for header, key in columns.items():
            value = values[key]  # type: ignore[index]
            if value is None:
                assert row[header] == "n/a"
            elif isinstance(value, float):
                assert float(row[header]) == pytest.approx(value, abs=5e-5), (name, header)
            else:
                assert row[header] == str(value), (name, header)


# --- building blocks ---------------------------------------------------------------------------


def test_curves_integrate_to_the_metrics() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 20)
    scores = rng.normal(size=50) + labels
    roc = roc_curve(labels, scores)
    assert roc.fpr[0] == 0 and roc.y[0] == 0 and roc.fpr[-1] == 1 and roc.y[-1] == 1
    assert roc.area() == pytest.approx(image_auroc(labels, scores), abs=1e-12)
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:6, 2:6] = masks[1, 8:, 8:] = True
    maps = rng.normal(size=masks.shape) + 2 * masks
    curve = pro_curve(masks, maps)
    assert curve.area(0.3) == au_pro(masks, maps, 0.3)
    thin = curve.thinned(50)
    assert thin.fpr.size <= 3 * 50 and thin.fpr[0] == 0 and thin.fpr[-1] == 1
    assert np.all(np.diff(thin.fpr) >= 0) and np.all(np.diff(thin.y) >= 0)
    assert thin.area(0.3) == pytest.approx(curve.area(0.3), abs=0.02)  # the plot shows the area
    with pytest.raises(ValueError, match="both classes"):
        roc_curve([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="max_points"):
        Curve(np.zeros(3), np.zeros(3)).thinned(1)


def test_page_helpers_escape_and_embed(tmp_path: Path) -> None:
    html = table(["a<b", "n"], [["<script>", 0.123456], ["x", None]], table_id="t")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "0.1235" in html and "n/a" in html and fmt(float("nan")) == "n/a"
    uri = png_data_uri(np.zeros((4, 5, 3), dtype=np.uint8))
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as png:
        assert png.size == (5, 4)
    with pytest.raises(ValueError, match="uint8"):
        png_data_uri(np.zeros((4, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="not a PNG"):
        png_data_uri(b"GIF89a")
    path = write_atomic(tmp_path / "r" / "x.html", "hello")
    assert path.read_text() == "hello" and [p.name for p in path.parent.iterdir()] == ["x.html"]


# --- the site report ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_category_bank(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> Path:
    model = PatchCore(PatchCoreConfig(features=SMALL_FEATURES, coreset_size=64))
    model.fit(AutoVIDataset(synthetic_root, ["stripes", "washer"], split="train"))
    extra = {"bank_version": 4, "round": 2, "server_coverage_radius": 1.5,
             "max_site_coverage_radius": 2.25, "feature_fingerprint": "ab" * 32,
             "codec": {"value_type": "fp16", "byte_shuffle": True, "zstd_level": 1}}
    return model.save(tmp_path_factory.mktemp("bank") / "bank.safetensors", extra=extra)


def test_score_report_is_self_contained_and_holds_metrics_json(
    tmp_path: Path,
    synthetic_root: Path,
    two_category_bank: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "scored"
    code = cli.main(["score", "--bank", str(two_category_bank), "--data", str(synthetic_root),
                     "--categories", "stripes", "washer", "--out", str(out), "--no-overlays"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    assert set(test["per_category"]) == {"stripes", "washer"}
    parser = parse_report(out / "report.html")
    assert_metrics_table(parser, test)
    # 2 curves + 6 most anomalous + 6 false positives (16 test images, 8 of them good)
    alts = [image["alt"] for image in parser.images]
    assert alts[:2] == ["image ROC curve", "PRO curve"] and len(alts) == 14
    scores = test["image_scores"]
    top = sorted(scores, key=lambda name: -scores[name])[:6]
    assert alts[2:8] == top  # most anomalous first, in score order
    good = [name for name in sorted(scores, key=lambda n: -scores[n]) if "/good/" in name][:6]
    assert alts[8:14] == good  # the worst false positives are the top-scoring good images
    assert "Most anomalous test images" in parser.headings
    assert "Worst false positives" in parser.headings
    provenance = {row[0]: row[1] for row in parser.tables["provenance"][1:]}
    assert provenance["bank version"] == "4" and provenance["round"] == "2"
    assert provenance["bank rows"] == "64" and provenance["codec"].startswith("fp16")
    assert provenance["feature fingerprint"] == "ab" * 32
    assert float(provenance["coverage certificate (max r_i + r_S)"]) == pytest.approx(3.75)
    assert not (out / "overlays").exists()  # --no-overlays: the report still has its own


def test_score_report_of_unlabelled_images_says_so(
    tmp_path: Path, synthetic_root: Path, two_category_bank: Path
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    for i, path in enumerate(sorted((synthetic_root / "stripes" / "test" / "good").glob("*"))[:3]):
        Image.open(path).save(plain / f"img{i}.png")
    out = tmp_path / "scored"
    assert cli.main(["score", "--bank", str(two_category_bank), "--data", str(plain),
                     "--out", str(out)]) == 0
    parser = parse_report(out / "report.html")
    assert len(parser.images) == 3  # no curves, no false positives: only the top images
    text = (out / "report.html").read_text()
    assert "no labels" in text and "Worst false positives" not in parser.headings
    row = rows_by_first_cell(parser.tables["metrics"])["all"]
    assert row["image AUROC"] == "n/a" and row["images"] == "3"
    assert re.search(r"3 test image\(s\), bank v4", text)


# --- the server's round report -----------------------------------------------------------------


def _wait_for(predicate, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_round_report_counts_what_each_site_sent_and_received(tmp_path: Path) -> None:
    config, tokens = make_config(tmp_path, ("a", "b"))
    server, port = create_server(config)
    server.start()
    clients = {s: TestClient(port, s, tokens[s]) for s in ("a", "b")}
    try:
        sent: dict[str, int] = {}
        for client in clients.values():
            client.join()
        summary, chunks = upload_messages("a", site_rows(0, 100), max_chunk_bytes=32 * 4 * 25)
        stream = [summary, chunks[0], chunks[0], *chunks[1:]]  # chunk 0 resent once
        assert clients["a"].upload(stream).chunks_ignored == 1
        sent["a"] = sum(upload_request_to_proto(m).ByteSize() for m in stream)
        summary_b, chunks_b = upload_messages("b", site_rows(1, 60), max_chunk_bytes=32 * 4 * 25)
        with pytest.raises(grpc.RpcError) as refused:
            clients["b"].upload([summary_b, chunks_b[2]])  # beyond the committed position
        assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
        clients["b"].upload([summary_b, *chunks_b])
        sent["b"] = sum(upload_request_to_proto(m).ByteSize()
                        for m in [summary_b, chunks_b[2], summary_b, *chunks_b])
        clients["a"].watch_until_done(1)
        json_path = config.state_dir / "reports" / "round-1.json"
        report = json.loads(json_path.read_text())  # written before READY is announced
        assert report["state"] == "ready" and report["sites"][0]["bytes_down"] == 0
        responses = list(clients["a"].stub.DownloadBank(
            fpb.DownloadBankRequest(site_id="a"), metadata=clients["a"].metadata, timeout=30))
        received = sum(r.ByteSize() for r in responses)
        report = _wait_for(lambda: (lambda r: r if r["sites"][0]["downloads"] else None)(
            json.loads(json_path.read_text())))
    finally:
        for client in clients.values():
            client.close()
        server.stop(0)
    sites = {s["site_id"]: s for s in report["sites"]}
    assert sites["a"]["bytes_up"] == sent["a"] and sites["b"]["bytes_up"] == sent["b"]
    assert sites["a"]["messages_up"] == 1 + len(chunks) + 1
    assert (sites["a"]["chunks_committed"], sites["a"]["chunks_resent"]) == (len(chunks), 1)
    assert (sites["a"]["rows"], sites["b"]["rows"]) == (100, 60)
    assert sites["b"]["rejected_count"] == 1
    assert sites["b"]["rejected"][0].startswith("OutOfRangeError: chunk 2 is beyond")
    assert sites["a"]["bytes_down"] == received and sites["b"]["bytes_down"] == 0
    assert (sites["a"]["downloads"], sites["a"]["downloads_complete"]) == (1, 1)
    download = sites["a"]["last_download"]
    assert download["complete"] and download["messages"] == len(responses)
    assert download["version"] == 1 and download["rows_in_stream"] == report["bank"]["rows"]
    for site in sites.values():
        assert site["joined_at"] <= site["upload_complete_at"] <= report["ready_at"]
    assert report["selection"]["device"] == "cpu" and report["selection"]["seconds"] > 0
    certificate = report["certificate"]
    assert certificate["site_radii"] == {"a": 0.25, "b": 0.25}
    assert certificate["max_site_radius"] == 0.25
    assert certificate["certificate"] == pytest.approx(
        certificate["server_radius"] + certificate["max_site_radius"])
    assert report["totals"]["bytes_up"] == sent["a"] + sent["b"]
    # The page holds the same numbers.
    parser = parse_report(json_path.with_suffix(".html"))
    rows = rows_by_first_cell(parser.tables["sites"])
    for name in ("a", "b"):
        assert rows[name]["bytes up"] == str(sent[name])
        assert rows[name]["bytes down"] == str(sites[name]["bytes_down"])
        assert rows[name]["chunks resent"] == str(sites[name]["chunks_resent"])
        assert float(rows[name]["join -> upload complete s"]) == pytest.approx(
            sites[name]["upload_complete_at"] - sites[name]["joined_at"], abs=1e-3)
    assert rows["all sites"]["bytes up"] == str(sent["a"] + sent["b"])
    cert_rows = {r[0]: r[1] for r in parser.tables["certificate"][1:]}
    assert float(cert_rows["certificate max r_i + r_S"]) == pytest.approx(
        certificate["certificate"], abs=5e-5)
    assert "Failures" in parser.headings  # b's refused chunk is listed
    assert any("OutOfRangeError" in row[1] for row in parser.tables["failures"][1:])


def test_failed_round_report_and_no_rewrite_after_a_restart(tmp_path: Path) -> None:
    config, federation, snapshot = round_failed_below_quorum(tmp_path)
    assert snapshot.phase is Phase.FAILED
    federation.close()
    json_path = config.state_dir / "reports" / "round-1.json"
    report = json.loads(json_path.read_text())
    assert report["state"] == "failed" and "quorum is 2" in report["message"]
    assert report["bank"] is None and report["certificate"] is None
    assert [s["upload_complete_at"] is not None for s in report["sites"]] == [True, False]
    parser = parse_report(json_path.with_suffix(".html"))
    assert "Failures" in parser.headings
    assert "quorum is 2" in json_path.with_suffix(".html").read_text()
    before = json_path.read_bytes()
    Federation(config, Journal(config.state_dir), ("a", "b")).close()  # replays the round
    assert json_path.read_bytes() == before  # the live report is kept, not overwritten


# --- the demo: real processes ------------------------------------------------------------------


@pytest.mark.slow
def test_demo_leaves_every_report_where_it_says(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python3 dev.py demo` as the README's Reports section describes it, on the small shared
    dataset: real fedserver and fedclient processes write the reports, the demo collects them,
    and the server's bytes per site equal what each site counted on its side."""
    from fedclient.demo import _run_on, build_parser

    reports = tmp_path / "reports"
    args = build_parser().parse_args(["--image-size", "64", "--rounds", "1",
                                      "--reports", str(reports)])
    metrics = _run_on(synthetic_root, tmp_path / "work", args)
    out = capsys.readouterr().out
    assert f"Reports (self-contained HTML; open in a browser): {reports}/" in out
    names = sorted(p.name for p in reports.iterdir())
    assert names == ["round-1.html", "round-1.json", "site-1.html", "site-2.html",
                     "site-3.html"]
    for site, site_metrics in metrics.items():
        parser = parse_report(reports / f"{site}.html")
        assert_metrics_table(parser, site_metrics["test"])  # type: ignore[arg-type]
        assert len(parser.images) == 2 + 6 + 4  # curves, top 6, the 4 good test images
        provenance = {row[0]: row[1] for row in parser.tables["provenance"][1:]}
        assert provenance["feature fingerprint"] == site_metrics["feature_fingerprint"]
        assert provenance["codec"] == "fp16, zstd level 1, byte shuffle"
    round_report = json.loads((reports / "round-1.json").read_text())
    parse_report(reports / "round-1.html")
    assert round_report["state"] == "ready"
    for entry in round_report["sites"]:
        counted = metrics[entry["site_id"]]["rounds"][0]  # type: ignore[index]
        assert entry["bytes_up"] == counted["bytes_up"]
        assert entry["bytes_down"] == counted["bytes_down"]
        assert entry["chunks_committed"] == counted["chunks_total"]
    assert round_report["certificate"]["certificate"] == pytest.approx(
        metrics["site-1"]["certificate"])


def test_round_report_names_the_sites_cut_off_at_the_deadline(tmp_path: Path) -> None:
    now = [1000.0]
    config, _ = make_config(tmp_path, ["a", "b", "c"], quorum=2, round_timeout_s=60.0)
    federation = Federation(config, Journal(config.state_dir), ("a", "b", "c"),
                            clock=lambda: now[0])
    federation.start()
    for i, site in enumerate("abc"):
        summary, chunks = upload_messages(site, site_rows(i, 80), max_chunk_bytes=32 * 4 * 20)
        for item in (summary, *(chunks if site != "c" else chunks[:1])):  # c is half-way
            federation.receive(site, item, upload_request_to_proto(item).SerializeToString())
    now[0] += 61
    assert federation.wait_for(1, {Phase.READY, Phase.FAILED}, timeout=30).phase is Phase.READY
    federation.close()
    report = json.loads((config.state_dir / "reports" / "round-1.json").read_text())
    assert report["included_sites"] == ["a", "b"] and report["cut_off_sites"] == ["c"]
    sites = {s["site_id"]: s for s in report["sites"]}
    assert (sites["c"]["chunks_committed"], sites["c"]["upload_complete"]) == (1, False)
    assert set(report["certificate"]["site_radii"]) == {"a", "b"}  # c's r_i is not covered
    outcome = rows_by_first_cell(parse_report(config.state_dir / "reports" / "round-1.html")
                                 .tables["outcome"])
    assert outcome["cut off at the deadline"]["value"] == "c"

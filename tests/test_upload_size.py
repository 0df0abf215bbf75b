"""Issue 17 item 4: a site's round-1 upload is sized from the server's k, and a bank the uploads
cannot fill says so in the round report, ``fedclient status``, the site's metrics and report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.data import AutoVIDataset
from core.federated import PatchCoreClient, UploadBudget, short_bank_note
from fedclient import cli
from fedclient.flower_app import SiteSettings
from tests.conftest import SMALL_FEATURES


def test_each_site_sends_f_times_its_share_of_k_within_its_limits() -> None:
    budget = UploadBudget(global_bank_size=1000, num_sites=4)  # f = 2: 500 rows per site
    assert budget.share == 500
    assert budget.rows(10_000) == 500
    assert budget.rows(300) == 300  # a small site sends what it has
    assert budget.rows(1) == 1
    assert UploadBudget(1000, 4, max_rows=200).rows(10_000) == 200  # the server's limit
    assert UploadBudget(1000, 4, factor=1.5).rows(10_000) == 375
    assert UploadBudget(1000, 3, factor=1.0).rows(10_000) == 334  # ceil: together >= k
    # never more than k: a bank of k rows cannot use more from one site
    assert UploadBudget(1000, 1).rows(10_000) == 1000
    assert UploadBudget(1000, 2, factor=5.0).rows(10_000) == 1000
    # no fixed set of sites: the size that assumes nothing about the others
    assert UploadBudget(1000, 0).rows(10_000) == 1000 and UploadBudget(1000, 0).rows(7) == 7


@pytest.mark.parametrize("kwargs, match", [
    ({"global_bank_size": 0, "num_sites": 2}, "global_bank_size"),
    ({"global_bank_size": 10, "num_sites": -1}, "num_sites"),
    ({"global_bank_size": 10, "num_sites": 2, "max_rows": -5}, "max_rows"),
    ({"global_bank_size": 10, "num_sites": 2, "factor": 0.0}, "upload factor"),
    ({"global_bank_size": 10, "num_sites": 2, "factor": float("nan")}, "upload factor"),
])
def test_a_bad_budget_is_refused_by_name(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UploadBudget(**kwargs)  # type: ignore[arg-type]


def test_short_bank_note_names_asked_got_and_uploaded() -> None:
    assert short_bank_note(100, 100, 250) is None
    note = short_bank_note(10_000, 4_608, 4_608)
    assert note == ("bank short: 4608 of the k = 10000 rows asked; the sites uploaded 4608 "
                    "rows in all this round")


def test_the_client_fits_the_budgets_rows(synthetic_root: Path) -> None:
    train = AutoVIDataset(synthetic_root, ["washer"], split="train")  # 12 images x 64 patches
    client = PatchCoreClient("a", train, SMALL_FEATURES, None,
                             upload_budget=UploadBudget(150, 3, factor=2.0))
    assert client.train().shape == (100, 128)  # ceil(2 x 150 / 3), below its 768 patches
    small = PatchCoreClient("b", train, SMALL_FEATURES, None,
                            upload_budget=UploadBudget(5_000, 2))
    assert small.train().shape[0] == 768  # k / S above its patches: all of them
    with pytest.raises(ValueError, match="exactly one of coreset_percentage and upload_budget"):
        PatchCoreClient("c", train, SMALL_FEATURES, 0.1, upload_budget=UploadBudget(10, 1))
    with pytest.raises(ValueError, match="exactly one of coreset_percentage and upload_budget"):
        PatchCoreClient("c", train, SMALL_FEATURES, None)


def test_flower_sites_size_from_k_unless_a_percentage_is_set() -> None:
    base = {"site-id": "a", "data": "d", "out-dir": "o"}
    site = SiteSettings.from_node_config(base)
    assert site.coreset_percentage is None and site.upload_factor == 2.0
    assert SiteSettings.from_node_config({**base, "coreset-percentage": 0.3}).coreset_percentage \
        == 0.3
    with pytest.raises(ValueError, match="upload-factor"):
        SiteSettings.from_node_config({**base, "upload-factor": -1})


def test_a_bank_the_uploads_cannot_fill_says_so_everywhere(
    tmp_path: Path, synthetic_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One site, k = 5000 against its 640 fitted patches: the site uploads all of them (the
    rule's min(n_i, k)), the bank has 640 rows, and the round report, `fedclient run`,
    `fedclient status`, metrics.json and report.html all say the bank is short."""
    from fedserver_testing import make_config

    from fedserver.daemon import create_server

    config, tokens = make_config(tmp_path / "server", ["a"], global_bank_size=5000)
    token = tmp_path / "a.token"
    token.write_text(tokens["a"])
    server, port = create_server(config)
    server.start()
    out = tmp_path / "site"
    connection = ["--server", f"127.0.0.1:{port}", "--site-id", "a", "--token-file", str(token)]
    try:
        code = cli.main(["run", *connection, "--data", str(synthetic_root), "--categories",
                         "washer", "--out", str(out), "--backbone", "resnet18",
                         "--no-pretrained", "--image-size", "64", "--target-dim", "128",
                         "--no-overlays"])
        run_out = capsys.readouterr().out
        assert code == 0, run_out
        assert cli.main(["status", *connection]) == 0
        status_out = capsys.readouterr().out
        assert cli.main(["status", *connection, "--json"]) == 0
        status_json = json.loads(capsys.readouterr().out.splitlines()[-1])
    finally:
        server.stop(0)
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["local_coreset_rows"]
    assert rows == metrics["num_training_patches"] == 640  # 10 fitted images x 64: all sent
    expected = (f"bank short: {rows} of the k = 5000 rows asked; the sites uploaded {rows} rows "
                "in all this round")
    assert metrics["bank_rows"] == rows and metrics["global_bank_size"] == 5000
    assert metrics["bank_short"] == {"rows_asked": 5000, "bank_rows": rows,
                                     "rows_uploaded": rows, "note": expected}
    assert metrics["rounds"][0]["bank_short"]["note"] == expected
    assert metrics["upload_rule"] == {"upload_factor": 2.0, "expected_sites": 1,
                                      "max_rows_per_site": metrics["upload_rule"][
                                          "max_rows_per_site"], "rows_per_site": 5000}
    assert f"site a: {expected}" in run_out
    assert expected in status_out and "ready" in status_out
    assert status_json["global_bank_size"] == 5000 and status_json["bank_short"] == expected
    page = (out / "report.html").read_text()
    assert 'id="bank-short"' in page and expected in page
    report = json.loads((config.state_dir / "reports" / "round-1.json").read_text())
    assert report["bank"]["rows"] == rows and report["bank"]["rows_asked"] == 5000
    assert report["bank"]["short"] == expected
    assert expected in (config.state_dir / "reports" / "round-1.html").read_text()


def test_a_full_bank_says_nothing(tmp_path: Path) -> None:
    """The report's short line is None when the uploads fill k (2 sites of 60 rows, k = 50)."""
    from fedserver_testing import TestClient, make_config, site_rows, upload_messages

    from fedserver.daemon import create_server

    config, tokens = make_config(tmp_path, ["a", "b"], global_bank_size=50)
    server, port = create_server(config)
    server.start()
    try:
        for seed, site in enumerate(("a", "b")):
            client = TestClient(port, site, tokens[site])
            client.join()
            summary, chunks = upload_messages(site, site_rows(seed, 60))
            client.upload([summary, *chunks])
        statuses = client.watch_until_done(1)
        client.close()
    finally:
        server.stop(0)
    assert statuses[-1].state == 3 and statuses[-1].bank_rows == 50  # READY
    assert all(s.global_bank_size == 50 for s in statuses)
    report = json.loads((config.state_dir / "reports" / "round-1.json").read_text())
    assert report["bank"]["short"] is None and report["bank"]["rows_asked"] == 50
    assert report["totals"]["rows"] == 120

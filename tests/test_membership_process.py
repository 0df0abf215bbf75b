"""Issue 21 through real processes: ``fedserver serve``, ``fedclient run`` and the operator CLI.

Two sites take part in round 1; the operator (``fedserver site add``) gives a third a token
while the server runs and opens round 2 (``fedserver round open``), in which the newcomer
uploads its full coreset and the others their novel patches; then ``fedserver site withdraw``
removes one site and each remaining site downloads the reselected bank as a delta, whose bytes
the command reported. A site token on an operator command is refused (PERMISSION_DENIED).
Small on purpose (resnet18 with random weights, D=128, 64 px, 12 images per site); the exact
equalities (the joined and the withdrawn bank against the in-process aggregator) are in
tests/test_membership.py.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from core.data import AutoVIDataset
from fedclient.demo import ServerProcess, SiteProcess, start_site, write_server_config
from fedclient.session import ConnectionConfig, RetryPolicy, SiteSession
from fedclient.site import BANK_FILE
from tests.test_system_e2e import BANK_SIZE, CHUNK_BYTES, EXTRACTOR, _env, _finish, _site_args

pytestmark = pytest.mark.slow


def _operator(fed: Path, address: str, *args: str, token: Path | None = None
              ) -> subprocess.CompletedProcess[str]:
    """``fedserver <args> --json`` against the running server, as the operator runs it."""
    command = [sys.executable, "-m", "fedserver", *args, "--address", address,
               "--token-file", str(token or fed / "operator.token"), "--json"]
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=120)


def _json(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _bank(site: SiteProcess) -> np.ndarray:
    return load_file(str(site.out_dir / BANK_FILE))["memory_bank"]


def test_join_open_and_withdraw_through_the_operator_cli(
    synthetic_root: Path, tmp_path: Path
) -> None:
    categories = sorted(AutoVIDataset(synthetic_root, split="train").categories)
    data = dict(zip("abd", categories, strict=True))  # d brings what a and b do not have
    fed = tmp_path / "fed"
    config = write_server_config(fed, ["a", "b"], global_bank_size=BANK_SIZE,
                                 extractor=EXTRACTOR, max_chunk_bytes=CHUNK_BYTES, env=_env())
    server = ServerProcess(config, tmp_path / "server.log", env=_env())
    tokens = {s: fed / "site-tokens" / f"{s}.token" for s in "ab"}

    def run(sites: str) -> dict[str, dict]:
        procs = {s: start_site(server.address, s, tokens[s], synthetic_root, tmp_path / s,
                               categories=[data[s]], env=_env(), extra_args=_site_args())
                 for s in sites}
        return {s: (_finish(p), p) for s, p in procs.items()}

    try:
        first = run("ab")
        assert {m["rounds"][-1]["bank_version"] for m, _ in first.values()} == {1}
        refused = _operator(fed, server.address, "site", "add", "d", token=tokens["a"])
        assert refused.returncode == 1
        assert "PERMISSION_DENIED" in refused.stderr and "operator token" in refused.stderr

        tokens["d"] = tmp_path / "d.token"
        added = _json(_operator(fed, server.address, "site", "add", "d",
                                "--token-out", str(tokens["d"])))
        assert added["joins_round"] == 2 and tokens["d"].read_text().strip() == added["token"]
        opened = _json(_operator(fed, server.address, "round", "open"))
        assert opened == {"round": 2, "expected_sites": ["a", "b", "d"]}

        second = run("abd")
        rounds = {s: m["rounds"][-1] for s, (m, _) in second.items()}
        assert all(r["round"] == 2 and r["bank_version"] == 2 for r in rounds.values())
        # the newcomer sends its full coreset, the others their novel patches only
        assert rounds["d"]["rows_up"] == second["d"][0]["local_coreset_rows"]
        assert rounds["d"]["num_novel"] is None
        assert all(rounds[s]["num_novel"] is not None for s in "ab")
        assert all(rounds[s]["bank_delta"] for s in "ab")
        bank2 = _bank(second["a"][1])
        assert all(np.array_equal(_bank(p), bank2) for _, p in second.values())
        certificate = {m["certificate"] for m, _ in second.values()}
        assert len(certificate) == 1

        withdrawn = _json(_operator(fed, server.address, "site", "withdraw", "b"))
        assert (int(withdrawn["bank_version_before"]),
                int(withdrawn["bank_version_after"])) == (2, 3)
        assert int(withdrawn["rows_removed_from_journal"]) > 0
        print(f"\nwithdrawal of b: {withdrawn['rows_removed_from_journal']} rows removed from "
              f"the journal ({withdrawn['journal_bytes_before']} -> "
              f"{withdrawn['journal_bytes_after']} B), {withdrawn['rows_removed_from_bank']} "
              f"from the bank; versions deleted {withdrawn['versions_deleted']}, redacted "
              f"{withdrawn['versions_redacted']}")
        deltas = {d["site_id"]: d for d in withdrawn["deltas"]}
        assert sorted(deltas) == ["a", "d"]
        for site in "ad":
            token = tokens[site].read_text().strip()
            with SiteSession(ConnectionConfig(server.address, token=token, call_timeout_s=30),
                             site, retry=RetryPolicy(max_attempts=1),
                             rng=random.Random(0)) as session:
                download = session.download_bank(have=(2, bank2), max_rows=BANK_SIZE)
            assert download.version == 3 and download.delta
            assert download.bytes_received == int(deltas[site]["delta_bytes"])
            assert download.bytes_received < int(deltas[site]["full_bytes"])
            print(f"\nwithdrawal of b: site {site} downloads {download.bytes_received} B "
                  f"(delta v2 -> v3: {download.rows_removed} rows removed, "
                  f"{download.rows_in_stream} added; full: {deltas[site]['full_bytes']} B)")
        listed = _json(_operator(fed, server.address, "site", "list"))
        assert {e["site_id"]: e["state"] for e in listed["sites"]} == {
            "a": "active", "b": "withdrawn", "d": "active"}
    finally:
        assert server.stop() == 0

"""Issue 21, server side: late join, withdrawal with exact removal, rounds on demand, and the
operator's credential, over gRPC against an in-process server (hand-made rows: the features are
not the point; tests/test_membership_process.py drives real processes).

* Join: 3 sites in round 1, a 4th added by the operator joins round 2 with its full coreset:
  the bank equals the in-process aggregator's for the same uploads, bit for bit, and every
  site's training patches lie within max_i r_i + r_S of it.
* Withdrawal: withdrawing one of the 4 gives the bank of the 3-site federation, bit for bit;
  the remaining sites take it as a delta from the version they hold (its bytes counted); the
  site's rows are gone from the journal and from every stored bank file; a restart replays it.
* A withdrawal while a round collects drops the site's partial upload and the round closes
  with the others.
* Operator rpcs refuse a site token (PERMISSION_DENIED) and a missing or unknown one
  (UNAUTHENTICATED); site rpcs refuse the operator token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from core.bankdelta import stable_order
from core.federated.aggregator import GlobalBankAggregator
from core.messages import FeatureChunk, SiteSummary
from core.serde import upload_request_from_proto, upload_request_to_proto
from fedpatchcore.v1 import features_pb2 as pb
from fedpatchcore.v1 import operator_pb2 as opb
from fedpatchcore.v1 import operator_pb2_grpc as ogrpc
from fedserver.auth import OPERATOR, TokenStore, new_token, write_tokens_file
from fedserver.bankstore import row_digest
from fedserver.daemon import FedServer, create_server
from fedserver.errors import RoundClosedError
from fedserver.federation import Phase
from fedserver.journal import Journal, RecordKind
from tests.fedserver_testing import Downloaded, TestClient, channel, make_config, upload_messages

K = 40
DIM = 16
Upload = tuple[SiteSummary, list[FeatureChunk]]


def _rows(seed: int, n: int, offset: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, DIM)) + offset).astype(np.float32)


def _reference(rounds: Sequence[Mapping[str, Upload]]) -> np.ndarray:
    """The in-process aggregator fed the same uploads, round by round, sites in sorted order."""
    aggregator = GlobalBankAggregator(K, seed=0, device="cpu")
    for number, uploads in enumerate(rounds, 1):
        aggregator.begin_round(number)
        for site in sorted(uploads):
            summary, chunks = uploads[site]
            aggregator.receive_summary(summary)
            for chunk in chunks:
                aggregator.receive_chunk(chunk)
        outcome = aggregator.finish_round()
    return outcome.bank


def _farthest(points: np.ndarray, bank: np.ndarray) -> float:
    """Largest Euclidean distance from a point [n, D] to its nearest bank row [k, D]."""
    gaps = np.linalg.norm(points[:, None, :].astype(np.float64) - bank[None, :, :], axis=2)
    return float(gaps.min(axis=1).max())


def _same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(stable_order(a, b), a)


class _Operator:
    def __init__(self, port: int, token: str) -> None:
        self.channel = channel(port)
        self.stub = ogrpc.OperatorServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)

    def __getattr__(self, name: str):
        method = getattr(self.stub, name)
        return lambda request: method(request, metadata=self.metadata, timeout=60)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FedServer, dict[str, str], Path]]:
    config, tokens = make_config(tmp_path, ["a", "b", "c"], global_bank_size=K)
    tokens[OPERATOR] = new_token()
    write_tokens_file(config.tokens_file, tokens)
    server, _ = create_server(config)
    server.start()
    try:
        yield server, tokens, config.tokens_file
    finally:
        server.stop(0)


def _upload(port: int, site: str, token: str, upload: Upload) -> None:
    client = TestClient(port, site, token)
    try:
        client.upload([upload[0], *upload[1]])
    finally:
        client.close()


def _download(port: int, site: str, token: str, have: Downloaded | None = None) -> Downloaded:
    client = TestClient(port, site, token)
    try:
        return client.download(have)
    finally:
        client.close()


def test_late_join_and_withdrawal_match_the_in_process_federation(served) -> None:
    server, tokens, tokens_file = served
    port, federation = server.port, server.federation
    operator = _Operator(port, tokens[OPERATOR])
    patches = {s: _rows(10 + i, 200, 3.0 * i) for i, s in enumerate("abcd")}
    # each site's coreset: every 4th training patch; r_i as the site would measure it
    coreset = {s: p[::4] for s, p in patches.items()}
    radius = {}
    for s in "abcd":
        radius[s] = _farthest(patches[s], coreset[s])

    def upload(site: str, rows: np.ndarray, number: int) -> Upload:
        summary, chunks = upload_messages(site, rows, round_number=number, max_chunk_bytes=512)
        return summary.__class__(**{**summary.__dict__, "coverage_radius": radius[site]}), chunks

    round1 = {s: upload(s, coreset[s], 1) for s in "abc"}
    for site, item in round1.items():
        _upload(port, site, tokens[site], item)
    federation.wait_for(1, {Phase.READY}, timeout=60)
    held = {s: _download(port, s, tokens[s]) for s in "abc"}
    assert held["a"].version == 1

    # The operator adds d: a token at once (no restart), and it joins round 2, not round 1.
    added = operator.AddSite(opb.AddSiteRequest(site_id="d"))
    assert added.joins_round == 2 and len(added.token) == 43
    tokens["d"] = added.token
    assert "d" in TokenStore.load(tokens_file).sites
    early = TestClient(port, "d", added.token)
    with pytest.raises(grpc.RpcError) as refused:
        early.join()
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "from round 2" in refused.value.details()
    opened = operator.OpenRound(opb.OpenRoundRequest())
    assert opened.round == 2 and list(opened.expected_sites) == ["a", "b", "c", "d"]
    joined = early.join()
    early.close()
    assert joined.config.round == 2 and joined.config.full_coreset
    assert not TestClient(port, "a", tokens["a"]).join().config.full_coreset

    # Round 2: a, b, c send a few novel rows, d its full coreset.
    novel = {s: _rows(20 + i, 5, 3.0 * i + 1.5) for i, s in enumerate("abc")}
    round2 = {s: upload(s, novel[s], 2) for s in "abc"}
    round2["d"] = upload("d", coreset["d"], 2)
    for site, item in round2.items():
        _upload(port, site, tokens[site], item)
    federation.wait_for(2, {Phase.READY}, timeout=60)
    v2 = {s: _download(port, s, tokens[s], held.get(s)) for s in "abcd"}
    assert v2["a"].header.base_version == 1 and v2["d"].header.base_version == 0
    bank2 = v2["a"].bank
    assert all(np.array_equal(v.bank, bank2) for v in v2.values())
    assert _same_rows(bank2, _reference([round1, round2]))  # bit for bit, same rows
    certificate = v2["a"].header.max_site_coverage_radius + v2["a"].header.server_coverage_radius
    assert v2["a"].header.max_site_coverage_radius == max(radius.values())  # d's r_i counts
    for site in "abcd":
        assert _farthest(patches[site], bank2) <= certificate + 1e-5, site

    # Withdraw b: exactly the federation in which b never took part, given the same uploads.
    b_rows = {row_digest(r) for r in np.concatenate([coreset["b"], novel["b"]])}  # lossless
    assert any(row_digest(r) in b_rows for r in bank2)
    done = operator.WithdrawSite(opb.WithdrawSiteRequest(site_id="b"))
    assert (done.bank_version_before, done.bank_version_after) == (2, 3)
    assert done.rows_removed_from_journal == 55 and done.rows_removed_from_bank > 0
    assert list(done.versions_redacted) == [2] and list(done.versions_deleted) == [1]
    assert done.journal_bytes_after < done.journal_bytes_before
    without_b = _reference([{s: round1[s] for s in "ac"},
                            {s: round2[s] for s in "acd"}])
    remaining = {}
    for site in "acd":
        remaining[site] = _download(port, site, tokens[site], v2[site])
        assert remaining[site].header.base_version == 2  # a delta, from the redacted v2
        assert remaining[site].version == 3
    bank3 = remaining["a"].bank
    assert _same_rows(bank3, without_b)
    assert all(np.array_equal(v.bank, bank3) for v in remaining.values())
    deltas = {d.site_id: d for d in done.deltas}
    assert sorted(deltas) == ["a", "c", "d"]
    for site, delta in deltas.items():
        assert 0 < delta.delta_bytes < delta.full_bytes
        assert delta.rows_removed == remaining[site].header.rows_removed
        print(f"\nwithdrawal of b: {site} downloads {delta.delta_bytes} B as a delta from "
              f"v{delta.have_version} ({delta.rows_removed} rows removed, {delta.rows_added} "
              f"added), a full download is {delta.full_bytes} B")
    # b's token is revoked; its data is gone from the journal and from every stored bank.
    with pytest.raises(grpc.RpcError) as revoked:
        TestClient(port, "b", tokens["b"]).join()
    assert revoked.value.code() is grpc.StatusCode.UNAUTHENTICATED
    state = server.config.state_dir
    assert not _journal_sites(state) & {"b"}
    for path in (state / "banks").glob("*.npy"):
        assert not any(row_digest(r) in b_rows for r in np.load(path)), path
    report = federation.round_report(2)
    assert report["withdrawals"][0]["site_id"] == "b"
    listed = {e.site_id: e.state for e in operator.ListSites(opb.ListSitesRequest()).sites}
    assert listed == {"a": "active", "b": "withdrawn", "c": "active", "d": "active"}

    # A withdrawal while a round collects: d's partial upload is dropped, the round closes.
    operator.OpenRound(opb.OpenRoundRequest())
    round3 = {s: upload(s, _rows(30 + i, 30, 3.0 * i + 0.7), 3) for i, s in enumerate("acd")}
    for site in "ac":
        _upload(port, site, tokens[site], round3[site])
    d_summary, d_chunks = round3["d"]
    _upload(port, "d", tokens["d"], (d_summary, d_chunks[:1]))
    assert federation.snapshot(3).phase is Phase.COLLECTING
    operator.WithdrawSite(opb.WithdrawSiteRequest(site_id="d"))
    federation.wait_for(3, {Phase.READY}, timeout=60)
    assert federation.expected_sites(3) == ("a", "c")
    bank4 = _download(port, "a", tokens["a"]).bank
    assert _same_rows(bank4, _reference([{s: round1[s] for s in "ac"},
                                         {s: round2[s] for s in "ac"},
                                         {s: round3[s] for s in "ac"}]))
    assert not _journal_sites(state) & {"b", "d"}
    version = federation.snapshot(3).bank_version
    assert federation.snapshot(2).bank_version == 4  # d's withdrawal reselected round 2's bank

    # A restart replays the rewritten journal: same rounds, same bank, same membership.
    server.stop(0)
    again, _ = create_server(server.config)
    try:
        replayed = again.federation
        assert replayed.snapshot(3).phase is Phase.READY
        assert replayed.snapshot(3).bank_version == version
        assert replayed.snapshot(2).bank_version == 4
        sites = replayed.membership()["sites"]
        assert {s: sites[s][0] for s in sites} == {
            "a": "active", "b": "withdrawn", "c": "active", "d": "withdrawn"}
        assert [w["site_id"] for w in replayed.round_report(2)["withdrawals"]] == ["b", "d"]
    finally:
        again.stop(0)


def _journal_sites(state: Path) -> set[str]:
    """Sites with an upload record in the state directory's journal (read while the server
    runs: records() only reads the file)."""
    journal = Journal.__new__(Journal)
    journal.path = state / "journal.log"
    sites = set()
    for record in journal.records():
        if record.kind in (RecordKind.SUMMARY, RecordKind.CHUNK):
            item = upload_request_from_proto(pb.UploadFeaturesRequest.FromString(record.payload))
            sites.add(item.site_id)
    return sites


def test_operator_commands_need_the_operator_token(served) -> None:
    server, tokens, tokens_file = served
    port = server.port
    for token, code in ((tokens["a"], grpc.StatusCode.PERMISSION_DENIED),
                        ("not-a-token", grpc.StatusCode.UNAUTHENTICATED)):
        operator = _Operator(port, token)
        for call, request in (("AddSite", opb.AddSiteRequest(site_id="x")),
                              ("RevokeSite", opb.RevokeSiteRequest(site_id="b")),
                              ("WithdrawSite", opb.WithdrawSiteRequest(site_id="b")),
                              ("OpenRound", opb.OpenRoundRequest()),
                              ("ListSites", opb.ListSitesRequest())):
            with pytest.raises(grpc.RpcError) as refused:
                getattr(operator, call)(request)
            assert refused.value.code() is code, call
            if code is grpc.StatusCode.PERMISSION_DENIED:
                assert "needs the operator token" in refused.value.details()
    bare = ogrpc.OperatorServiceStub(channel(port))
    with pytest.raises(grpc.RpcError) as missing:
        bare.ListSites(opb.ListSitesRequest(), timeout=30)
    assert missing.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "missing" in missing.value.details()
    # The operator's token is not a site's.
    as_site = TestClient(port, "a", tokens[OPERATOR])
    with pytest.raises(grpc.RpcError) as denied:
        as_site.join()
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
    as_site.close()
    assert "x" not in TokenStore.load(tokens_file).sites  # nothing changed

    operator = _Operator(port, tokens[OPERATOR])
    with pytest.raises(grpc.RpcError) as exists:
        operator.AddSite(opb.AddSiteRequest(site_id="a"))
    assert exists.value.code() is grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as bad:
        operator.AddSite(opb.AddSiteRequest(site_id="@x"))
    assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as early:
        operator.OpenRound(opb.OpenRoundRequest())  # round 1 still collects
    assert early.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    # Revoking c (nothing uploaded yet) takes effect at once: its token is refused, round 1
    # no longer waits for it.
    revoked = operator.RevokeSite(opb.RevokeSiteRequest(site_id="c"))
    assert "no longer waits" in revoked.message
    assert server.federation.expected_sites(1) == ("a", "b")
    with pytest.raises(grpc.RpcError) as gone:
        TestClient(port, "c", tokens["c"]).join()
    assert gone.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert sorted(TokenStore.load(tokens_file).sites) == ["a", "b"]


def test_rounds_open_on_a_schedule_and_a_restart_resumes_it(tmp_path: Path) -> None:
    from fedserver.federation import Federation

    now = [1000.0]
    config, _ = make_config(tmp_path, ["a"], global_bank_size=K, round_interval_s=60.0)
    federation = Federation(config, Journal(config.state_dir), ("a",), clock=lambda: now[0])
    federation.start()
    try:
        summary, chunks = upload_messages("a", _rows(1, 30, 0.0))
        for item in (summary, *chunks):
            federation.receive("a", item, upload_request_to_proto(item).SerializeToString())
        federation.wait_for(1, {Phase.READY}, timeout=60)
        now[0] += 59.0
        time.sleep(0.5)  # the deadline watcher looks every 0.2 s: it must not open round 2
        assert federation.snapshot().round == 1
    except Exception:
        federation.close()
        raise
    federation.close()
    # Restarted before the interval is up: the schedule comes back from the journal.
    federation = Federation(config, Journal(config.state_dir), ("a",), clock=lambda: now[0])
    federation.start()
    try:
        assert federation.snapshot().round == 1
        now[0] += 2.0
        waited = time.monotonic()
        while federation.snapshot().round == 1:
            assert time.monotonic() - waited < 30, "round 2 did not open by the schedule"
            time.sleep(0.05)
        assert federation.expected_sites(2) == ("a",)
        with pytest.raises(RoundClosedError, match="collecting"):
            federation.open_round()  # round 2 is not ready yet
    finally:
        federation.close()


def test_a_withdrawal_interrupted_after_the_journal_rewrite_finishes_at_start(
    tmp_path: Path,
) -> None:
    import shutil

    from fedserver.federation import Federation

    config, _ = make_config(tmp_path, ["a", "b"], global_bank_size=K)
    uploads = {s: upload_messages(s, _rows(i, 60, 2.0 * i), max_chunk_bytes=512)
               for i, s in enumerate("ab")}
    federation = Federation(config, Journal(config.state_dir), ("a", "b"))
    federation.start()
    try:
        for site, (summary, chunks) in uploads.items():
            for item in (summary, *chunks):
                federation.receive(site, item, upload_request_to_proto(item).SerializeToString())
        federation.wait_for(1, {Phase.READY}, timeout=60)
        banks = config.state_dir / "banks"
        shutil.copytree(banks, tmp_path / "banks-before")
        done = federation.withdraw_site("b")
        assert (done.version_before, done.version_after, done.redacted) == (1, 2, (1,))
    finally:
        federation.close()
    # As if the server had stopped right after the journal's rewrite: old bank files, no v2.
    shutil.rmtree(banks)
    shutil.copytree(tmp_path / "banks-before", banks)
    federation = Federation(config, Journal(config.state_dir), ("a",))
    try:
        assert federation.snapshot(1).bank_version == 2
        b_rows = {row_digest(r) for r in _rows(1, 60, 2.0)}
        for path in banks.glob("*.npy"):
            assert not any(row_digest(r) in b_rows for r in np.load(path)), path
        assert _same_rows(np.load(banks / "v000002.npy"), _reference([{"a": uploads["a"]}]))
    finally:
        federation.close()

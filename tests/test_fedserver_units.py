"""fedserver building blocks without a network: config, tokens, journal, bank deltas, federation."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from fedserver_testing import (
    FINGERPRINT,
    make_config,
    round_failed_below_quorum,
    site_rows,
    upload_messages,
)

from core.bankdelta import (
    DeltaError,
    apply_delta,
    bank_checksum,
    bank_delta,
    decoded_checksum,
    stable_order,
)
from core.codec import CODEC_PRESETS, decode_matrix, encode_matrix
from core.serde import ChunkConflictError, upload_request_to_proto
from fedserver.auth import AuthError, TokenStore, hash_token, new_token, write_tokens_file
from fedserver.config import ConfigError, ServerConfig, load_config
from fedserver.federation import (
    Federation,
    OutOfRangeError,
    PermissionDeniedError,
    Phase,
    RoundClosedError,
)
from fedserver.journal import MAGIC, Journal, JournalCorruptError, RecordKind

# -- config ------------------------------------------------------------------------------------


def test_config_from_toml_with_flag_overrides(tmp_path: Path) -> None:
    write_tokens_file(tmp_path / "tokens", {"a": new_token(), "b": new_token()})
    (tmp_path / "server.toml").write_text(
        '[server]\nstate_dir = "state"\ntokens_file = "tokens"\nglobal_bank_size = 77\n'
        'expected_sites = ["a", "b"]\nquorum = 1\ncodec = "int8"\n'
    )
    config = load_config(tmp_path / "server.toml", {"global_bank_size": 88, "seed": None})
    assert config.global_bank_size == 88  # the flag wins
    assert config.seed == 0  # None overrides nothing
    assert config.state_dir == tmp_path / "state"  # relative to the file
    assert config.expected_sites == ("a", "b") and config.quorum == 1
    assert config.codec_config.value_type == "int8"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("global_bank_size", 0, "global_bank_size"),
        ("bind", "nohost", "bind"),
        ("codec", "gzip", "codec"),
        ("quorum", 3, "quorum"),
        ("max_chunk_bytes", 4 << 20, "max_chunk_bytes"),
        ("feature_fingerprint", "XYZ", "feature_fingerprint"),
        ("tls_cert", "missing.pem", "tls_cert and tls_key"),
        ("round_timeout_s", float("nan"), "round_timeout_s"),
        ("colour", "blue", "unknown configuration key"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, key: str, value: object, message: str) -> None:
    write_tokens_file(tmp_path / "tokens", {"a": new_token()})
    overrides = {"state_dir": tmp_path / "s", "tokens_file": tmp_path / "tokens",
                 "expected_sites": ("a", "b") if key == "quorum" else (), key: value}
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_requires_state_dir_and_an_existing_tokens_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="state_dir is required"):
        load_config(None, {"tokens_file": tmp_path / "tokens"})
    with pytest.raises(ConfigError, match="does not exist"):
        ServerConfig(state_dir=tmp_path, tokens_file=tmp_path / "nope")
    (tmp_path / "bad.toml").write_text("state_dir = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_pinned_extractor_gives_the_fingerprint_and_dimension(tmp_path: Path) -> None:
    from core.features import FeatureConfig
    from core.preprocess import ImageTransform

    features = FeatureConfig(backbone="resnet18", pretrained=False, pretrain_embed_dim=128,
                             target_embed_dim=64, transform=ImageTransform(resize=64, crop=None))
    write_tokens_file(tmp_path / "tokens", {"a": new_token()})
    extractor = {**features.to_dict(), "pretrained": False, "crop": 0}
    config = ServerConfig(state_dir=tmp_path, tokens_file=tmp_path / "tokens",
                          extractor=extractor)
    assert config.feature_fingerprint == features.fingerprint()
    assert config.feature_dim == 64
    with pytest.raises(ConfigError, match="disagrees"):
        ServerConfig(state_dir=tmp_path, tokens_file=tmp_path / "tokens", extractor=extractor,
                     feature_dim=128)


# -- tokens ------------------------------------------------------------------------------------


def test_token_store_maps_tokens_to_sites(tmp_path: Path) -> None:
    tokens = {"plant-1": new_token(), "plant-2": new_token()}
    write_tokens_file(tmp_path / "tokens", tokens)
    assert tokens["plant-1"] not in (tmp_path / "tokens").read_text()  # only digests stored
    assert (tmp_path / "tokens").stat().st_mode & 0o077 == 0
    store = TokenStore.load(tmp_path / "tokens")
    assert store.sites == ("plant-1", "plant-2")
    assert store.site_for_token(tokens["plant-2"]) == "plant-2"
    assert store.site_for_token(tokens["plant-2"] + "x") is None
    assert store.site_of([("authorization", f"Bearer {tokens['plant-1']}")]) == "plant-1"
    for metadata, message in [
        ([], "missing"),
        ([("authorization", tokens["plant-1"])], "Bearer"),
        ([("authorization", "Bearer nope")], "unknown bearer token"),
    ]:
        with pytest.raises(AuthError, match=message):
            store.site_of(metadata)


def test_tokens_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"a {hash_token('x')}\na {hash_token('y')}\n")
    with pytest.raises(AuthError, match="appears twice"):
        TokenStore.load(path)
    path.write_text("a b c\n")
    with pytest.raises(AuthError, match=":1: expected"):
        TokenStore.load(path)
    path.write_text(f"a {hash_token('x')}\nb {hash_token('x')}\n")
    with pytest.raises(AuthError, match="shares its token"):
        TokenStore.load(path)


# -- journal -----------------------------------------------------------------------------------


def test_journal_replays_what_was_appended(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append_json(RecordKind.ROUND_OPENED, {"round": 1})
    journal.append(RecordKind.CHUNK, b"x" * 1000)
    journal.close()
    records = list(Journal(tmp_path).records())
    assert [r.kind for r in records] == [RecordKind.ROUND_OPENED, RecordKind.CHUNK]
    assert records[0].json() == {"round": 1} and records[1].payload == b"x" * 1000


def test_journal_cuts_off_a_torn_tail_only(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    for i in range(3):
        journal.append(RecordKind.CHUNK, bytes([i]) * 100)
    journal.close()
    path = tmp_path / "journal.log"
    size = path.stat().st_size
    with open(path, "r+b") as handle:  # a crash half-way through appending record 3
        handle.truncate(size - 40)
    records = list(Journal(tmp_path).records())
    assert [r.payload[0] for r in records] == [0, 1]
    assert path.stat().st_size < size - 40  # the torn part is gone


def test_journal_refuses_damage_before_the_tail(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    for i in range(3):
        journal.append(RecordKind.CHUNK, bytes([i]) * 100)
    journal.close()
    path = tmp_path / "journal.log"
    data = bytearray(path.read_bytes())
    data[len(MAGIC) + 17 + 50] ^= 0xFF  # a flipped bit inside record 0's payload
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError, match="followed by more data"):
        Journal(tmp_path)
    # A damaged length field of the *first* record is not taken for a torn tail either.
    data = bytearray(path.read_bytes())
    data[len(MAGIC) + 17 + 50] ^= 0xFF
    struct.pack_into("<I", data, len(MAGIC), 10**6)
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError):
        Journal(tmp_path)


def test_bank_versions_round_trip(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    bank = site_rows(3, 10, 4)
    journal.save_bank(1, bank, {"round": 1, "server_radius": float("inf")})
    stored = journal.load_bank(1)
    np.testing.assert_array_equal(stored.bank, bank)
    assert stored.meta["rows"] == 10 and stored.meta["server_radius"] == float("inf")
    assert journal.bank_versions() == [1]


def test_downloads_in_flight_share_one_encoding_of_the_bank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sites that download the same stream at once (every site, when a round's bank is ready)
    share its encoded chunks: the bank is encoded once, not once per site. Nothing is kept
    once no download holds the stream, and a new version gets its own stream."""
    import gc

    import fedserver.bankstore as bankstore

    encodings: list[int] = []
    split = bankstore.split_bank_into_chunks

    def counted(rows: np.ndarray, **kwargs: object) -> object:
        encodings.append(rows.shape[0])
        return split(rows, **kwargs)

    monkeypatch.setattr(bankstore, "split_bank_into_chunks", counted)
    store = bankstore.BankStore(Journal(tmp_path), CODEC_PRESETS["fp16"], "fp16",
                                max_chunk_bytes=1024)
    first = site_rows(0, 200, 16)
    store.store(1, first, 0.5, 0.25)
    downloads = [store.download() for _ in range(3)]
    streams = [list(d.chunks) for d in downloads]
    assert encodings == [200] and len(streams[0]) > 1  # one encoding, several chunks
    assert all(a is b for other in streams[1:] for a, b in zip(streams[0], other, strict=True))
    expected = [c.features.payload for c in split(first, config=CODEC_PRESETS["fp16"], round=1,
                                                  server_coverage_radius=0.5,
                                                  max_site_coverage_radius=0.25,
                                                  max_chunk_bytes=1024)]
    assert [c.features.payload for c in streams[0]] == expected  # the chunks a site always got
    del downloads, streams
    gc.collect()
    assert sum(1 for _ in store.download().chunks) > 1
    assert encodings == [200, 200]  # nobody held the stream: it was not kept
    second = np.concatenate([first[:150], site_rows(1, 50, 16)])
    store.store(2, second, 0.5, 0.25)
    held = [store.download(have_version=1) for _ in range(2)]
    assert held[0].header.base_version == 1 and held[0].removed.size == 50
    deltas = [list(d.chunks) for d in held]
    assert all(a is b for a, b in zip(*deltas, strict=True))
    assert encodings == [200, 200, 50]  # the delta, encoded once for both sites


# -- bank deltas -------------------------------------------------------------------------------


def test_stable_order_and_delta_rebuild_the_new_version() -> None:
    old = site_rows(0, 40, 8)
    new_rows = site_rows(1, 7, 8)
    # The new selection keeps 30 old rows (shuffled) and adds 7.
    rng = np.random.default_rng(0)
    kept = rng.choice(40, size=30, replace=False)
    selection = np.concatenate([old[kept], new_rows])[rng.permutation(37)]
    target = stable_order(old, selection)
    np.testing.assert_array_equal(target[:30], old[np.sort(kept)])
    assert {r.tobytes() for r in target} == {r.tobytes() for r in selection}
    delta = bank_delta(old, target)
    np.testing.assert_array_equal(delta.removed, np.setdiff1d(np.arange(40), kept))
    assert delta.added.shape == (7, 8)
    np.testing.assert_array_equal(apply_delta(old, delta.removed, delta.added), target)
    with pytest.raises(DeltaError, match="stable order"):
        bank_delta(old, selection)


def test_delta_of_decoded_rows_matches_the_full_download_checksum() -> None:
    """fp16 is element-wise: a site rebuilding from decoded rows holds what a full download
    would give it, so the header's checksum verifies both."""
    codec = CODEC_PRESETS["fp16"]
    old = site_rows(0, 50, 8)
    target = stable_order(old, np.concatenate([old[5:], site_rows(9, 3, 8)]))
    delta = bank_delta(old, target)

    def site_decode(rows: np.ndarray) -> np.ndarray:
        return decode_matrix(encode_matrix(rows, codec), max_decoded_bytes=1 << 20)

    rebuilt = apply_delta(site_decode(old), delta.removed, site_decode(delta.added))
    assert bank_checksum(rebuilt) == decoded_checksum(target, codec)
    assert bank_checksum(site_decode(target)) == decoded_checksum(target, codec)
    assert decoded_checksum(target, CODEC_PRESETS["int8"]) == 0


def test_apply_delta_rejects_bad_indices() -> None:
    base = site_rows(0, 5, 3)
    with pytest.raises(DeltaError, match="strictly increasing"):
        apply_delta(base, np.array([3, 1]), np.empty((0, 3), np.float32))
    with pytest.raises(DeltaError, match="strictly increasing"):
        apply_delta(base, np.array([5]), np.empty((0, 3), np.float32))
    with pytest.raises(DeltaError, match="added rows"):
        apply_delta(base, np.array([], dtype=np.int64), np.zeros((2, 4), np.float32))


# -- federation (no grpc) ----------------------------------------------------------------------


def _raw(item: object) -> bytes:
    return upload_request_to_proto(item).SerializeToString()  # type: ignore[arg-type]


def test_federation_commits_resumes_and_replays(tmp_path: Path) -> None:
    config, _ = make_config(tmp_path, ["a", "b"])
    federation = Federation(config, Journal(config.state_dir), ("a", "b"))
    summary, chunks = upload_messages("a", site_rows(1, 100), max_chunk_bytes=32 * 4 * 25)
    assert len(chunks) == 4
    assert federation.receive("a", summary, _raw(summary))
    assert not federation.receive("a", summary, _raw(summary))  # identical resend
    assert federation.receive("a", chunks[0], _raw(chunks[0]))
    with pytest.raises(OutOfRangeError, match="resume from chunk 1"):
        federation.receive("a", chunks[2], _raw(chunks[2]))
    with pytest.raises(PermissionDeniedError, match="cannot upload as site 'a'"):
        federation.receive("b", chunks[1], _raw(chunks[1]))
    assert not federation.receive("a", chunks[0], _raw(chunks[0]))
    assert federation.receive("a", chunks[1], _raw(chunks[1]))
    progress = federation.progress("a")
    assert (progress.committed_sequence, progress.committed_rows) == (2, chunks[2].row_offset)
    federation.close()
    # Restart: the committed position comes back from the journal.
    again = Federation(config, Journal(config.state_dir), ("a", "b"))
    progress = again.progress("a")
    assert (progress.committed_sequence, progress.summary_committed) == (2, True)
    # The aggregator was rebuilt too: it knows chunk 1, and a different chunk 1 conflicts.
    assert not again.receive("a", chunks[1], _raw(chunks[1]))
    other = upload_messages("a", site_rows(7, 100), max_chunk_bytes=32 * 4 * 25)[1][1]
    with pytest.raises(ChunkConflictError, match="resent with different content"):
        again.receive("a", other, _raw(other))
    for chunk in chunks[2:]:
        assert again.receive("a", chunk, _raw(chunk))
    assert again.progress("a").complete
    again.close()


def test_deadline_cuts_off_incomplete_sites_when_the_quorum_is_met(tmp_path: Path) -> None:
    now = [1000.0]
    config, _ = make_config(tmp_path, ["a", "b", "c"], quorum=2, round_timeout_s=60.0)
    federation = Federation(config, Journal(config.state_dir), ("a", "b", "c"),
                            clock=lambda: now[0])
    federation.start()
    uploads = {
        s: upload_messages(s, site_rows(i, 80), max_chunk_bytes=32 * 4 * 20)
        for i, s in enumerate("abc")
    }
    for site in "ab":
        summary, chunks = uploads[site]
        for item in (summary, *chunks):
            federation.receive(site, item, _raw(item))
    summary, chunks = uploads["c"]
    for item in (summary, chunks[0]):  # c is half-way when the deadline passes
        federation.receive("c", item, _raw(item))
    assert federation.snapshot().phase is Phase.COLLECTING
    now[0] += 61
    snapshot = federation.wait_for(1, {Phase.READY, Phase.FAILED}, timeout=30)
    assert snapshot.phase is Phase.READY and snapshot.sites_complete == 2
    with pytest.raises(RoundClosedError, match="uploads are closed"):
        federation.receive("c", chunks[1], _raw(chunks[1]))
    # The bank holds a's and b's rows only.
    bank = federation.journal.load_bank(snapshot.bank_version).bank
    c_rows = {r.tobytes() for r in site_rows(2, 80)}
    assert not any(r.tobytes() in c_rows for r in bank)
    federation.close()
    # A restart replays the cutoff the same way and verifies the stored version.
    again = Federation(config, Journal(config.state_dir), ("a", "b", "c"))
    assert again.snapshot().phase is Phase.READY
    again.close()


def test_deadline_below_quorum_fails_the_round(tmp_path: Path) -> None:
    _, federation, snapshot = round_failed_below_quorum(tmp_path)
    assert snapshot.phase is Phase.FAILED and "quorum is 2" in snapshot.message
    federation.close()


def test_a_state_directory_that_cannot_record_the_deadline_fails_the_round_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full when the deadline passes: the round fails at once with a message saying why
    (it used to kill the deadline thread and leave the round collecting forever), and a
    restart with space again takes the round up from the journaled uploads."""
    now = [0.0]
    config, _ = make_config(tmp_path, ["a", "b"], quorum=1, round_timeout_s=5.0)
    journal = Journal(config.state_dir)
    federation = Federation(config, journal, ("a", "b"), clock=lambda: now[0])
    federation.start()
    summary, chunks = upload_messages("a", site_rows(0, 60))
    for item in (summary, *chunks):
        federation.receive("a", item, _raw(item))

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal, "_write_batch", disk_full)  # every write of the log fails
    now[0] = 10.0
    snapshot = federation.wait_for(1, {Phase.READY, Phase.FAILED}, timeout=30)
    assert snapshot.phase is Phase.FAILED
    assert "cannot record it" in snapshot.message and "No space left" in snapshot.message
    federation.close()
    monkeypatch.undo()
    again = Federation(config, Journal(config.state_dir), ("a", "b"), clock=lambda: now[0])
    again.start()  # the cut-off was never journaled: the deadline passes again, now recorded
    snapshot = again.wait_for(1, {Phase.READY, Phase.FAILED}, timeout=30)
    assert snapshot.phase is Phase.READY and snapshot.sites_complete == 1
    again.close()


def test_fingerprint_pinned_by_the_first_site(tmp_path: Path) -> None:
    from core.federated.aggregator import IncompatibleSiteError

    config, _ = make_config(tmp_path, ["a", "b"])
    federation = Federation(config, Journal(config.state_dir), ("a", "b"))
    summary, _ = upload_messages("a", site_rows(0, 10))
    federation.receive("a", summary, _raw(summary))
    other, _ = upload_messages("b", site_rows(1, 10), fingerprint="cd" * 32)
    with pytest.raises(IncompatibleSiteError, match="fingerprint"):
        federation.receive("b", other, _raw(other))
    with pytest.raises(IncompatibleSiteError, match="fingerprint"):
        federation.join("b", "cd" * 32)
    terms, progress, _ = federation.join("b", FINGERPRINT)
    assert terms.feature_fingerprint == FINGERPRINT and not progress.summary_committed
    federation.close()


def test_a_summary_of_another_dimension_is_invalid_before_the_first_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first accepted summary fixes D at once: another site's summary of another D that
    arrives while the first is still on its way to disk is refused as malformed
    (DimensionMismatchError, INVALID_ARGUMENT), as it is afterwards. It used to reach the
    aggregator and come back as IncompatibleSiteError (FAILED_PRECONDITION), so the status code
    depended on the journal's timing."""
    import threading

    from fedserver.errors import DimensionMismatchError

    config, _ = make_config(tmp_path, ["a", "b"])
    journal = Journal(config.state_dir)
    federation = Federation(config, journal, ("a", "b"))
    gate = threading.Event()
    write_batch = journal._write_batch

    def held(*args: object, **kwargs: object) -> None:
        gate.wait(timeout=30)
        write_batch(*args, **kwargs)

    monkeypatch.setattr(journal, "_write_batch", held)
    summary, _ = upload_messages("a", site_rows(0, 10))
    pending = federation.submit("a", summary, _raw(summary))
    assert not pending.done()  # a's summary is accepted, not yet durable
    other, _ = upload_messages("b", site_rows(1, 10, dim=16))
    with pytest.raises(DimensionMismatchError, match="D=16"):
        federation.submit("b", other, _raw(other))
    gate.set()
    assert pending.result(timeout=30) is True
    federation.close()


# -- command line ------------------------------------------------------------------------------


def test_serve_help_documents_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    from fedserver.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    # Settings a flag would not make sense for: test-only fsync, the TOML-only extractor table.
    toml_only = {"fsync", "extractor", "extra"}
    for field in dataclasses.fields(ServerConfig):
        if field.name not in toml_only:
            assert "--" + field.name.replace("_", "-") in text, field.name


def test_cli_errors_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedserver.cli import main

    assert main(["serve", "--state-dir", str(tmp_path / "s"), "--tokens-file",
                 str(tmp_path / "missing")]) == 2
    assert "configuration error: tokens_file" in capsys.readouterr().err
    assert main(["init-config", "--sites", "a", "--dir", str(tmp_path / "fed")]) == 0
    assert main(["init-config", "--sites", "a", "--dir", str(tmp_path / "fed")]) == 2
    assert "use --force" in capsys.readouterr().err
    config = load_config(tmp_path / "fed" / "server.toml")
    assert config.expected_sites == ("a",) and config.state_dir == tmp_path / "fed" / "state"


def test_state_directory_refuses_other_selection_settings(tmp_path: Path) -> None:
    from fedserver.federation import StateMismatchError

    config, _ = make_config(tmp_path, ["a"])
    Federation(config, Journal(config.state_dir), ("a",)).close()
    other, _ = make_config(tmp_path, ["a"], global_bank_size=60, seed=1)
    journal = Journal(other.state_dir)
    with pytest.raises(StateMismatchError, match="global_bank_size: 50 -> 60, seed: 0 -> 1"):
        Federation(other, journal, ("a",))
    journal.close()
    switched, _ = make_config(tmp_path, ["a"], server_selection="farthest_first")
    journal = Journal(switched.state_dir)
    with pytest.raises(StateMismatchError, match="server_selection: 'prefix' -> 'farthest_first'"):
        Federation(switched, journal, ("a",))
    journal.close()


@pytest.mark.parametrize("selection", ["prefix", "farthest_first"])
def test_server_selection_setting_reaches_the_aggregator(
    tmp_path: Path, selection: str
) -> None:
    """The daemon's bank is the in-process aggregator's under either server selection."""
    from core.federated import GlobalBankAggregator

    config, _ = make_config(tmp_path, ["a", "b"], global_bank_size=40, server_selection=selection)
    federation = Federation(config, Journal(config.state_dir), ("a", "b"))
    federation.start()
    reference = GlobalBankAggregator(40, seed=0, server_selection=selection)  # type: ignore[arg-type]
    reference.begin_round(1)
    for i, site in enumerate("ab"):
        summary, chunks = upload_messages(site, site_rows(i, 120), max_chunk_bytes=32 * 40)
        reference.receive_summary(summary)
        for item in (summary, *chunks):
            federation.receive(site, item, _raw(item))
        for chunk in chunks:
            reference.receive_chunk(chunk)
    snapshot = federation.wait_for(1, {Phase.READY, Phase.FAILED}, timeout=60)
    assert snapshot.phase is Phase.READY, snapshot.message
    stored = federation.journal.load_bank(snapshot.bank_version).bank
    expected = reference.finish_round().bank
    assert sorted(map(bytes, stored)) == sorted(map(bytes, expected))  # stable order may differ
    federation.close()


@pytest.mark.parametrize("codec_name", ["int8", "int4"])
def test_server_radius_holds_for_the_bank_as_sites_decode_it(
    tmp_path: Path, codec_name: str
) -> None:
    """The header's r_S covers every uploaded row (as the server decoded it) from the bank as a
    site decodes it under a lossy codec: the codec's row error is part of r_S, as in-process."""
    codec = CODEC_PRESETS[codec_name]
    config, _ = make_config(tmp_path, ["a", "b"], codec=codec_name, global_bank_size=30)
    federation = Federation(config, Journal(config.state_dir), ("a", "b"))
    federation.start()
    uploaded = []
    for i, site in enumerate("ab"):
        summary, chunks = upload_messages(site, site_rows(i, 120), codec=codec,
                                          max_chunk_bytes=32 * 40)
        for item in (summary, *chunks):
            federation.receive(site, item, _raw(item))
        uploaded.append(np.concatenate([
            decode_matrix(c.features, max_decoded_bytes=1 << 20) for c in chunks
        ]))
    snapshot = federation.wait_for(1, {Phase.READY, Phase.FAILED}, timeout=60)
    assert snapshot.phase is Phase.READY, snapshot.message
    download = federation.bank_download("a")
    site_bank = np.concatenate([
        decode_matrix(c.features, max_decoded_bytes=1 << 20) for c in download.chunks
    ]).astype(np.float64)
    rows = np.concatenate(uploaded).astype(np.float64)
    worst = max(float(np.sqrt(((site_bank - r) ** 2).sum(1)).min()) for r in rows)
    stored = federation.journal.load_bank(snapshot.bank_version)
    assert stored.meta["bank_codec_error"] > 0
    assert worst <= download.header.server_coverage_radius + 1e-6
    federation.close()

"""`fedserver` as a real process: init-config, serve, SIGTERM drain, SIGKILL and restart."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
from fedserver_testing import ServerProcess, TestClient, site_rows, upload_messages

from fedserver.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
CHUNK_BYTES = 32 * 4 * 25


@pytest.fixture
def configured(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    assert cli_main(["init-config", "--sites", "a,b", "--dir", str(tmp_path / "fed"),
                     "--global-bank-size", "40"]) == 0
    tokens = {
        site: (tmp_path / "fed" / "site-tokens" / f"{site}.token").read_text().strip()
        for site in ("a", "b")
    }
    return tmp_path / "fed" / "server.toml", tokens


@pytest.mark.slow
def test_sigterm_drains_and_exits_cleanly(configured: tuple[Path, dict[str, str]]) -> None:
    config, tokens = configured
    server = ServerProcess("--config", str(config), "--bind", "127.0.0.1:0", "--device", "cpu",
                           "--grace-s", "5")
    client = TestClient(server.port, "a", tokens["a"])
    assert client.join().config.global_bank_size == 40
    client.close()
    assert server.stop(signal.SIGTERM) == 0
    text = "".join(server.log)
    assert "received SIGTERM: draining" in text and "fedserver stopped" in text


@pytest.mark.slow
def test_killed_server_restarts_without_losing_acknowledged_chunks(
    configured: tuple[Path, dict[str, str]],
) -> None:
    config, tokens = configured
    args = ("--config", str(config), "--bind", "127.0.0.1:0", "--device", "cpu")
    server = ServerProcess(*args)
    rows = {"a": site_rows(0, 200), "b": site_rows(1, 150)}
    a_summary, a_chunks = upload_messages("a", rows["a"], max_chunk_bytes=CHUNK_BYTES)
    client = TestClient(server.port, "a", tokens["a"])
    acknowledged = client.upload([a_summary, *a_chunks[:5]]).upload
    assert acknowledged.committed_sequence == 5
    client.close()
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL  # no drain, no clean close

    server = ServerProcess(*args)
    client = TestClient(server.port, "a", tokens["a"])
    status = client.status()
    assert status.summary_committed
    assert (status.committed_sequence, status.committed_rows) == (
        acknowledged.committed_sequence, acknowledged.committed_rows
    )
    client.upload(a_chunks[status.committed_sequence:])
    b_summary, b_chunks = upload_messages("b", rows["b"], max_chunk_bytes=CHUNK_BYTES)
    other = TestClient(server.port, "b", tokens["b"])
    other.upload([b_summary, *b_chunks])
    other.watch_until_done()
    bank = other.download().bank
    client.close()
    other.close()
    assert server.stop(signal.SIGTERM) == 0
    # The same bank as a server that never crashed (fp16 codec: compare decoded uploads).
    from core.codec import CODEC_PRESETS, decode_matrix, encode_matrix
    from core.federated.aggregator import GlobalBankAggregator

    def fp16(x: np.ndarray) -> np.ndarray:
        return decode_matrix(encode_matrix(x, CODEC_PRESETS["fp16"]), max_decoded_bytes=1 << 24)

    reference = GlobalBankAggregator(40, seed=0)
    reference.begin_round(1)
    for site, chunks, summary in (("a", a_chunks, a_summary), ("b", b_chunks, b_summary)):
        reference.receive_summary(summary)
        for chunk in chunks:
            reference.receive_chunk(chunk)
        assert site in rows
    np.testing.assert_array_equal(bank, fp16(reference.finish_round().bank))

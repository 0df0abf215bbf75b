"""The bandwidth benchmarks' moving parts: the counting proxy, the fedbench entry point, the
wire-cost prediction against a real upload, the links command's prerequisites and clean-up,
and the fedserver codec overrides the benchmarks need."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from benchmarks import __main__ as fedbench
from benchmarks import links, report
from benchmarks.netcount import CountingProxy, ss_counters, tcp_info_bytes
from benchmarks.wire import (
    _auroc_delta,
    full_matrix,
    make_certificates,
    quick_matrix,
    train_only_copy,
)
from core.codec import CODEC_PRESETS, CodecConfig
from core.federated import CommunicationProtocol
from core.federated.communication import wire_bytes
from core.serde import split_into_chunks
from fedclient.session import ConnectionConfig, SiteSession, TLSConfig
from fedserver.cli import build_parser as server_parser
from fedserver.config import ConfigError
from tests.fedserver_testing import make_config, upload_messages

REPO = Path(__file__).resolve().parent.parent

# -- the counting proxy -----------------------------------------------------------------------


def _sink_server(expect_up: int, reply: bytes) -> tuple[socket.socket, threading.Thread,
                                                         dict[str, bytes]]:
    """A one-connection server: read ``expect_up`` bytes, send ``reply``, close."""
    listener = socket.create_server(("127.0.0.1", 0))
    got: dict[str, bytes] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        data = bytearray()
        while len(data) < expect_up:
            block = conn.recv(1 << 20)
            if not block:
                break
            data += block
        got["up"] = bytes(data)
        conn.sendall(reply)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread, got


def test_proxy_counts_every_byte_each_way_and_agrees_with_the_kernel() -> None:
    rng = np.random.default_rng(0)
    up = rng.integers(0, 256, 3_000_001, dtype=np.uint8).tobytes()
    down = rng.integers(0, 256, 1_234_567, dtype=np.uint8).tobytes()
    listener, thread, got = _sink_server(len(up), down)
    with CountingProxy(listener.getsockname()) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port))
        client.sendall(up)
        received = bytearray()
        while True:
            block = client.recv(1 << 20)
            if not block:
                break
            received += block
        client.close()
    thread.join(10)
    listener.close()
    assert got["up"] == up and bytes(received) == down  # relayed unchanged
    assert proxy.totals() == (len(up), len(down))
    (connection,) = proxy.connections
    assert (connection.up, connection.down) == (len(up), len(down))
    assert connection.kernel_client_side.received == len(up)
    assert connection.kernel_server_side.sent == len(up)
    assert connection.kernel_server_side.received == len(down)
    assert connection.kernel_client_side.sent == len(down)
    assert connection.kernel_agrees


def test_tcp_info_parse_matches_ss() -> None:
    """The TCP_INFO offsets read the same counters `ss -tin` prints for a live socket."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    client.sendall(b"x" * 70_000)
    data = bytearray()
    while len(data) < 70_000:
        data += server.recv(1 << 16)
    server.sendall(b"y" * 12_345)
    reply = bytearray()
    while len(reply) < 12_345:
        reply += client.recv(1 << 16)
    try:
        ours = tcp_info_bytes(client)
        listed = ss_counters(client.getsockname()[1], listener.getsockname()[1])
        assert ours.sent == 70_000 and ours.received == 12_345
        assert listed == ours
    finally:
        for sock in (client, server, listener):
            sock.close()


# -- fedbench ---------------------------------------------------------------------------------


def test_fedbench_help_lists_every_sub_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fedbench.main(["--help"], prog="fedbench")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in fedbench.COMMANDS:
        assert f"  {name} " in out
    assert "wire" in fedbench.COMMANDS and "links" in fedbench.COMMANDS


@pytest.mark.parametrize("name", sorted(fedbench.COMMANDS))
def test_every_sub_command_module_has_main_and_help(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fedbench.main([name, "--help"], prog="fedbench")
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_fedbench_refuses_an_unknown_sub_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fedbench.main(["bandwidth"], prog="fedbench")
    assert exit_info.value.code == 2
    assert "invalid choice: 'bandwidth'" in capsys.readouterr().err


def test_python_dash_m_benchmarks_help_runs() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos")])}
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=REPO, env=env,
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: python -m benchmarks" in result.stdout and "links" in result.stdout


def test_wire_matrices() -> None:
    quick = quick_matrix()
    assert {s.value_type for s in quick} == {"fp32", "fp16", "bf16", "int8", "int4"}
    assert sorted(s.chunk_bytes for s in quick if s.value_type == "fp16") == [
        64 << 10, 256 << 10, 1 << 20, 3 << 20
    ]
    full = full_matrix()
    # 3 multi-byte types x shuffle on/off + 2 one-byte types, x 3 zstd levels x 4 chunk sizes
    assert len(full) == (3 * 2 + 2) * 3 * 4 == len(set(full))
    for setting in full:
        setting.codec  # noqa: B018 (every cell is a valid CodecConfig)


def test_auroc_change_is_not_reported_where_it_cannot_fail() -> None:
    base = {"image_auroc": 1.0, "pixel_auroc": 0.96}
    test = {"image_auroc": 1.0, "pixel_auroc": 0.95}
    assert _auroc_delta(test, base, "image_auroc") == "saturated"
    assert _auroc_delta(test, base, "pixel_auroc") == pytest.approx(-0.01)
    assert _auroc_delta(None, base, "pixel_auroc") == "not scored"


def test_wire_rejects_selection_flags_without_full() -> None:
    with pytest.raises(SystemExit, match="add --full"):
        fedbench.main(["wire", "--value-types", "fp16"], prog="fedbench")


def test_train_only_copy_hides_the_test_images(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for name in ("train/good", "test/good", "ground_truth/scratch"):
        (root / "mesh" / name).mkdir(parents=True)
    (root / "mesh" / "train" / "good" / "000.png").write_bytes(b"png")
    (root / "mesh" / "defects_config.json").write_text("[]")
    copy = train_only_copy(root, tmp_path / "copy")
    assert sorted(p.name for p in (copy / "mesh").iterdir()) == ["defects_config.json", "train"]
    assert (copy / "mesh" / "train" / "good" / "000.png").read_bytes() == b"png"


def test_append_results_records_commit_machine_and_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(report, "RESULTS", results)
    monkeypatch.setattr(report, "FIGURES", tmp_path / "figures")
    figure = report.plot_path("demo.png")
    figure.parent.mkdir()
    figure.write_bytes(b"\x89PNG")
    monkeypatch.setenv("FEDBENCH_COMMAND", "fedbench")
    monkeypatch.setattr(sys, "argv", ["fedbench", "wire", "--record"])
    report.append_results("T", "| a |\n|---|\n| 1 |", "note", append=True, figures=[figure])
    text = results.read_text()
    assert "`fedbench wire --record` | commit " in text
    assert "Machine: " in text and "![demo](figures/demo.png)" in text
    with pytest.raises(ValueError, match=r"bare \.png"):
        report.plot_path("../x.png")


# -- the wire-cost prediction ------------------------------------------------------------------


def test_wire_bytes_counts_grpc_prefix_and_frame_headers() -> None:
    assert wire_bytes(0) == 5 + 9
    assert wire_bytes(100) == 100 + 5 + 9
    assert wire_bytes(100, max_frame_bytes=50) == 100 + 5 + 9 * 3  # 105 bytes in 3 frames
    with pytest.raises(ValueError):
        wire_bytes(-1)


def test_cost_prediction_within_one_percent_of_a_real_upload(tmp_path: Path) -> None:
    """compute_communication_cost(wire=True) against the bytes a counting proxy sees for one
    UploadFeatures call of fedclient's session to the real server (64 KiB chunks: 19 messages,
    so the per-message framing is exercised)."""
    rows, chunk = 600, 64 << 10
    from fedserver.daemon import create_server

    config, tokens = make_config(tmp_path, ["a"], codec="fp16", fsync=False,
                                 max_chunk_bytes=chunk)
    server, port = create_server(config)
    server.start()
    codec = CODEC_PRESETS["fp16"]
    features = np.maximum(np.random.default_rng(1).standard_normal((rows, 1024)), 0).astype(
        np.float32
    )
    summary, _ = upload_messages("a", features, codec=codec, max_chunk_bytes=chunk,
                                 fingerprint="ab" * 32)
    chunks = list(split_into_chunks(features, config=codec, site_id="a", round=1,
                                    max_chunk_bytes=chunk))
    try:
        with CountingProxy(("127.0.0.1", port)) as proxy, SiteSession(
            ConnectionConfig(proxy.address, token=tokens["a"]), "a"
        ) as session:
            session.join("ab" * 32)
            before = proxy.totals()[0]
            result = session.upload(summary, chunks)
            measured = proxy.totals()[0] - before
    finally:
        server.stop(0)
    kwargs = {"codec": codec, "client_id": "a", "summary": summary, "max_chunk_bytes": chunk}
    messages = CommunicationProtocol.compute_communication_cost(features, **kwargs)  # type: ignore[arg-type]
    predicted = CommunicationProtocol.compute_communication_cost(features, wire=True, **kwargs)  # type: ignore[arg-type]
    assert messages == result.bytes_sent  # the site counts the same messages
    assert predicted > messages  # framing is counted
    assert abs(predicted / measured - 1) <= 0.01, (predicted, measured)
    # the part the model leaves out (the call's HEADERS, end of stream) is small and positive
    assert 0 < measured - predicted < 1000


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_proxy_relays_a_tls_upload_and_counts_the_records(tmp_path: Path) -> None:
    """Through the proxy, a TLS upload arrives intact, and the bytes counted include the TLS
    records: more than the plaintext framing model, by a small fraction."""
    from fedserver.daemon import create_server

    pki = make_certificates(tmp_path / "pki")
    config, tokens = make_config(tmp_path / "srv", ["a"], codec="fp16", fsync=False,
                                 tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    server, port = create_server(config)
    server.start()
    codec = CODEC_PRESETS["fp16"]
    features = np.maximum(np.random.default_rng(2).standard_normal((600, 1024)), 0).astype(
        np.float32
    )
    summary, chunks = upload_messages("a", features, codec=codec, max_chunk_bytes=1 << 20,
                                      fingerprint="ab" * 32)
    try:
        with CountingProxy(("127.0.0.1", port)) as proxy, SiteSession(
            ConnectionConfig(proxy.address, token=tokens["a"], tls=TLSConfig(pki / "ca.pem")),
            "a",
        ) as session:
            session.join("ab" * 32)
            before = proxy.totals()[0]
            assert session.upload(summary, chunks).bytes_sent > 0
            measured = proxy.totals()[0] - before
    finally:
        server.stop(0)
    predicted = CommunicationProtocol.compute_communication_cost(
        features, codec=codec, client_id="a", summary=summary, wire=True
    )
    assert predicted < measured < 1.01 * predicted
    assert all(c.kernel_agrees for c in proxy.connections)


# -- links: prerequisites and clean-up (no real namespace is created here) --------------------


class FakeRunner:
    """Records commands; fails those starting with a prefix in ``fail``."""

    def __init__(self, fail: Sequence[tuple[str, ...]] = ()) -> None:
        self.commands: list[list[str]] = []
        self.fail = fail

    def __call__(self, command: Sequence[str]) -> subprocess.CompletedProcess[str]:
        command = list(command)
        self.commands.append(command)
        bad = any(tuple(command[: len(p)]) == p for p in self.fail)
        return subprocess.CompletedProcess(command, 1 if bad else 0, "",
                                           "Operation not permitted" if bad else "")


def test_links_needs_root() -> None:
    with pytest.raises(links.LinksUnavailableError, match=r"needs root.*uid 1000"):
        links.check_prerequisites(euid=1000, which=lambda _: "/usr/sbin/x", run=FakeRunner())


def test_links_needs_ip_and_tc() -> None:
    with pytest.raises(links.LinksUnavailableError, match="tc on PATH"):
        links.check_prerequisites(
            euid=0, which=lambda tool: None if tool == "tc" else "/usr/sbin/ip", run=FakeRunner()
        )


def test_links_reports_unavailable_namespaces() -> None:
    runner = FakeRunner(fail=[("ip", "netns", "add")])
    with pytest.raises(links.LinksUnavailableError,
                       match=r"network namespaces are unavailable.*Operation not permitted"):
        links.check_prerequisites(euid=0, which=lambda _: "/usr/sbin/x", run=runner)


def test_links_main_exits_with_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unavailable() -> None:
        raise links.LinksUnavailableError("network namespaces are unavailable here: test")

    monkeypatch.setattr(links, "check_prerequisites", unavailable)
    assert links.main([]) == 2
    assert "fedbench links: error: network namespaces are unavailable" in capsys.readouterr().err


def test_shaped_link_cleans_up_even_when_the_run_fails() -> None:
    runner = FakeRunner()
    with pytest.raises(RuntimeError, match="site failed"), links.shaped_link(10, run=runner):
        raise RuntimeError("site failed")
    deletes = [c for c in runner.commands if c[:3] == ["ip", "netns", "delete"]]
    assert deletes and deletes[-1] == ["ip", "netns", "delete", links.NAMESPACE]
    shaped = [c for c in runner.commands if "tbf" in c]
    assert len(shaped) == 2 and all("10mbit" in c for c in shaped)  # both directions


def test_shaped_link_stops_when_a_setup_step_fails() -> None:
    runner = FakeRunner(fail=[("ip", "link", "add")])
    with pytest.raises(links.LinksUnavailableError, match="ip link add"), links.shaped_link(
        100, run=runner
    ):
        pytest.fail("the body must not run without a link")
    assert ["ip", "netns", "delete", links.NAMESPACE] in runner.commands


def test_tbf_burst_covers_the_rate() -> None:
    args = links.tbf_args(100)
    assert args[:3] == ["tbf", "rate", "100mbit"]
    assert int(args[args.index("burst") + 1]) >= 100_000_000 // 8 // 250  # >= one tick at HZ 250
    with pytest.raises(ValueError):
        links.tbf_args(0)


# -- fedserver codec overrides ------------------------------------------------------------------


def test_server_codec_overrides(tmp_path: Path) -> None:
    config, _ = make_config(tmp_path, ["a"], codec="fp16", byte_shuffle=False, zstd_level=9)
    assert config.codec_config == CodecConfig("fp16", byte_shuffle=False, zstd_level=9)
    plain, _ = make_config(tmp_path / "b", ["a"], codec="int8")
    assert plain.codec_config == CODEC_PRESETS["int8"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"codec": "int8", "byte_shuffle": True}, "byte_shuffle must be False"),
        ({"zstd_level": 0}, "zstd_level must be an int in"),
        ({"zstd_level": 23}, "zstd_level must be an int in"),
        ({"byte_shuffle": "yes"}, "byte_shuffle must be a bool"),
    ],
)
def test_server_codec_overrides_are_validated(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, ["a"], **overrides)


def test_server_cli_flags_reach_the_config() -> None:
    args = server_parser().parse_args(
        ["serve", "--no-byte-shuffle", "--zstd-level", "3", "--codec", "bf16"]
    )
    assert (args.byte_shuffle, args.zstd_level, args.codec) == (False, 3, "bf16")
    assert server_parser().parse_args(["serve"]).byte_shuffle is None

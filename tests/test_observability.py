"""fedserver observability: Prometheus counters that match the bytes and chunks actually
sent, health NOT_SERVING while starting and while draining, JSON logs without tokens."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from fedserver_testing import TestClient, make_config, site_rows, upload_messages
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from core.serde import upload_request_to_proto
from fedpatchcore.v1 import federation_pb2 as fpb
from fedserver.cli import main as cli_main
from fedserver.daemon import bind_server
from fedserver.health import check_health

ROOT = Path(__file__).resolve().parents[1]
CHUNK_BYTES = 32 * 4 * 25


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_health_is_not_serving_until_the_journal_is_replayed(tmp_path: Path) -> None:
    config, tokens = make_config(tmp_path, ["a"], metrics_port=-1)
    server = bind_server(config)
    server.listen()  # answering, not loaded: what a slow journal replay looks like from outside
    try:
        address = f"127.0.0.1:{server.port}"
        assert check_health(address) == "NOT_SERVING"
        assert cli_main(["health", "--address", address]) == 1
        client = TestClient(server.port, "a", tokens["a"])
        with pytest.raises(grpc.RpcError) as refused:
            client.join()
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "starting" in refused.value.details()
        assert server.metrics_port is not None
        metrics = scrape(server.metrics_port)
        assert metrics[("fedserver_serving", ())] == 0
        assert ("fedserver_round", ()) not in metrics  # no federation to report yet

        server.start()  # replays, then SERVING
        assert check_health(address) == "SERVING"
        assert cli_main(["health", "--address", address]) == 0
        assert client.join().config.round == 1
        assert scrape(server.metrics_port)[("fedserver_serving", ())] == 1
        client.close()
    finally:
        server.stop(0)


class JsonServer:
    """`python -m fedserver serve --log-format json`, its JSON lines parsed as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        environ = dict(os.environ, **(env or {}))
        environ["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), str(ROOT / "protos"), environ.get("PYTHONPATH", "")]
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fedserver", "serve", "--log-format", "json", *args],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=environ, cwd=ROOT,
        )
        self.raw: list[str] = []
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.raw.append(line)
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no log message matching {pattern!r}: {self.raw}") from None
            match = re.search(pattern, json.loads(line)["message"])
            if match:
                return match


@pytest.mark.slow
def test_metrics_count_what_was_sent_and_health_drains(tmp_path: Path) -> None:
    assert cli_main(["init-config", "--sites", "a,b", "--dir", str(tmp_path / "fed"),
                     "--global-bank-size", "40"]) == 0
    tokens = {s: (tmp_path / "fed" / "site-tokens" / f"{s}.token").read_text().strip()
              for s in ("a", "b")}
    # Settings from the environment as a container would pass them; the flag wins over
    # FEDSERVER_GRACE_S.
    server = JsonServer(
        "--config", str(tmp_path / "fed" / "server.toml"), "--grace-s", "3",
        env={"FEDSERVER_BIND": "127.0.0.1:0", "FEDSERVER_DEVICE": "cpu",
             "FEDSERVER_METRICS_PORT": "-1", "FEDSERVER_GRACE_S": "600"},
    )
    metrics_port = int(server.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
    port = int(server.wait_for(r"listening on port (\d+)").group(1))

    rows = {"a": site_rows(0, 200), "b": site_rows(1, 150)}
    messages = {s: upload_messages(s, rows[s], max_chunk_bytes=CHUNK_BYTES) for s in rows}
    a, b = TestClient(port, "a", tokens["a"]), TestClient(port, "b", tokens["b"])
    summary, chunks = messages["a"]
    sent_a = sum(upload_request_to_proto(m).ByteSize() for m in (summary, *chunks[:6]))
    assert a.upload([summary, *chunks[:6]]).chunks_accepted == 6
    # Resume from chunk 4: chunks 4 and 5 are re-sent (ignored), 6.. are new.
    sent_a += sum(upload_request_to_proto(m).ByteSize() for m in chunks[4:])
    reply = a.upload(chunks[4:])
    assert (reply.chunks_accepted, reply.chunks_ignored) == (len(chunks) - 6, 2)
    # A corrupted chunk of b is refused with DATA_LOSS and counted by that reason.
    b_summary, b_chunks = messages["b"]
    bad = upload_request_to_proto(b_chunks[0])
    bad.chunk.features.checksum ^= 1
    with pytest.raises(grpc.RpcError) as refused:
        b.stub.UploadFeatures(iter([upload_request_to_proto(b_summary), bad]),
                              metadata=b.metadata, timeout=30)
    assert refused.value.code() is grpc.StatusCode.DATA_LOSS
    b.upload([b_summary, *b_chunks])
    b.watch_until_done()
    replies = list(b.stub.DownloadBank(fpb.DownloadBankRequest(site_id="b"),
                                       metadata=b.metadata, timeout=60))
    intruder = TestClient(port, "a", "not-a-token")
    with pytest.raises(grpc.RpcError):
        intruder.join()

    m = scrape(metrics_port)
    assert m[("fedserver_received_bytes_total",
              (("method", "UploadFeatures"), ("site", "a")))] == sent_a
    assert m[("fedserver_chunks_accepted_total", (("site", "a"),))] == len(chunks)
    assert m[("fedserver_chunks_resent_total", (("site", "a"),))] == 2
    assert m[("fedserver_chunks_accepted_total", (("site", "b"),))] == len(b_chunks)
    assert m[("fedserver_chunks_rejected_total", (("reason", "DATA_LOSS"), ("site", "b")))] == 1
    assert m[("fedserver_sent_bytes_total", (("method", "DownloadBank"), ("site", "b")))] == sum(
        r.ByteSize() for r in replies
    )
    assert m[("fedserver_rpcs_total", (("code", "DATA_LOSS"), ("method", "UploadFeatures")))] == 1
    assert m[("fedserver_rpcs_total", (("code", "UNAUTHENTICATED"), ("method", "JoinRound")))] == 1
    assert m[("fedserver_round_state", (("state", "ready"),))] == 1
    assert m[("fedserver_round_state", (("state", "collecting"),))] == 0
    assert m[("fedserver_bank_rows", ())] == 40
    assert m[("fedserver_round_rows_received", ())] == 350
    assert m[("fedserver_selection_seconds_count", ())] == 1
    assert m[("fedserver_uploads_in_flight", ())] == 0
    assert m[("fedserver_serving", ())] == 1

    # Drain: a health Watch stream sees NOT_SERVING as soon as SIGTERM arrives; it is itself an
    # in-flight rpc, so the server waits out --grace-s (3 s, the flag over the environment).
    health = health_pb2_grpc.HealthStub(a.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    server.process.send_signal(signal.SIGTERM)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert scrape(metrics_port)[("fedserver_serving", ())] == 0
    assert server.process.wait(timeout=60) == 0
    a.close()
    b.close()
    intruder.close()

    records = [json.loads(line) for line in server.raw]  # every line is one JSON object
    assert all(set(r) >= {"time", "level", "logger", "message"} for r in records)
    assert any(r["message"].startswith("received SIGTERM: draining (grace 3.0 s)")
               for r in records)
    assert any(r["level"] == "WARNING" and "DATA_LOSS" in r["message"] for r in records)
    text = "".join(server.raw)
    assert all(token not in text for token in (*tokens.values(), "not-a-token"))


def test_health_command_does_not_import_torch() -> None:
    """The Docker HEALTHCHECK runs `fedserver health` every 30 s with a 10 s timeout; importing
    torch took 26 s on this machine under load, the command without it under 1 s."""
    code = (
        "import sys\n"
        "from fedserver.cli import main\n"
        "assert main(['health', '--address', '127.0.0.1:9', '--timeout', '1']) == 1\n"
        "assert 'torch' not in sys.modules, 'fedserver health imported torch'\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "protos")])
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "127.0.0.1:9: UNREACHABLE: UNAVAILABLE" in done.stdout

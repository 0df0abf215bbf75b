"""Prometheus metrics of a fedserver process (``metrics_port``; off by default).

Served as text on ``http://metrics_host:metrics_port/metrics`` by prometheus-client's HTTP
server, from a registry of this server alone (several servers in one test process do not mix).

Traffic (counted by the server's interceptor, fedserver.access, on every rpc, from the
serialized size of each message, i.e. the bytes ``len(message.SerializeToString())`` that the
gRPC framing carries):

* ``fedserver_received_bytes_total{site, method}`` / ``fedserver_sent_bytes_total{site,
  method}``: request / response message bytes. ``site`` is the token's site, "-" for health
  and reflection, "unauthenticated" for a call without a valid token.
* ``fedserver_rpcs_total{method, code}``: finished rpcs by status code (OK, UNAUTHENTICATED,
  PERMISSION_DENIED, FAILED_PRECONDITION, ...).
* ``fedserver_uploads_in_flight``: UploadFeatures streams open now.

Chunks (counted by the servicer as it hands each one to the federation):

* ``fedserver_chunks_accepted_total{site}``: chunks committed (fsync'ed) for the first time.
* ``fedserver_chunks_resent_total{site}``: chunks the server already held (a resumed upload
  re-sent them; ignored, acknowledged again).
* ``fedserver_chunks_rejected_total{site, reason}``: chunks refused, by the status code the
  site received (DATA_LOSS for a checksum failure, RESOURCE_EXHAUSTED, FAILED_PRECONDITION,
  INVALID_ARGUMENT, OUT_OF_RANGE, UNAVAILABLE).

Rounds and bank (read from the federation when scraped, so they are never stale):

* ``fedserver_round``: number of the current round; ``fedserver_round_state{state}``: 1 for the
  current round's state (collecting, selecting, ready, failed), 0 for the others.
* ``fedserver_round_sites_expected`` / ``_sites_joined`` / ``_sites_complete`` /
  ``fedserver_round_rows_received``: the current round's progress.
* ``fedserver_bank_rows`` / ``fedserver_bank_version``: the latest bank (0 before the first).
* ``fedserver_selection_seconds`` (histogram): per round that completed in this process, from
  its last complete upload (or its deadline cut-off) to its bank being stored and announced.
* ``fedserver_serving``: 1 while health says SERVING, 0 while starting (journal replay) and
  while draining after SIGTERM.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from fedserver.auth import TokenStore
from fedserver.federation import Federation, NotFoundError, Phase

logger = logging.getLogger(__name__)

__all__ = ["SELECTION_BUCKETS", "ServerMetrics"]

#: Selection time buckets, seconds: from a small CPU bank (< 1 s) to a 100k-row GPU bank.
SELECTION_BUCKETS: Final[tuple[float, ...]] = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


class ServerMetrics:
    """The metrics of one server: its registry, the counters the interceptor and the servicer
    update, the scrape-time view of the federation, and the HTTP endpoint."""

    def __init__(self, tokens: TokenStore) -> None:
        self._tokens = tokens
        self.registry = CollectorRegistry(auto_describe=True)
        self.received_bytes = Counter(
            "fedserver_received_bytes", "Request message bytes received, per site and rpc.",
            ["site", "method"], registry=self.registry,
        )
        self.sent_bytes = Counter(
            "fedserver_sent_bytes", "Response message bytes sent, per site and rpc.",
            ["site", "method"], registry=self.registry,
        )
        self.rpcs = Counter(
            "fedserver_rpcs", "Finished rpcs by method and status code.", ["method", "code"],
            registry=self.registry,
        )
        self.uploads_in_flight = Gauge(
            "fedserver_uploads_in_flight", "UploadFeatures streams open now.",
            registry=self.registry,
        )
        self.chunks_accepted = Counter(
            "fedserver_chunks_accepted", "Chunks committed for the first time, per site.",
            ["site"], registry=self.registry,
        )
        self.chunks_resent = Counter(
            "fedserver_chunks_resent", "Chunks re-sent by a resumed upload (already held).",
            ["site"], registry=self.registry,
        )
        self.chunks_rejected = Counter(
            "fedserver_chunks_rejected", "Chunks refused, by the status code returned.",
            ["site", "reason"], registry=self.registry,
        )
        self.serving = Gauge(
            "fedserver_serving", "1 while the health service says SERVING, else 0.",
            registry=self.registry,
        )
        self._federation_view = _FederationCollector()
        self.registry.register(self._federation_view)
        self._http: Any = None
        self._http_thread: threading.Thread | None = None

    # -- wiring -----------------------------------------------------------------------------

    def attach(self, federation: Federation) -> None:
        """Report this federation's rounds and bank from now on."""
        self._federation_view.federation = federation

    def chunk(self, site: str, outcome: str) -> None:
        """Count one chunk: outcome "accepted", "resent" or a status code name (rejected)."""
        if outcome == "accepted":
            self.chunks_accepted.labels(site).inc()
        elif outcome == "resent":
            self.chunks_resent.labels(site).inc()
        else:
            self.chunks_rejected.labels(site, outcome).inc()

    # -- HTTP endpoint ----------------------------------------------------------------------

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (port 0: a free one); returns the bound port."""
        try:
            self._http, self._http_thread = start_http_server(
                port, addr=host, registry=self.registry
            )
        except OSError as error:
            raise RuntimeError(f"cannot serve metrics on {host}:{port}: {error}") from error
        bound = int(self._http.server_address[1])
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            if self._http_thread is not None:
                self._http_thread.join(timeout=5)
            self._http = self._http_thread = None


class _FederationCollector(Collector):
    """Round, bank and selection-time metrics, read from the federation at scrape time."""

    def __init__(self) -> None:
        self.federation: Federation | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily; names are listed in the module docstring

    def collect(self) -> Iterable[Metric]:
        federation = self.federation
        if federation is None:
            return []
        current = federation.snapshot()
        state = GaugeMetricFamily("fedserver_round_state", "1 for the current round's state.",
                                  labels=["state"])
        for phase in Phase:
            state.add_metric([phase.value], 1.0 if phase is current.phase else 0.0)
        bank_rows = bank_version = 0
        durations: list[float] = []
        for number in range(1, current.round + 1):
            try:
                snapshot = federation.snapshot(number)
                completed, ready = federation.timings(number)
            except NotFoundError:
                continue
            if snapshot.phase is Phase.READY:
                bank_rows, bank_version = snapshot.bank_rows, snapshot.bank_version
                if completed is not None and ready is not None:
                    durations.append(ready - completed)
        buckets: list[tuple[str, float]] = [
            (str(float(b)), float(sum(d <= b for d in durations))) for b in SELECTION_BUCKETS
        ]
        buckets.append(("+Inf", float(len(durations))))
        selection = HistogramMetricFamily(
            "fedserver_selection_seconds",
            "Last complete upload (or deadline cut-off) to bank ready, per round, seconds.",
            buckets=buckets, sum_value=float(sum(durations)),
        )

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, value=value)

        return [
            gauge("fedserver_round", "Number of the current round.", current.round),
            state,
            gauge("fedserver_round_sites_expected", "Sites the current round waits for.",
                  current.sites_expected),
            gauge("fedserver_round_sites_joined", "Sites whose summary the round holds.",
                  current.sites_joined),
            gauge("fedserver_round_sites_complete", "Sites whose upload is complete.",
                  current.sites_complete),
            gauge("fedserver_round_rows_received", "Rows committed in the current round.",
                  current.rows_received),
            gauge("fedserver_bank_rows", "Rows of the latest bank (0: none yet).", bank_rows),
            gauge("fedserver_bank_version", "Version of the latest bank (0: none yet).",
                  bank_version),
            selection,
        ]

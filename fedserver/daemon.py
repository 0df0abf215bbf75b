"""Build and run the gRPC server: limits, TLS/mTLS, token interceptor, health, reflection, drain.

``create_server(config)`` is a factory (tests bind 127.0.0.1:0 and read the bound port);
``serve(config)`` runs it until SIGTERM/SIGINT and then drains: health turns NOT_SERVING, watch
streams end, in-flight uploads get ``grace_s`` seconds to finish (each committed chunk is
already durable, so a cut-off upload resumes later), a running selection completes, and the
journal is closed.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fedpatchcore.v1 import federation_pb2 as fpb
from fedserver.auth import TokenAuthInterceptor, TokenStore
from fedserver.config import ServerConfig
from fedserver.federation import Federation
from fedserver.journal import Journal
from fedserver.servicer import FederationServicer, add_to_server

logger = logging.getLogger(__name__)

__all__ = ["FedServer", "create_server", "serve"]

SERVICE_NAME = fpb.DESCRIPTOR.services_by_name["FederationService"].full_name


@dataclass
class FedServer:
    """A built, not yet started server: the grpc.Server, the federation it serves, health."""

    grpc_server: grpc.Server
    federation: Federation
    health: health.HealthServicer
    port: int

    def start(self) -> None:
        self.federation.start()
        self.grpc_server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        logger.info("fedserver listening on port %d", self.port)

    def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, end watches, let rpcs finish for ``grace`` seconds,
        then wait for a running selection and close the journal."""
        self.health.enter_graceful_shutdown()
        self.federation.begin_shutdown()
        self.grpc_server.stop(grace).wait()
        self.federation.close()
        logger.info("fedserver stopped")


def _credentials(config: ServerConfig) -> grpc.ServerCredentials:
    assert config.tls_cert is not None and config.tls_key is not None
    root = config.client_ca.read_bytes() if config.client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=root,
        require_client_auth=root is not None,
    )


def create_server(
    config: ServerConfig, *, clock: Callable[[], float] | None = None
) -> tuple[FedServer, int]:
    """Open the state directory (replaying it), build the server and bind ``config.bind``.

    Returns the server (not started) and the bound port. Raises ConfigError/AuthError/
    JournalCorruptError for bad settings or state, RuntimeError if the address cannot be bound.
    """
    tokens = TokenStore.load(config.tokens_file)
    journal = Journal(config.state_dir, fsync=config.fsync)
    try:
        kwargs = {} if clock is None else {"clock": clock}
        federation = Federation(
            config, journal, tokens.sites, device=config.selection_device(), **kwargs
        )
    except Exception:
        journal.close()
        raise
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # One process per port: a second server on the same port must fail, not share it.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rpc"),
        interceptors=[TokenAuthInterceptor(tokens)],
        options=options,
        maximum_concurrent_rpcs=config.max_workers,
    )
    servicer = FederationServicer(
        federation, tokens, bind_certificates=config.client_ca is not None
    )
    add_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        if config.tls:
            port = server.add_secure_port(config.bind, _credentials(config))
        else:
            port = server.add_insecure_port(config.bind)
    except RuntimeError as error:
        federation.close()
        raise RuntimeError(f"cannot bind {config.bind}: {error}") from error
    if port == 0:
        federation.close()
        raise RuntimeError(f"cannot bind {config.bind}")
    logger.info(
        "fedserver on %s (port %d, %s), state %s, %d expected site(s), k=%d, %s selection on %s",
        config.bind, port,
        "mTLS" if config.client_ca else ("TLS" if config.tls else "plaintext"),
        config.state_dir, federation.snapshot().sites_expected,
        config.global_bank_size, config.strategy, federation.device,
    )
    return FedServer(server, federation, health_servicer, port), port


def serve(config: ServerConfig, *, ready: Callable[[int], None] | None = None) -> int:
    """Run until SIGTERM or SIGINT, then drain (module docstring). Returns the exit status 0.

    ``ready`` is called with the bound port once the server accepts rpcs.
    """
    server, port = create_server(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s: draining (grace %.1f s)", signal.Signals(signum).name,
                    config.grace_s)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        if ready is not None:
            ready(port)
        while not stop.wait(timeout=1.0):
            pass
        server.stop(config.grace_s)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0

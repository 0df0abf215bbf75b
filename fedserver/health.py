"""Ask a fedserver's gRPC health service (``grpc.health.v1``) whether it serves.

Used by ``fedserver health`` and so by the Docker HEALTHCHECK: no grpc_health_probe binary is
needed. The server reports NOT_SERVING while it replays its state directory at start and from
the moment it drains on SIGTERM (fedserver.daemon), so a load balancer or an orchestrator
sends sites elsewhere in both cases. Health is exempt from the token check (fedserver.auth).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger(__name__)

__all__ = ["check_health"]


def check_health(
    address: str,
    *,
    timeout_s: float = 5.0,
    wait_s: float = 0.0,
    tls_ca: Path | None = None,
    tls_server_name: str | None = None,
    service: str = "",
) -> str:
    """The server's health status name: "SERVING", "NOT_SERVING", ... or "UNREACHABLE: why".

    Args:
        address: HOST:PORT of the server.
        timeout_s: deadline of each Check call, seconds.
        wait_s: ask again (every 0.5 s) until SERVING or this many seconds have passed;
            0 asks once.
        tls_ca: PEM CA of the server certificate; None = plaintext.
        tls_server_name: name to check in the certificate (default: the host).
        service: "" for the whole server, or a service name.
    """
    if timeout_s <= 0 or wait_s < 0:
        raise ValueError(f"timeout_s must be > 0 and wait_s >= 0, got {timeout_s}, {wait_s}")
    if tls_ca is not None:
        options = (
            [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        )
        channel = grpc.secure_channel(
            address, grpc.ssl_channel_credentials(tls_ca.read_bytes()), options=options
        )
    else:
        channel = grpc.insecure_channel(address)
    deadline = time.monotonic() + wait_s
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service),
                                   timeout=timeout_s)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as error:
                status = f"UNREACHABLE: {error.code().name}: {error.details()}"  # type: ignore[attr-defined]
            if status == "SERVING" or time.monotonic() >= deadline:
                return status
            logger.debug("health of %s: %s; asking again", address, status)
            time.sleep(0.5)
    finally:
        channel.close()

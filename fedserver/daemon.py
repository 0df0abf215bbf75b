"""Build and run the gRPC server: limits, TLS/mTLS, access control, health, reflection, drain.

The server is grpc.aio: every rpc is a coroutine on one event loop (its own thread here, so
that tests and tools drive the server from ordinary code), and a waiting rpc (a site watching
its round for minutes, an idle upload stream) holds no thread. CPU work of the handlers runs
on a bounded thread pool (``max_workers``); ranking and selection run on the federation's
selection worker (fedserver.selection), never in an rpc.

``bind_server(config)`` builds and binds (a factory: tests bind 127.0.0.1:0 and read the bound
port); ``create_server`` also replays the state directory; ``serve(config)`` binds first and
answers health with NOT_SERVING while it replays the state directory, turns SERVING when
ready, runs until SIGTERM/SIGINT and then drains: health turns NOT_SERVING (a health Watch
stream sees it at once; new calls are refused), watch streams end (sites reconnect and watch
the restarted server), in-flight uploads get ``grace_s`` seconds to finish (each committed
chunk is already durable, so a cut-off upload resumes later), a queued or running selection
completes, and the journal is closed. One server per state directory: the directory's lock
(fedserver.journal.StateDirLock) is taken before the journal is opened.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Coroutine
from concurrent import futures
from types import FrameType
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as reflection_v1alpha_pb2_grpc

from fedpatchcore.reflection.v1 import reflection_pb2 as reflection_v1_pb2
from fedpatchcore.v1 import federation_pb2 as fpb
from fedserver.access import AccessInterceptor, RpcBudgets
from fedserver.auth import TokenStore
from fedserver.config import ServerConfig
from fedserver.federation import Federation
from fedserver.journal import Journal, StateDirLock
from fedserver.metrics import ServerMetrics
from fedserver.operator import OPERATOR_SERVICE, OperatorServicer, add_operator_to_server
from fedserver.servicer import FederationServicer, add_to_server

logger = logging.getLogger(__name__)

__all__ = ["FedServer", "bind_server", "create_server", "serve"]

SERVICE_NAME = fpb.DESCRIPTOR.services_by_name["FederationService"].full_name
#: grpc.reflection.v1.ServerReflection (protos/fedpatchcore/reflection/v1/reflection.proto).
REFLECTION_V1_SERVICE = reflection_v1_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
T = TypeVar("T")


class _EventLoopThread:
    """An asyncio event loop running on a daemon thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fedserver-aio",
                                        daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop and wait for its result (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class FedServer:
    """A bound server: the grpc.aio server on its loop, health, metrics and (once loaded) the
    federation.

    Start-up has three steps so that health can answer while the state directory is replayed:
    :meth:`listen` starts answering rpcs (health NOT_SERVING, federation calls UNAVAILABLE),
    :meth:`load` takes the state directory's lock and replays the journal, :meth:`start` turns
    health SERVING. ``start`` does whichever of the first two has not been done.
    """

    def __init__(
        self,
        config: ServerConfig,
        loop: _EventLoopThread,
        grpc_server: grpc.aio.Server,
        servicer: FederationServicer,
        health_servicer: Any,
        metrics: ServerMetrics,
        tokens: TokenStore,
        port: int,
        executor: futures.ThreadPoolExecutor,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self.grpc_server = grpc_server
        self.servicer = servicer
        self.health = health_servicer
        self.metrics = metrics
        self.port = port
        self.metrics_port: int | None = None
        self._loop = loop
        self._tokens = tokens
        self._executor = executor
        self._clock = clock
        self._federation: Federation | None = None
        self._lock: StateDirLock | None = None
        self._listening = False
        self._stopped = False
        self.operator: OperatorServicer | None = None  # set by bind_server

    @property
    def federation(self) -> Federation:
        if self._federation is None:
            raise RuntimeError("the federation is not loaded yet (call load() or start())")
        return self._federation

    async def _set_health(self, status: int) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    def listen(self) -> None:
        """Answer rpcs: health NOT_SERVING, federation calls UNAVAILABLE; start /metrics."""
        self._loop.run(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        self.metrics.serving.set(0)
        if self.config.metrics_port:
            port = 0 if self.config.metrics_port < 0 else self.config.metrics_port
            self.metrics_port = self.metrics.start_http(self.config.metrics_host, port)
        self._loop.run(self.grpc_server.start())
        self._listening = True
        logger.info("fedserver bound to port %d, loading the state directory %s", self.port,
                    self.config.state_dir)

    def load(self) -> None:
        """Lock the state directory, open it and replay its journal (may take a while).

        Raises StateDirLockedError when another server holds the directory."""
        lock = StateDirLock(self.config.state_dir)
        try:
            journal = Journal(self.config.state_dir, fsync=self.config.fsync)
            try:
                kwargs = {} if self._clock is None else {"clock": self._clock}
                federation = Federation(
                    self.config, journal, self._tokens.sites,
                    device=self.config.selection_device(), **kwargs,
                )
            except Exception:
                journal.close()
                raise
        except Exception:
            lock.release()
            raise
        self._lock = lock
        self._federation = federation
        self.servicer.attach(federation)
        if self.operator is not None:
            self.operator.attach(federation)
        self.metrics.attach(federation)
        logger.info(
            "fedserver on %s (port %d, %s), state %s, %d expected site(s), k=%d, %s selection "
            "on %s", self.config.bind, self.port,
            "mTLS" if self.config.client_ca else ("TLS" if self.config.tls else "plaintext"),
            self.config.state_dir, federation.snapshot().sites_expected,
            self.config.global_bank_size, self.config.strategy, federation.device,
        )

    def start(self) -> None:
        """Listen and load if not done yet, start the federation, turn health SERVING."""
        try:
            if not self._listening:
                self.listen()
            if self._federation is None:
                self.load()
        except BaseException:
            self._abandon()
            raise
        self.federation.start()
        self._loop.run(self._set_health(health_pb2.HealthCheckResponse.SERVING))
        self.metrics.serving.set(1)
        logger.info("fedserver listening on port %d", self.port)

    def _abandon(self) -> None:
        """Release the port, the metrics endpoint and the loop after a failed start."""
        self._stopped = True
        self._loop.run(self.grpc_server.stop(None))
        self.metrics.stop_http()
        self._executor.shutdown(wait=False)
        self._loop.close()

    def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, end watches, let rpcs finish for ``grace`` seconds,
        then let a queued or running selection complete, close the journal, release the
        state directory."""
        if self._stopped:
            return
        self._stopped = True
        self._loop.run(self.health.enter_graceful_shutdown())
        self.metrics.serving.set(0)
        if self._federation is not None:
            self._federation.begin_shutdown()
        self._loop.run(self.grpc_server.stop(grace))
        if self._federation is not None:
            self._federation.close()
        if self._lock is not None:
            self._lock.release()
        self._executor.shutdown(wait=True)
        self.metrics.stop_http()
        self._loop.close()
        logger.info("fedserver stopped")


def _credentials(config: ServerConfig) -> grpc.ServerCredentials:
    assert config.tls_cert is not None and config.tls_key is not None
    root = config.client_ca.read_bytes() if config.client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=root,
        require_client_auth=root is not None,
    )


def add_reflection(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Serve server reflection as grpc.reflection.v1 and v1alpha, listing ``service_names``
    and both reflection services.

    grpcio-reflection implements only v1alpha (grpc/grpc#38576) while grpcurl and other tools
    ask v1 first. The two versions' messages are identical on the wire (the same fields and
    numbers under another package; tests/test_protocol_truth.py compares the descriptors), so
    v1 is the same asyncio servicer registered under the v1 method name with v1alpha message
    (de)serializers; importing the v1 schema puts its descriptor in the default pool, so a
    client can also describe the v1 service itself. Both are token-exempt
    (fedserver.auth.EXEMPT_METHOD_PREFIXES) and their streams count in the exempt budgets of
    fedserver.access.
    """
    names = (*service_names, reflection.SERVICE_NAME, REFLECTION_V1_SERVICE.full_name)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_v1alpha_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_v1alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        REFLECTION_V1_SERVICE.full_name,
        {REFLECTION_V1_SERVICE.methods[0].name: handler},
    ),))


def bind_server(
    config: ServerConfig, *, clock: Callable[[], float] | None = None
) -> FedServer:
    """Build the gRPC server and bind ``config.bind``; nothing is replayed or started yet.

    Raises AuthError for a bad tokens file, RuntimeError if the address cannot be bound.
    """
    tokens = TokenStore.load(config.tokens_file)
    loop = _EventLoopThread()
    try:
        return loop.run(_bind(config, tokens, loop, clock))
    except BaseException:
        loop.close()
        raise


async def _bind(
    config: ServerConfig,
    tokens: TokenStore,
    loop: _EventLoopThread,
    clock: Callable[[], float] | None,
) -> FedServer:
    metrics = ServerMetrics(tokens)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # One process per port: a second server on the same port must fail, not share it.
        ("grpc.so_reuseport", 0),
    ]
    budgets = RpcBudgets(
        per_site=config.max_rpcs_per_site,
        exempt_per_peer=config.max_exempt_streams_per_peer,
        exempt_total=config.max_exempt_streams,
    )
    server = grpc.aio.server(
        interceptors=[AccessInterceptor(tokens, budgets, metrics)],
        options=options,
    )
    executor = futures.ThreadPoolExecutor(max_workers=config.max_workers,
                                          thread_name_prefix="rpc")
    servicer = FederationServicer(
        None, tokens, executor=executor, on_chunk=metrics.chunk,
        bind_certificates=config.client_ca is not None,
    )
    add_to_server(servicer, server)
    operator = OperatorServicer(tokens, config.tokens_file, executor=executor)
    add_operator_to_server(operator, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    add_reflection(server, (SERVICE_NAME, OPERATOR_SERVICE.full_name, health.SERVICE_NAME))
    try:
        if config.tls:
            port = server.add_secure_port(config.bind, _credentials(config))
        else:
            port = server.add_insecure_port(config.bind)
    except RuntimeError as error:
        executor.shutdown(wait=False)
        raise RuntimeError(f"cannot bind {config.bind}: {error}") from error
    if port == 0:
        executor.shutdown(wait=False)
        raise RuntimeError(f"cannot bind {config.bind}")
    fed_server = FedServer(config, loop, server, servicer, health_servicer, metrics, tokens,
                           port, executor, clock)
    fed_server.operator = operator
    return fed_server


def create_server(
    config: ServerConfig, *, clock: Callable[[], float] | None = None
) -> tuple[FedServer, int]:
    """Bind ``config.bind`` and open the state directory (replaying it); not started.

    Returns the server and the bound port. Raises ConfigError/AuthError/JournalCorruptError for
    bad settings or state, RuntimeError if the address cannot be bound.
    """
    server = bind_server(config, clock=clock)
    try:
        server.load()
    except BaseException:
        server._abandon()
        raise
    return server, server.port


def serve(config: ServerConfig, *, ready: Callable[[int], None] | None = None) -> int:
    """Run until SIGTERM or SIGINT, then drain (module docstring). Returns the exit status 0.

    ``ready`` is called with the bound port once the server accepts rpcs.
    """
    server = bind_server(config)
    port = server.port
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

"""Who may call, how many calls each may hold open, and what they cost: one asyncio interceptor.

Every rpc passes :class:`AccessInterceptor` before its handler runs:

1. **Authentication.** Every rpc except the health and reflection services carries
   ``authorization: Bearer <token>`` (fedserver.auth); a missing or unknown token is refused
   with UNAUTHENTICATED before the handler reads a byte of the request. The operator service
   takes the operator's token only, the other services site tokens only (PERMISSION_DENIED).
2. **Budgets of open rpcs** (:class:`RpcBudgets`), so that no caller can take what others need.
   An authenticated site may hold at most ``max_rpcs_per_site`` rpcs open at once (an upload, a
   watch, a download and a few status calls and retries need far fewer). The token-exempt
   services have budgets of their own, which authenticated rpcs never draw on: at most
   ``max_exempt_streams_per_peer`` open health Watch / reflection streams per peer address and
   ``max_exempt_streams`` in all. A unary health Check is never refused: it is what Docker's
   HEALTHCHECK and load balancers ask, and it holds nothing open. A refusal is
   RESOURCE_EXHAUSTED with the trailing metadata ``fedpatchcore-retry: concurrency`` (a
   transient refusal: fedclient retries it with backoff), unlike a limit on what a site sends
   (too many rows, too large a chunk), which is final.
3. **Metrics** (fedserver.metrics): request and response message bytes per site and rpc,
   finished rpcs by status code, upload streams open.

Nothing here holds a thread: the server is grpc.aio, and a waiting rpc is a parked coroutine.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import grpc.aio

from fedserver.auth import EXEMPT_METHOD_PREFIXES, OPERATOR, AuthError, TokenStore
from fedserver.metrics import ServerMetrics
from fedserver.servicer import MalformedRequest

logger = logging.getLogger(__name__)

__all__ = ["RETRY_METADATA", "AccessInterceptor", "RpcBudgets"]

#: Trailing metadata of a refusal that a retry may overcome (the caller held too many rpcs).
RETRY_METADATA: Final[tuple[str, str]] = ("fedpatchcore-retry", "concurrency")
_UPLOAD_METHOD: Final[str] = "UploadFeatures"
_HEALTH_CHECK: Final[str] = "/grpc.health.v1.Health/Check"
#: Methods of fedpatchcore.v1.OperatorService (fedserver.operator).
OPERATOR_METHOD_PREFIX: Final[str] = "/fedpatchcore.v1.OperatorService/"


@dataclass
class RpcBudgets:
    """Counts of open rpcs per site, per peer address (exempt streams) and in all (exempt).

    All counting happens on the server's event loop thread, so no lock is needed.
    """

    per_site: int
    exempt_per_peer: int
    exempt_total: int
    _sites: dict[str, int] = field(default_factory=dict)
    _peers: dict[str, int] = field(default_factory=dict)
    _exempt: int = 0

    def take_site(self, site: str) -> str | None:
        """Count an rpc of ``site``; None, or why it is refused (nothing counted then)."""
        held = self._sites.get(site, 0)
        if held >= self.per_site:
            return (f"site {site!r} already holds {held} open rpcs (max_rpcs_per_site = "
                    f"{self.per_site}); retry when one has finished")
        self._sites[site] = held + 1
        return None

    def release_site(self, site: str) -> None:
        held = self._sites[site] - 1
        if held:
            self._sites[site] = held
        else:
            del self._sites[site]

    def take_exempt(self, peer: str) -> str | None:
        """Count an open health / reflection stream of ``peer``; None, or why it is refused."""
        held = self._peers.get(peer, 0)
        if held >= self.exempt_per_peer:
            return (f"{peer} already holds {held} open health/reflection streams "
                    f"(max_exempt_streams_per_peer = {self.exempt_per_peer})")
        if self._exempt >= self.exempt_total:
            return (f"{self._exempt} health/reflection streams are open "
                    f"(max_exempt_streams = {self.exempt_total})")
        self._peers[peer] = held + 1
        self._exempt += 1
        return None

    def release_exempt(self, peer: str) -> None:
        held = self._peers[peer] - 1
        if held:
            self._peers[peer] = held
        else:
            del self._peers[peer]
        self._exempt -= 1


def peer_address(context: grpc.aio.ServicerContext) -> str:
    """The peer's address without its port ("ipv4:127.0.0.1:5000" -> "ipv4:127.0.0.1")."""
    peer = context.peer() or "unknown"
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


def _message_bytes(message: Any) -> int:
    """Serialized size of a request or response, bytes; bytes that did not parse reach the
    handler as a MalformedRequest (fedserver.servicer), which carries their size."""
    if isinstance(message, MalformedRequest):
        return message.size
    return int(message.ByteSize())


def _code_of(context: grpc.aio.ServicerContext, failed: BaseException | None) -> str:
    if failed is None:
        return "OK"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(failed, GeneratorExit | asyncio.CancelledError):
        return "CANCELLED"
    return "UNKNOWN"


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, rpc budgets and metrics for every rpc (module docstring)."""

    def __init__(self, tokens: TokenStore, budgets: RpcBudgets, metrics: ServerMetrics) -> None:
        self._tokens = tokens
        self._budgets = budgets
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # type: ignore[return-value]  # unknown method: UNIMPLEMENTED
        full = handler_call_details.method
        method = full.rsplit("/", 1)[-1]
        metrics = self._metrics
        exempt = full.startswith(EXEMPT_METHOD_PREFIXES)
        site = "-"
        if not exempt:
            try:
                site = self._tokens.site_of(handler_call_details.invocation_metadata)
            except AuthError as error:
                logger.warning("refused %s: %s", full, error)
                metrics.rpcs.labels(method, "UNAUTHENTICATED").inc()
                return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, str(error))
            denied = _operator_mismatch(full, site)
            if denied is not None:
                logger.warning("refused %s: %s", full, denied)
                metrics.rpcs.labels(method, "PERMISSION_DENIED").inc()
                return _refusing(handler, grpc.StatusCode.PERMISSION_DENIED, denied)
        streaming = handler.request_streaming or handler.response_streaming
        budgets = self._budgets

        async def enter(context: grpc.aio.ServicerContext) -> Callable[[], None]:
            """Take the rpc's budget (abort if there is none); returns its release."""
            if not exempt:
                refused = budgets.take_site(site)
                if refused is None:
                    return lambda: budgets.release_site(site)
            elif streaming and full != _HEALTH_CHECK:
                peer = peer_address(context)
                refused = budgets.take_exempt(peer)
                if refused is None:
                    return lambda: budgets.release_exempt(peer)
            else:
                return lambda: None
            logger.warning("refused %s of %s: %s", method, site, refused)
            metrics.rpcs.labels(method, "RESOURCE_EXHAUSTED").inc()
            context.set_trailing_metadata((RETRY_METADATA,))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"concurrency limit: {refused}")
            raise AssertionError("unreachable")  # pragma: no cover

        received = metrics.received_bytes.labels(site, method)
        sent = metrics.sent_bytes.labels(site, method)
        uploading = method == _UPLOAD_METHOD

        def finish(context: grpc.aio.ServicerContext, failed: BaseException | None) -> None:
            metrics.rpcs.labels(method, _code_of(context, failed)).inc()

        async def counted(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                received.inc(_message_bytes(request))
                yield request

        def requests_of(request: Any) -> Any:
            if handler.request_streaming:
                return counted(request)
            received.inc(_message_bytes(request))
            return request

        behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                    or handler.stream_stream)
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}

        async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
            release = await enter(context)
            if uploading:
                metrics.uploads_in_flight.inc()
            try:
                response = await behavior(requests_of(request), context)
            except BaseException as error:
                finish(context, error)
                raise
            finally:
                release()
                if uploading:
                    metrics.uploads_in_flight.dec()
            sent.inc(_message_bytes(response))
            finish(context, None)
            return response

        async def stream_response(request: Any, context: grpc.aio.ServicerContext
                                  ) -> AsyncIterator[Any]:
            release = await enter(context)
            try:
                async for response in behavior(requests_of(request), context):
                    sent.inc(_message_bytes(response))
                    yield response
            except BaseException as error:
                finish(context, error)
                raise
            finally:
                release()
            finish(context, None)

        async def written_response(request: Any, context: grpc.aio.ServicerContext) -> None:
            # A streaming handler that writes with context.write (grpc_health's aio Watch).
            release = await enter(context)
            try:
                await behavior(requests_of(request), context)
            except BaseException as error:
                finish(context, error)
                raise
            finally:
                release()
            finish(context, None)

        if not handler.response_streaming:
            wrapped: Callable[..., Any] = unary_response
        elif inspect.isasyncgenfunction(behavior):
            wrapped = stream_response
        else:
            wrapped = written_response
        return _handler_like(handler, wrapped, kwargs)


def _operator_mismatch(method: str, caller: str) -> str | None:
    """Why ``caller`` (a site id, or OPERATOR) may not call ``method``; None when it may. The
    operator service takes the operator's token only, every other service site tokens only."""
    operator_rpc = method.startswith(OPERATOR_METHOD_PREFIX)
    if operator_rpc and caller != OPERATOR:
        return (f"{method} is an operator command: it needs the operator token "
                f"({OPERATOR} in the tokens file), not the token of site {caller!r}")
    if not operator_rpc and caller == OPERATOR:
        return (f"{method} is a site rpc: the operator token cannot call it (use a site's "
                "token)")
    return None


def _handler_like(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any],
                  kwargs: dict[str, Any]) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind (request/response streaming) running ``behavior``."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behavior, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behavior, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behavior, **kwargs)
    return grpc.unary_unary_rpc_method_handler(behavior, **kwargs)


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
              ) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that aborts with ``code`` before reading the request."""

    async def refuse(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    return _handler_like(handler, refuse, kwargs)
